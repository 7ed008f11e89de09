"""`refdpo merge`: the merged model computes what base + adapter computes, checked against float64."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import run_main, train_config

from refdpo.commands.merge import MergeConfig, merge
from refdpo.commands.train import train
from refdpo.errors import ConfigError
from refdpo.tokenization import PROBE, load_tokenizer

TOL = 1e-4  # nats: float32 log-probs of this tiny Llama vs the float64 computation of the same weights


@pytest.fixture(scope="module")
def lora_run(tiny_setup, tmp_path_factory):
    """A LoRA run of 4 steps at a large learning rate, so that B (initialised to 0) is far from 0."""
    run = tmp_path_factory.mktemp("merge") / "run"
    train(train_config(tiny_setup, run, max_train_pairs=32, val_split="", lora=True, lora_r=4, lora_alpha=8,
                       lora_dropout=0.0, max_lr=5e-2))
    return run


def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) at every position, in the model's dtype then float64."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].double()


def test_merged_model_computes_base_plus_adapter(tiny_setup, lora_run, tmp_path, capsys):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    stdout, _ = run_main(["merge", "--adapter", str(lora_run), "--out", str(out)], capsys, code=0)
    adapter = lora_run / "last"  # a run folder without validation stands for its last checkpoint
    assert f"merged {adapter.resolve()} (LoRA r 4, alpha 8) into {tiny_setup / 'model'}" in stdout

    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "merge.json"} <= files
    assert not {n for n in files if n.startswith("adapter_")} and not list(tmp_path.glob(".merged*"))
    record = json.loads((out / "merge.json").read_text())
    assert record["lora"]["r"] == 4 and record["lora"]["alpha"] == 8 and record["dtype"] == "float32"
    assert "model.layers.0.self_attn.q_proj" in record["lora"]["target_modules"]

    base = AutoModelForCausalLM.from_pretrained(tiny_setup / "model").eval()
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, str(adapter)).eval()  # adapters active, not merged
    peft64 = copy.deepcopy(peft).double()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # loads as a plain model
    assert not hasattr(merged, "peft_config")

    # One module by hand: W + (alpha / r) B A, in float64.
    lora = load_file(adapter / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = 8 / 4 * lora[f"{prefix}.lora_B.weight"].double() @ lora[f"{prefix}.lora_A.weight"].double()
    assert delta.abs().max() > 1e-3  # the adapter is not the identity: the test can fail
    w = merged.state_dict()["model.layers.0.self_attn.q_proj.weight"].double()
    assert (w - base_weights["model.layers.0.self_attn.q_proj.weight"].double() - delta).abs().max() < 1e-6

    ids = torch.randint(3, base.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    reference = _logprobs(peft64, ids)
    assert (_logprobs(merged, ids) - reference).abs().max() <= TOL
    assert (_logprobs(peft, ids) - reference).abs().max() <= TOL
    with peft.disable_adapter():
        assert (_logprobs(peft, ids) - reference).abs().max() > 100 * TOL  # the adapter changes the model

    # The tokenizer is the one training used, reloading to the same ids.
    ours, theirs = load_tokenizer(str(out)), load_tokenizer(str(adapter))
    assert all(ours(t)["input_ids"] == theirs(t)["input_ids"] for t in PROBE)


def test_existing_out_is_refused_and_replaced_with_overwrite(lora_run, tmp_path):
    from safetensors.torch import load_file

    first = merge(MergeConfig(adapter=str(lora_run / "last"), out=str(tmp_path / "m")).validate())
    f32 = load_file(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'm'} exists: pass --overwrite"):
        merge(MergeConfig(adapter=str(lora_run / "last"), out=first["out"], dtype="bfloat16").validate())
    merge(MergeConfig(adapter=str(lora_run / "last"), out=first["out"], dtype="bfloat16", overwrite=True).validate())
    bf16 = load_file(tmp_path / "m" / "model.safetensors")
    # Merged in float32 and rounded once: exactly the float32 merge cast to bfloat16.
    assert bf16.keys() == f32.keys() and all(bf16[k].dtype == torch.bfloat16 for k in bf16)
    assert all(torch.equal(bf16[k], f32[k].to(torch.bfloat16)) for k in f32)
    assert json.loads((tmp_path / "m" / "merge.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old folder left


@pytest.mark.parametrize("case", ["full_weights", "missing", "no_weights"])
def test_bad_adapter_is_one_line_naming_it(tiny_setup, lora_run, tmp_path, capsys, case):
    import shutil

    folder = {"full_weights": tiny_setup / "model", "missing": tmp_path / "nowhere"}.get(case, tmp_path / "a")
    if case == "no_weights":  # adapter_config.json without the adapter's tensors
        shutil.copytree(lora_run / "last", folder)
        (folder / "adapter_model.safetensors").unlink()
    _, err = run_main(["merge", "--adapter", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert len(err) == 1 and err[0].startswith(f"refdpo merge: error: {folder}: ")
    assert {"full_weights": "not a LoRA checkpoint", "missing": "no such folder",
            "no_weights": "no adapter_model.safetensors"}[case] in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("given", [True, False], ids=["--base", "adapter_config"])
def test_missing_base_is_one_line_naming_it(lora_run, tmp_path, capsys, given):
    import shutil

    adapter, gone = tmp_path / "adapter", tmp_path / "gone"
    shutil.copytree(lora_run / "last", adapter)
    if not given:  # the base the run trained from has moved since
        settings = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": str(gone)}))
    _, err = run_main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "out")]
                      + ["--base", str(gone)] * given, capsys)
    assert len(err) == 1 and err[0].startswith(f"refdpo merge: error: {gone}: no such base model folder")
    assert ("pass --base" in err[0]) != given
    assert not (tmp_path / "out").exists()
