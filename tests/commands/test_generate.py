"""`refdpo generate`: AlpacaEval-format outputs, the degeneration detector, bad prompts."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import run_cli

from refdpo.commands.generate import GenerateConfig, generate, load_prompts, repeated_ngram_share
from refdpo.errors import DataError
from refdpo.tokenization import load_tokenizer

PROMPTS = ["Why do people like bees?", "Name a blue fruit.", "Say hi.", "Tell me about a clever whale.",
           "What is a tall tree?"]


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": p, **({"dataset": "koala"} if i == 1 else {})}) + "\n"
                            for i, p in enumerate(PROMPTS)))
    return path


def _with_generation_config(tiny_setup, tmp_path, name: str, **settings):
    """A copy of the tiny model whose generation config constrains what it may emit."""
    from transformers import GenerationConfig

    folder = tmp_path / name
    shutil.copytree(tiny_setup / "model", folder)
    config = GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").exists() \
        else GenerationConfig()
    for key, value in settings.items():
        setattr(config, key, value)
    config.save_pretrained(folder)
    return folder


def test_outputs_are_alpaca_eval_json_and_a_model_that_never_ends_is_flagged(tiny_setup, tmp_path, prompts_file):
    eos = load_tokenizer(str(tiny_setup / "model")).eos_token_id
    never = _with_generation_config(tiny_setup, tmp_path, "never-ends", suppress_tokens=[eos])
    stats = generate(GenerateConfig(model=str(never), prompts=str(prompts_file), out=str(tmp_path / "out.json"),
                                    max_new_tokens=16, batch_size=2).validate())
    outputs = json.loads((tmp_path / "out.json").read_text())
    assert [o["instruction"] for o in outputs] == PROMPTS  # the prompts' order, whatever the batching
    for o in outputs:
        assert set(o) == {"instruction", "output", "generator", "dataset"} and isinstance(o["output"], str)
        assert o["generator"] == "never-ends"
    assert [o["dataset"] for o in outputs] == ["prompts", "koala", "prompts", "prompts", "prompts"]
    assert stats["no_eos"] == stats["degenerate"] == 5 and stats["length_tokens"]["max"] == 16
    assert stats["flagged"]["no_eos"] == [0, 1, 2, 3, 4]
    assert json.loads((tmp_path / "out.stats.json").read_text()) == stats


def test_a_model_that_ends_at_once_is_not_degenerate(tiny_setup, tmp_path, prompts_file):
    tokenizer = load_tokenizer(str(tiny_setup / "model"))
    only_eos = [t for t in range(len(tokenizer)) if t != tokenizer.eos_token_id]
    ends = _with_generation_config(tiny_setup, tmp_path, "ends", suppress_tokens=only_eos)
    stats = generate(GenerateConfig(model=str(ends), prompts=str(prompts_file), out=str(tmp_path / "out.json"),
                                    max_new_tokens=16).validate())
    assert stats["degenerate"] == 0 and stats["no_eos"] == 0 and stats["length_tokens"]["max"] == 0
    assert all(o["output"] == "" for o in json.loads((tmp_path / "out.json").read_text()))


def test_repeated_ngram_share():
    assert repeated_ngram_share(list(range(40)), 4) == 0.0
    assert repeated_ngram_share([1, 2, 3] * 20, 4) == pytest.approx(1 - 3 / 57)
    assert repeated_ngram_share([1, 1, 1], 4) == 0.0  # too short to judge


def test_bad_prompts_name_the_row_and_alpaca_eval_offline_is_one_line(tmp_path, tiny_setup):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"question": "no instruction"}\n')
    with pytest.raises(DataError, match=r"row 1 \(line 2\): field 'instruction'"):
        load_prompts(str(bad))
    offline = run_cli(["generate", "--model", str(tiny_setup / "model"), "--prompts", "alpaca_eval",
                       "--out", str(tmp_path / "o.json")], env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert offline.returncode == 2
    errors = [line for line in offline.stderr.splitlines() if line.startswith("refdpo generate: error:")]
    assert len(errors) == 1 and "--prompts" in errors[0]


def test_a_model_goes_by_its_runs_name(tmp_path):
    """generate's generator name and tables: a run's checkpoints do not all read "best"."""
    from refdpo.checkpoint import CHECKPOINTS, model_name

    run = tmp_path / "dpo-beta0.1"
    (run / CHECKPOINTS / "step-0000008").mkdir(parents=True)
    assert [model_name(str(p)) for p in (run, run / "best", run / "last", run / CHECKPOINTS / "step-0000008")] == [
        "dpo-beta0.1", "dpo-beta0.1", "dpo-beta0.1-last", "dpo-beta0.1-step-0000008"]
    assert model_name("mistralai/Mistral-7B-v0.1") == "Mistral-7B-v0.1" and model_name(str(tmp_path) + "/") == tmp_path.name
