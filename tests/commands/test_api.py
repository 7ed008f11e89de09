"""The Python API (README "Coming from TRL"): the README's example runs as written; train takes Dataset objects,
a loaded model and tokenizer, and records what it trained."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from helpers import REPO, read_jsonl, train_config

from refdpo import TrainConfig, train
from refdpo.errors import ConfigError


def readme_python() -> str:
    text = (REPO / "README.md").read_text()
    (code,) = re.findall(r"<!-- python-api -->\n```python\n(.*?)```", text, flags=re.S)
    return code


def test_readme_example_runs_as_written(tiny_setup, tmp_path):
    code = readme_python()
    assert 10 <= len(code.strip().splitlines()) <= 16
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(tiny_setup)  # what `refdpo tiny --out runs/tiny` made
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(r"4 steps; val loss \d\.\d{4}, reward accuracy [\d.]+\n", result.stdout), result.stdout
    for noise in ("Loading weights", "Removed shared tensor", "deprecated"):  # filtered as the CLI filters them
        assert noise not in result.stderr, noise
    summary = json.loads((tmp_path / "runs" / "api" / "run" / "summary.json").read_text())
    assert summary["data"]["train"]["data_format"] == "standard" and summary["steps"] == 4


def test_train_takes_a_datasetdict_a_model_and_a_tokenizer(tiny_setup, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM

    from refdpo.tokenization import load_tokenizer

    records = read_jsonl(tiny_setup / "data" / "train.jsonl")[:16]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                                   "val": datasets.Dataset.from_list(records[:8])})
    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model")
    cfg = train_config(tiny_setup, tmp_path / "run", model="", dataset="")
    summary = train(cfg, model=model, tokenizer=load_tokenizer(str(tiny_setup / "model")), train_dataset=splits)
    assert summary["steps"] == 2 and summary["data"]["val"]["pairs"] == 8
    recorded = (tmp_path / "run" / "config.yaml").read_text()
    assert f"model: {tiny_setup / 'model'}" in recorded  # the model's own name, not ''
    assert summary["data"]["train"]["data_format"] == "messages"


def test_a_model_in_another_dtype_or_nothing_to_train_on_is_refused(tiny_setup, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="has bfloat16 weights but the config says dtype float32"):
        train(train_config(tiny_setup, tmp_path / "run"), model=model)
    with pytest.raises(ConfigError, match="--dataset is required"):
        train(TrainConfig(model=str(tiny_setup / "model")))


def test_a_field_set_after_construction_is_checked_when_training(tiny_setup, tmp_path):
    cfg = train_config(tiny_setup, tmp_path / "run")
    cfg.beta = -1.0
    with pytest.raises(ConfigError, match="--beta must be a positive number"):
        train(cfg)
    assert not (tmp_path / "run").exists()
