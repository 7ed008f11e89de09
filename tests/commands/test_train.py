"""Training: ln 2 at step 0, learning, exact equivalence across batch layouts and processes, checkpoints, resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, kill_at_checkpoint, max_diff, read_metrics, run_cli, train_config, weights
from safetensors.torch import load_file

from refdpo.commands.train import train
from refdpo.errors import ConfigError

LN2 = math.log(2)


def test_step0_loss_is_ln2_and_rewards_are_zero_when_reference_is_the_initial_policy(tiny_setup, tmp_path):
    train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=16, epochs=1))
    steps, evals = read_metrics(tmp_path / "run")
    first_eval = evals[0]
    assert first_eval["step"] == 0
    assert first_eval["val_loss"] == pytest.approx(LN2, abs=1e-5)
    assert abs(first_eval["val_reward_chosen"]) < 1e-5 and abs(first_eval["val_reward_rejected"]) < 1e-5
    assert first_eval["val_reward_accuracy"] == 0.5  # every reward is 0 up to rounding: all ties, 0.5 each
    # The first optimizer step's loss is computed before any update: ln 2 as well.
    assert steps[0]["step"] == 1 and steps[0]["loss"] == pytest.approx(LN2, abs=1e-5)
    assert abs(steps[0]["reward_chosen"]) < 1e-5 and abs(steps[0]["margin"]) < 1e-5


def test_training_learns_the_synthetic_preferences(tiny_setup, tmp_path):
    summary = train(train_config(tiny_setup, tmp_path / "run", epochs=2, eval_interval=16, beta=0.1))
    val = summary["last_val"]
    assert val["val_reward_accuracy"] > 0.6, val
    assert val["val_loss"] < LN2 - 0.05, val
    assert summary["best_val_loss"] <= val["val_loss"]


LAYOUTS = [(8, 1), (4, 2), (2, 4)]  # (batch_size, accumulate_step): global batch 8 each time


def test_gradient_accumulation_equivalence(tiny_setup, tmp_path):
    runs = {}
    for bs, acc in LAYOUTS:
        out = tmp_path / f"b{bs}x{acc}"
        train(train_config(tiny_setup, out, batch_size=bs, accumulate_step=acc, max_train_pairs=40, epochs=1,
                           val_split="", max_lr=1e-3, warmup_ratio=0.0))
        runs[(bs, acc)] = out
    base_steps, _ = read_metrics(runs[(8, 1)])
    assert len(base_steps) == 5  # 40 pairs / 8 per step; the last step is a full one too
    initial = load_file(tiny_setup / "model" / "model.safetensors")
    assert max_diff(weights(runs[(8, 1)]), initial) > 1e-3  # training moved the weights: the test can fail
    for layout in LAYOUTS[1:]:
        steps, _ = read_metrics(runs[layout])
        assert [s["step"] for s in steps] == [s["step"] for s in base_steps]
        for a, b in zip(steps, base_steps):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), layout
            assert a["pairs"] == b["pairs"] == 8
        assert max_diff(weights(runs[layout]), weights(runs[(8, 1)])) < 1e-5, layout


def test_a_partial_last_batch_is_weighted_exactly(tiny_setup, tmp_path):
    # 12 pairs with a global batch of 8: the second step has 4 real pairs and 4 weight-0 fillers.
    train(train_config(tiny_setup, tmp_path / "a", batch_size=8, max_train_pairs=12, val_split=""))
    train(train_config(tiny_setup, tmp_path / "b", batch_size=2, accumulate_step=4, max_train_pairs=12,
                       val_split=""))
    (a1, a2), (b1, b2) = read_metrics(tmp_path / "a")[0], read_metrics(tmp_path / "b")[0]
    assert (a1["pairs"], a2["pairs"]) == (b1["pairs"], b2["pairs"]) == (8, 4)
    assert a1["loss"] == pytest.approx(b1["loss"], abs=1e-5) and a2["loss"] == pytest.approx(b2["loss"], abs=1e-5)
    assert max_diff(weights(tmp_path / "a"), weights(tmp_path / "b")) < 1e-5


def test_resume_after_sigkill_logs_the_same_losses(tiny_setup, tmp_path):
    args = ["train", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"),
            "--batch_size", "4", "--epochs", "2", "--max_lr", "1e-3", "--eval_interval", "40", "--save_interval",
            "4", "--report_freq", "1", "--report_to", "none", "--no-gradient_checkpointing", "--seed", "0",
            "--max_val_pairs", "16"]
    full = run_cli(args + ["--output_dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr[-3000:]
    # stderr is a file here: lines, not bar refreshes; each evaluation one line; a table of them at the end
    assert "\r" not in full.stderr and "step 128/128 (epoch 2.00): loss " in full.stderr
    assert full.stderr.count("eval at step ") == len(read_metrics(tmp_path / "full")[1]) == 6  # 0, 40, 64, ...
    assert "Loading weights" not in full.stderr
    assert "| step | epoch | val_loss |" in full.stdout and "deprecated" not in full.stderr

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "refdpo", *args, "--output_dir", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    kill_at_checkpoint(proc, run, 12)
    assert not (run / "summary.json").exists()
    killed_at = json.loads((run / "last" / "trainer_state.json").read_text())
    assert 0 < killed_at["global_step"] < 64  # mid-epoch of the first of two 64-step epochs

    resumed = run_cli(args + ["--output_dir", str(run), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (sf, ef), (sr, er) = read_metrics(tmp_path / "full"), read_metrics(run)
    assert [s["step"] for s in sr] == [s["step"] for s in sf] == list(range(1, 129))
    for a, b in zip(sr, sf):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
    assert [e["step"] for e in er] == [e["step"] for e in ef]
    for a, b in zip(er, ef):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)
    assert max_diff(weights(run), weights(tmp_path / "full")) < 1e-6


def test_resume_keeps_what_the_run_optimises_and_records_what_it_may_change(tiny_setup, tmp_path):
    import yaml

    run, base = tmp_path / "run", dict(max_train_pairs=16, batch_size=4, val_split="", save_interval=2)
    train(train_config(tiny_setup, run, **base))
    config = (run / "config.yaml").read_bytes()
    assert yaml.safe_load(config)["output_dir"] == str(run.resolve())  # where the run is, not ''
    with pytest.raises(ConfigError) as refused:
        train(train_config(tiny_setup, run, resume=True, **base, beta=0.5, loss="ipo", max_lr=5e-3, epochs=2))
    for difference in ("--beta 0.1 -> 0.5", "--loss dpo -> ipo", "--max_lr 0.001 -> 0.005", "--epochs 1 -> 2"):
        assert difference in str(refused.value)
    assert "\n" not in str(refused.value) and not (run / "resumes.json").exists()

    train(train_config(tiny_setup, run, resume=True, **base, eval_interval=7))  # how it is watched may change
    assert (run / "config.yaml").read_bytes() == config
    (resume,) = json.loads((run / "resumes.json").read_text())
    assert resume["from"] == "step-0000004" and resume["changed"] == {"eval_interval": {"was": 1000, "now": 7}}


def test_checkpoints_best_and_last(tiny_setup, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    summary = train(train_config(tiny_setup, run, max_train_pairs=64, eval_interval=2, save_interval=3,
                                 beta=0.1, report_to="tensorboard"))
    best, last = (run / "best").resolve(), (run / "last").resolve()
    assert last.name == "step-0000008" and (last / "state").is_dir()
    assert summary["best_step"] == int(best.name.split("-")[1])
    if best != last:
        assert not (best / "state").exists()  # optimizer state is kept for `last` only
    assert {p.name for p in (run / "checkpoints").iterdir()} == {best.name, last.name}
    model = AutoModelForCausalLM.from_pretrained(run / "best")
    tokenizer = AutoTokenizer.from_pretrained(run / "best")
    assert model.config.vocab_size == len(tokenizer)
    state = json.loads((best / "trainer_state.json").read_text())
    assert state["best_val_loss"] == pytest.approx(summary["best_val_loss"])
    train_steps, evals = read_metrics(run)
    assert all("loss" in r and "lr" in r and "tokens_per_s" in r for r in train_steps)
    assert min(e["val_loss"] for e in evals) == pytest.approx(summary["best_val_loss"])
    assert (run / "config.yaml").exists() and (run / "summary.json").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {tag for events in {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
            for tag in EventAccumulator(str(events)).Reload().Tags()["scalars"]}
    assert {"train/loss", "train/lr", "eval/loss", "eval/reward_accuracy"} <= set(tags), tags


def test_refuses_to_overwrite_a_run(tiny_setup, tmp_path):
    train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=8, val_split=""))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=8, val_split=""))


@pytest.mark.parametrize("overrides", [
    {"loss": "ipo"}, {"loss": "hinge"}, {"loss": "cdpo", "label_smoothing": 0.1}, {"loss": "simpo", "beta": 2.0},
    {"ref_free": True, "beta": 10.0},
], ids=["ipo", "hinge", "cdpo", "simpo", "ref_free"])
def test_every_objective_trains(tiny_setup, tmp_path, overrides):
    summary = train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=32, max_val_pairs=16,
                                 eval_interval=2, **overrides))
    steps, evals = read_metrics(tmp_path / "run")
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert summary["best_val_loss"] < evals[0]["val_loss"]  # it optimised its own objective


def test_reference_columns_by_name_and_trl_aliases(tiny_setup, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (tiny_setup / "data" / f"{split}.jsonl").read_text().splitlines()]
        with open(data / f"{split}.jsonl", "w") as f:
            for r in rows[:16]:
                r["ref_chosen_logps"], r["ref_rejected_logps"] = r.pop("chosen_logprob"), r.pop("rejected_logprob")
                r["other_c"], r["other_r"] = r["ref_chosen_logps"] - 1.0, r["ref_rejected_logps"] + 1.0
                f.write(json.dumps(r) + "\n")
    setup = tmp_path
    shutil.copytree(tiny_setup / "model", setup / "model")
    train(train_config(setup, tmp_path / "trl", max_train_pairs=8))  # default names fall back to TRL's
    assert read_metrics(tmp_path / "trl")[1][0]["val_loss"] == pytest.approx(LN2, abs=1e-5)
    train(train_config(setup, tmp_path / "other", max_train_pairs=8, ref_columns="other_c,other_r"))
    # reference margin shifted by -2 nats: beta * h = 0.1 * 2 at step 0
    expected = math.log1p(math.exp(-0.2))
    assert read_metrics(tmp_path / "other")[1][0]["val_loss"] == pytest.approx(expected, abs=1e-5)


def _with_second_reference(tiny_setup: Path, folder: Path) -> Path:
    """The tiny setup with a second reference pair `other_c/other_r`: the stored one shifted per response by
    a random amount (an exponential tilt of the policy), so the two references disagree pair by pair."""
    rng = np.random.default_rng(0)
    (folder / "data").mkdir(parents=True)
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (tiny_setup / "data" / f"{split}.jsonl").read_text().splitlines()]
        with open(folder / "data" / f"{split}.jsonl", "w") as f:
            for r in rows:
                r["other_c"] = r["chosen_logprob"] - float(rng.uniform(0, 3))
                r["other_r"] = r["rejected_logprob"] - float(rng.uniform(0, 3))
                f.write(json.dumps(r) + "\n")
    shutil.copytree(tiny_setup / "model", folder / "model")
    return folder


def test_ref_mix_endpoints_are_the_two_references_and_between_is_the_geometric_mixture(tiny_setup, tmp_path):
    setup = _with_second_reference(tiny_setup, tmp_path / "setup")
    both = "other_c,other_r,chosen_logprob,rejected_logprob"
    common = dict(max_train_pairs=32, max_val_pairs=16, eval_interval=2, beta=0.5)
    runs = {"self": {}, "other": {"ref_columns": "other_c,other_r"},
            "mix0": {"ref_columns": both, "ref_mix": 0.0}, "mix1": {"ref_columns": both, "ref_mix": 1.0},
            "mix0.3": {"ref_columns": both, "ref_mix": 0.3}}
    logged = {}
    for name, overrides in runs.items():
        train(train_config(setup, tmp_path / name, **common, **overrides))
        steps, evals = read_metrics(tmp_path / name)
        logged[name] = [s["loss"] for s in steps] + [e["val_loss"] for e in evals]
    assert np.abs(np.subtract(logged["mix0"], logged["self"])).max() < 1e-6
    assert np.abs(np.subtract(logged["mix1"], logged["other"])).max() < 1e-6
    assert np.abs(np.subtract(logged["mix1"], logged["self"])).max() > 1e-3  # the references do differ
    # At step 0 the policy is the self reference: the mixture's offset is 0.3 x the other's, pair by pair.
    rows = [json.loads(line) for line in (setup / "data" / "val.jsonl").read_text().splitlines()][:16]
    h = np.array([-0.3 * ((r["other_c"] - r["chosen_logprob"]) - (r["other_r"] - r["rejected_logprob"]))
                  for r in rows], dtype=np.float64)
    expected = float(np.mean(np.log1p(np.exp(-0.5 * h))))
    assert read_metrics(tmp_path / "mix0.3")[1][0]["val_loss"] == pytest.approx(expected, abs=1e-5)
    config = yaml.safe_load((tmp_path / "mix0.3" / "config.yaml").read_text())
    assert (config["ref_columns"], config["ref_mix"]) == (both, 0.3)


@pytest.mark.parametrize("overrides, message", [
    ({"ref_mix": 0.5}, "--ref_mix needs four --ref_columns"),
    ({"ref_columns": "a,b,c,d"}, "say how to mix them with --ref_mix"),
    ({"ref_columns": "a,b,c,d", "ref_mix": 1.5}, r"--ref_mix must be in \[0, 1\]"),
    ({"ref_columns": "a,b,c,d", "ref_mix": 0.5, "ref_free": True}, "--ref_mix needs a reference"),
])
def test_ref_mix_refusals(tiny_setup, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_config(tiny_setup, tmp_path / "run", **overrides).validate()


def test_lora_trains_adapters_only(tiny_setup, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    monkeypatch.chdir(tiny_setup.parent)  # the base model named relative to here, as users do
    summary = train(train_config(tiny_setup, run, max_train_pairs=32, max_val_pairs=16, eval_interval=2,
                                 lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_lr=1e-2,
                                 model=f"{tiny_setup.name}/model"))
    adapter = json.loads((run / "best" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tiny_setup / "model").resolve())  # loadable from anywhere
    assert all(Path(summary[k]).is_absolute() for k in ("run_dir", "best", "last"))
    base = AutoModelForCausalLM.from_pretrained(tiny_setup / "model")
    tuned = PeftModel.from_pretrained(base, run / "best")
    lora_weights = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_weights and max(p.abs().max().item() for p in lora_weights) > 0  # B starts at 0


NO_CXX = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                            reason="torch.compile on CPU needs a C++ compiler")


@pytest.mark.parametrize("overrides", [{"gradient_checkpointing": True}, {"attn_implementation": "eager"},
                                       {"packing": False}, {"pack_capacity": 4096},
                                       pytest.param({"compile": True}, marks=NO_CXX)],
                         ids=["gradient_checkpointing", "eager_attention", "no_packing", "one_packed_row",
                              "torch_compile"])
def test_memory_and_attention_options_do_not_change_the_numbers(tiny_setup, tmp_path, overrides):
    base = dict(max_train_pairs=24, val_split="", batch_size=8)
    train(train_config(tiny_setup, tmp_path / "base", **base))
    train(train_config(tiny_setup, tmp_path / "other", **base, **overrides))
    for a, b in zip(read_metrics(tmp_path / "base")[0], read_metrics(tmp_path / "other")[0]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert max_diff(weights(tmp_path / "base"), weights(tmp_path / "other")) < 1e-5


@NO_CXX
def test_compile_with_gradient_checkpointing_compiles_the_training_step(tiny_setup, tmp_path, monkeypatch):
    """Layers compiled by evaluation first, then called from inside a checkpoint, used to run eagerly without a
    word (the losses equal to eager's to the last bit): the checkpoint now goes inside the compiled layer."""
    from torch._dynamo.utils import counters

    import refdpo.commands.train as rt

    original, graphs = rt._train_step, []

    def step(*args, **kwargs):
        if not graphs:
            counters.clear()  # count what the training steps compile, not the start-up checks or evaluation
        result = original(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return result

    monkeypatch.setattr(rt, "_train_step", step)
    train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=24, gradient_checkpointing=True,
                       compile=True))
    assert graphs and graphs[-1] >= 1


def test_bf16_mixed_precision_on_cpu(tiny_setup, tmp_path):
    train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=16, max_val_pairs=16, mixed_precision="bf16"))
    steps, evals = read_metrics(tmp_path / "run")
    assert all(math.isfinite(s["loss"]) for s in steps)
    assert evals[0]["val_loss"] == pytest.approx(LN2, abs=0.05)  # bf16 matmuls: only roughly ln 2


def test_wandb_without_the_package_is_a_clear_error(tiny_setup, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="needs the wandb package"):
        train(train_config(tiny_setup, tmp_path / "run", report_to="wandb"))


# --- schedules and step limits, as transformers defines them ---------------------------------------------------

@pytest.mark.parametrize("schedule", ["cosine", "constant_with_warmup"])
def test_schedule_and_warmup_steps_follow_transformers(tiny_setup, tmp_path, schedule):
    import torch
    from transformers import get_scheduler

    train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=48, epochs=2, val_split="",
                       lr_scheduler_type=schedule, warmup_steps=3, warmup_ratio=0.5))
    steps, _ = read_metrics(tmp_path / "run")
    assert len(steps) == 12  # 48 pairs / 8 per step x 2 epochs
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    expected = get_scheduler(schedule, optimizer, num_warmup_steps=3, num_training_steps=12)  # steps win over ratio
    for record in steps:
        assert record["lr"] == pytest.approx(expected.get_last_lr()[0], rel=1e-12, abs=1e-15)
        optimizer.step()
        expected.step()


def test_max_steps_stops_mid_epoch_with_a_final_evaluation(tiny_setup, tmp_path):
    summary = train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=64, max_val_pairs=16, epochs=3,
                                 max_steps=5, eval_interval=1000))
    steps, evals = read_metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5] and summary["steps"] == 5
    assert [e["step"] for e in evals] == [0, 5]  # before the first step, and at the last
    assert summary["best_step"] == 5 and summary["last"].endswith("step-0000005")
    # Past the epochs, as in transformers: 20 steps of 8 of 64 pairs are 2.5 epochs, where --epochs says 1.
    longer = train(train_config(tiny_setup, tmp_path / "long", max_train_pairs=64, epochs=1, max_steps=20,
                                val_split=""))
    assert longer["steps"] == 20
