"""`refdpo score` and `refdpo check`: self-reference gives ln 2, any tokenizer works, prior mode, kill-and-resume
byte-identical, two processes equal one, and `check` names what is wrong."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, run_cli, train_config

from refdpo.commands.check import CheckConfig, check
from refdpo.commands.score import ScoreConfig, score
from refdpo.commands.train import train
from refdpo.core.logprobs import reference_logprobs_float64
from refdpo.data import build_pairs, collate_pairs, load_split
from refdpo.data.pairs import reference_pairs
from refdpo.errors import ConfigError
from refdpo.modeling import pad_token_id
from refdpo.tokenization import load_tokenizer

LN2 = math.log(2)


def score_cfg(setup: Path, out: Path, **overrides) -> ScoreConfig:
    values = dict(model=str(setup / "model"), dataset=str(setup / "data"), split="train", out=str(out),
                  template="tulu", max_len=512, progress=False)
    values.update(overrides)
    return ScoreConfig(**values).validate()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_self_reference_scored_then_trained_gives_ln2_and_zero_rewards(tiny_setup, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):  # columns stripped, then scored afresh by the CLI
        records = read_jsonl(tiny_setup / "data" / f"{split}.jsonl")[:24]
        for r in records:
            del r["chosen_logprob"], r["rejected_logprob"]
        (tmp_path / "raw").mkdir(exist_ok=True)
        write_jsonl(tmp_path / "raw" / f"{split}.jsonl", records)
        done = run_cli(["score", "--model", str(tiny_setup / "model"), "--dataset", str(tmp_path / "raw"),
                        "--split", split, "--out", str(data / f"{split}.jsonl"), "--max_len", "512",
                        "--batch_tokens", "1024"])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "each row once" in done.stdout
    summary = train(train_config(tiny_setup, tmp_path / "run", dataset=str(data), epochs=1))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(e for e in evals if "val_loss" in e)
    first_step = next(e for e in evals if "loss" in e)
    assert first_eval["step"] == 0 and first_eval["val_loss"] == pytest.approx(LN2, abs=1e-5)
    assert abs(first_eval["val_reward_chosen"]) < 1e-5 and abs(first_eval["val_reward_rejected"]) < 1e-5
    assert first_step["loss"] == pytest.approx(LN2, abs=1e-5) and abs(first_step["margin"]) < 1e-5
    assert summary["steps"] == 3


def test_scores_equal_a_float64_computation(tiny_setup, tmp_path):
    out = tmp_path / "scored.jsonl"
    score(score_cfg(tiny_setup, out, split="val", batch_tokens=700))  # several length buckets
    tokenizer = load_tokenizer(str(tiny_setup / "model"))
    data = build_pairs(load_split(str(out), "train"), tokenizer, "tulu", 512, ("chosen_logprob", "rejected_logprob"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", dtype=torch.float64).eval()
    n = len(data)
    exact = reference_logprobs_float64(model, collate_pairs(data, np.arange(n), np.ones(n),
                                                            pad_token_id(tokenizer))).numpy()
    assert np.max(np.abs(data.ref_chosen - exact[:n])) < 1e-4
    assert np.max(np.abs(data.ref_rejected - exact[n:])) < 1e-4


def test_a_reference_with_another_tokenizer_scores_and_trains(tiny_setup, tmp_path):
    from refdpo.testbed.tiny import corpus, synthetic_pairs, tiny_llama, train_tokenizer

    other_tok = train_tokenizer(corpus(synthetic_pairs(200, seed=7)), vocab_size=384)
    ours = load_tokenizer(str(tiny_setup / "model"))
    assert len(other_tok) != len(ours) and other_tok.get_vocab() != ours.get_vocab()
    other = tiny_llama(other_tok, hidden=48, layers=1, heads=2, kv_heads=1, seed=3)
    other.save_pretrained(tmp_path / "other")
    other_tok.save_pretrained(tmp_path / "other")
    data = tmp_path / "data"
    for split in ("train", "val"):
        score(score_cfg(tiny_setup, data / f"{split}.jsonl", split=split, model=str(tmp_path / "other"),
                        columns="other_chosen,other_rejected"))
        records = read_jsonl(data / f"{split}.jsonl")
        assert {"chosen_logprob", "other_chosen", "other_rejected"} <= set(records[0])  # both references kept
        assert any(r["other_chosen"] != r["chosen_logprob"] for r in records)
    summary = train(train_config(tiny_setup, tmp_path / "run", dataset=str(data), max_train_pairs=32,
                                 ref_columns="other_chosen,other_rejected"))
    assert summary["steps"] == 4 and math.isfinite(summary["best_val_loss"])
    assert abs(summary["best_val_loss"] - LN2) > 1e-3  # another reference: not the policy's own ln 2


def test_prior_mode_equals_conditional_scoring_with_the_prompt_replaced(tiny_setup, tmp_path):
    prefix = "empty_user"
    score(score_cfg(tiny_setup, tmp_path / "prior.jsonl", split="val", mode="prior", prior_prefix=prefix))
    replaced = []
    for r in read_jsonl(tiny_setup / "data" / "val.jsonl"):
        head = [{"role": "user", "content": ""}]
        replaced.append({"chosen": head + r["chosen"][-1:], "rejected": head + r["rejected"][-1:]})
    (tmp_path / "replaced").mkdir()
    write_jsonl(tmp_path / "replaced" / "val.jsonl", replaced)
    score(score_cfg(tiny_setup, tmp_path / "cond.jsonl", dataset=str(tmp_path / "replaced"), split="val"))
    prior, cond = read_jsonl(tmp_path / "prior.jsonl"), read_jsonl(tmp_path / "cond.jsonl")
    assert len(prior) == len(cond) == 64
    for a, b in zip(prior, cond):
        assert a["chosen_logprob"] == pytest.approx(b["chosen_logprob"], abs=1e-5)
        assert a["rejected_logprob"] == pytest.approx(b["rejected_logprob"], abs=1e-5)
    conditional = read_jsonl(tiny_setup / "data" / "val.jsonl")
    assert all(a["chosen_logprob"] != c["chosen_logprob"] for a, c in zip(prior, conditional))
    entry = json.loads((tmp_path / "prior.jsonl.provenance.json").read_text())["references"]
    assert entry["chosen_logprob,rejected_logprob"]["mode"] == "prior"
    assert entry["chosen_logprob,rejected_logprob"]["prior_prefix"] == prefix


@pytest.mark.parametrize("prefix", ["assistant", "bos"])
def test_prior_without_a_user_turn_scores_the_documented_tokens(tiny_setup, tmp_path, prefix):
    """`assistant`: BOS <|assistant|>\n y </s>; `bos`: BOS y EOS. Scores equal float64 on exactly those tokens."""
    tokenizer = load_tokenizer(str(tiny_setup / "model"))
    raw = load_split(str(tiny_setup / "data"), "val")
    data, rendered = reference_pairs(raw, tokenizer, "tulu", 512, "drop", "prior", prefix)
    reply = raw.records[0]["chosen"][-1]["content"].strip()
    head = "<|assistant|>\n" if prefix == "assistant" else ""
    expected = tokenizer(f"{tokenizer.bos_token}{head}{reply}{tokenizer.eos_token}",
                         add_special_tokens=False)["input_ids"]
    assert data.chosen[0].input_ids.tolist() == expected
    assert data.chosen[0].response_start == len(tokenizer(f"{tokenizer.bos_token}{head}",
                                                          add_special_tokens=False)["input_ids"])
    score(score_cfg(tiny_setup, tmp_path / "prior.jsonl", split="val", mode="prior", prior_prefix=prefix))
    stored = read_jsonl(tmp_path / "prior.jsonl")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", dtype=torch.float64).eval()
    n = len(data)
    exact = reference_logprobs_float64(model, collate_pairs(data, np.arange(n), np.ones(n),
                                                            pad_token_id(tokenizer))).numpy()
    assert np.max(np.abs(np.array([r["chosen_logprob"] for r in stored]) - exact[:n])) < 1e-4
    assert np.max(np.abs(np.array([r["rejected_logprob"] for r in stored]) - exact[n:])) < 1e-4


def _scrub(path: Path) -> dict:
    """Provenance without its time stamp."""
    entries = json.loads(path.read_text())["references"]
    for entry in entries.values():
        entry.pop("created")
        entry.pop("coverage")
    return entries


def test_kill_and_resume_gives_byte_identical_output(tiny_setup, tmp_path):
    args = ["score", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"), "--split",
            "train", "--max_len", "512", "--batch_tokens", "256", "--save_every", "1", "--no-progress"]
    full = run_cli(args + ["--out", str(tmp_path / "full.jsonl")])
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed.jsonl"
    parts = tmp_path / "killed.jsonl.parts"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "refdpo", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(parts.glob("block-*.npz"))) < 5:
        time.sleep(0.002)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    manifest = json.loads((parts / "manifest.json").read_text())
    done = len(list(parts.glob("block-*.npz")))
    assert not out.exists() and 5 <= done < manifest["blocks"]

    resumed = run_cli(args + ["--out", str(out)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert out.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert not parts.exists()
    assert _scrub(tmp_path / "killed.jsonl.provenance.json") == _scrub(tmp_path / "full.jsonl.provenance.json")


@pytest.mark.parametrize("flags", [["--multi_gpu"], ["--use_fsdp", "--fsdp_version", "2"],
                                   ["--use_deepspeed", "--zero_stage", "3"]], ids=["ddp", "fsdp2", "zero3"])
def test_two_processes_score_each_row_once_and_equal_one_process(tiny_setup, tmp_path, flags):
    args = ["score", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"), "--split",
            "train", "--max_len", "512", "--batch_tokens", "512", "--save_every", "2", "--no-progress"]
    single = run_cli(args + ["--out", str(tmp_path / "one.jsonl")])
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(29800 + sum(map(len, flags))), "-m", "refdpo"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    double = subprocess.run(launch + args + ["--out", str(tmp_path / "two.jsonl")], capture_output=True,
                            text=True, env=env, timeout=600, cwd=REPO)
    assert double.returncode == 0, double.stderr[-3000:]
    if flags != ["--multi_gpu"]:  # training engines: scoring says it stays data-parallel
        assert "scoring is data-parallel under" in double.stderr
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert len(one) == len(two) == 256
    assert [r["prompt_id"] for r in one] == [r["prompt_id"] for r in two]
    for a, b in zip(one, two):
        assert b["chosen_logprob"] == pytest.approx(a["chosen_logprob"], abs=1e-5)
        assert b["rejected_logprob"] == pytest.approx(a["rejected_logprob"], abs=1e-5)
    coverage = json.loads((tmp_path / "two.jsonl.provenance.json").read_text())["references"][
        "chosen_logprob,rejected_logprob"]["coverage"]
    assert coverage == {"processes": 2, "rows_scored": 256, "duplicates": 0, "missing": 0, "unexpected": 0}


def test_check_flags_tulu_data_trained_with_zephyr(tiny_setup, tmp_path):
    report = check(CheckConfig(dataset=str(tiny_setup / "data"), split="val", model=str(tiny_setup / "model"),
                               template="zephyr", max_len=512, sample=16).validate())
    assert any("template 'tulu'" in w and "'zephyr'" in w for w in report["warnings"])  # from the provenance
    recompute = report["columns"]["chosen_logprob,rejected_logprob"]["recompute"]
    assert recompute["max_abs_diff"] > 1e-3
    assert any("template" in c and "'tulu'" in c for c in recompute["causes"])  # found by recomputing
    assert report["errors"]
    # Without the sidecar, the recomputation alone finds the cause.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "val.jsonl").write_bytes((tiny_setup / "data" / "val.jsonl").read_bytes())
    bare = check(CheckConfig(dataset=str(tmp_path / "bare"), split="val", model=str(tiny_setup / "model"),
                             template="zephyr", max_len=512, sample=16).validate())
    assert any("template: the stored values match template 'tulu'" in c
               for c in bare["columns"]["chosen_logprob,rejected_logprob"]["recompute"]["causes"])
    # The matching settings pass.
    good = check(CheckConfig(dataset=str(tiny_setup / "data"), split="val", model=str(tiny_setup / "model"),
                             template="tulu", max_len=512, sample=16).validate())
    assert not good["errors"] and not good["warnings"]
    assert good["columns"]["chosen_logprob,rejected_logprob"]["recompute"]["max_abs_diff"] < 1e-4


def test_check_flags_truncated_responses(tiny_setup, tmp_path):
    score(score_cfg(tiny_setup, tmp_path / "short.jsonl", split="val", max_len=44))
    report = check(CheckConfig(dataset=str(tmp_path / "short.jsonl"), model=str(tiny_setup / "model"),
                               template="tulu", max_len=512, sample=64).validate())
    assert any("max_len 44" in w for w in report["warnings"])
    causes = report["columns"]["chosen_logprob,rejected_logprob"]["recompute"]["causes"]
    assert any(c.startswith("truncation") for c in causes), causes
    cli = run_cli(["check", "--dataset", str(tmp_path / "short.jsonl"), "--model", str(tiny_setup / "model"),
                   "--max_len", "512"])
    assert cli.returncode == 1 and "truncation" in cli.stdout


def test_train_warns_on_a_provenance_mismatch_and_strict_refuses(tiny_setup, tmp_path, caplog):
    with pytest.raises(ConfigError, match="template 'tulu'.*'zephyr'"):
        train(train_config(tiny_setup, tmp_path / "strict", template="zephyr", strict=True, max_train_pairs=8))
    caplog.set_level("INFO")
    train(train_config(tiny_setup, tmp_path / "lenient", template="zephyr", max_train_pairs=8))
    assert any("insert_eos" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert any("is the policy itself" in r.getMessage() for r in caplog.records)


def test_check_recomputes_a_prior_reference_with_its_own_rendering(tiny_setup, tmp_path):
    score(score_cfg(tiny_setup, tmp_path / "prior.jsonl", split="val", mode="prior", prior_prefix="assistant"))
    # The policy trains with zephyr; the prior reference was rendered with tulu's assistant header: not an error.
    report = check(CheckConfig(dataset=str(tmp_path / "prior.jsonl"), model=str(tiny_setup / "model"),
                               template="zephyr", max_len=512, sample=16).validate())
    recompute = report["columns"]["chosen_logprob,rejected_logprob"]["recompute"]
    assert not report["errors"] and recompute["max_abs_diff"] < 1e-4 and recompute["template"] == "tulu"
