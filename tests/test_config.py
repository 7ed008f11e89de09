"""Configuration: defaults, YAML + CLI precedence, the seed's flag names, clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from refdpo.commands.train import ALIASES, TrainConfig, parse_train_args
from refdpo.config import build_parser, load_yaml, save_yaml
from refdpo.errors import ConfigError

SEED_COMMAND = ["--cuda", "--dataset", "yale-nlp/RefDPO", "--data_split", "mistral", "--epoch", "3", "--beta",
                "0.1", "--dpo_weight", "1.0", "--model_type", "HuggingFaceH4/mistral-7b-sft-beta", "--insert_eos",
                "-l"]


def test_the_seeds_command_parses_unchanged():
    cfg = parse_train_args(SEED_COMMAND)
    assert (cfg.dataset, cfg.dataset_config, cfg.epochs, cfg.beta, cfg.dpo_weight) == (
        "yale-nlp/RefDPO", "mistral", 3, 0.1, 1.0)
    assert cfg.model == "HuggingFaceH4/mistral-7b-sft-beta"
    assert cfg.template == "zephyr" and cfg.ref_free is False
    # the paper's defaults (seed main.py): lr 5e-7, 4 pairs/GPU, max_len 2048, warmup 10%, eval every 500
    assert (cfg.max_lr, cfg.batch_size, cfg.accumulate_step, cfg.max_len) == (5e-7, 4, 1, 2048)
    assert (cfg.warmup_ratio, cfg.eval_interval, cfg.max_grad_norm, cfg.seed) == (0.1, 500, 1.0, 18890426)


def test_the_seeds_ref_free_command_parses():
    argv = [a if a != "0.1" else "10.0" for a in SEED_COMMAND] + ["--ref_free"]
    cfg = parse_train_args(argv)
    assert cfg.ref_free and cfg.beta == 10.0 and not cfg.objective.uses_reference


def test_seed_internal_settings_are_flags():
    cfg = parse_train_args(["--model", "m", "--dataset", "d", "--max_lr", "1e-6", "--batch_size", "2",
                            "--accumulate_step", "4", "--max_len", "1024", "--eval_interval", "50",
                            "--warmup_ratio", "0.05", "--report_freq", "5", "--seed", "7", "--output_dir", "o"])
    assert (cfg.max_lr, cfg.batch_size, cfg.accumulate_step, cfg.max_len, cfg.eval_interval) == (1e-6, 2, 4, 1024, 50)
    assert (cfg.warmup_ratio, cfg.report_freq, cfg.seed, cfg.output_dir) == (0.05, 5, 7, "o")


def test_every_field_is_a_flag_in_both_spellings():
    options = build_parser("refdpo train", TrainConfig, aliases=ALIASES)._option_string_actions
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in options, f.name
        assert f"--{f.name.replace('_', '-')}" in options, f.name
    cfg = parse_train_args(["--model", "m", "--dataset", "d", "--on-truncated", "error", "--no-gradient-checkpointing"])
    assert cfg.on_truncated == "error" and cfg.gradient_checkpointing is False


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndataset: d\nbeta: 0.01\nmax_lr: 5.0e-7\nepochs: 2\nref_free: true\n")
    cfg = parse_train_args(["--config", str(path), "--beta", "0.02", "--no-ref_free"])
    assert (cfg.beta, cfg.max_lr, cfg.epochs, cfg.ref_free) == (0.02, 5e-7, 2, False)


def test_saved_config_loads_back(tmp_path):
    cfg = parse_train_args(SEED_COMMAND + ["--max_lr", "3e-7"])
    save_yaml(cfg, tmp_path / "config.yaml")
    again = parse_train_args(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg


@pytest.mark.parametrize("text,message", [
    ("model: m\ndataset: d\nbetta: 0.1\n", "unknown field(s): betta"),
    ("model: m\ndataset: d\nepochs: three\n", "field 'epochs' must be int"),
    ("model: m\ndataset: d\nepochs: 2.5\n", "field 'epochs' must be int"),
    ("model: m\ndataset: d\nbeta: true\n", "field 'beta' must be float"),
    ("- a\n- b\n", "expected a mapping"),
    ("model: [unclosed\n", "invalid YAML"),
])
def test_bad_yaml_names_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse_train_args(["--config", str(path)])
    assert str(path) in str(info.value) and message in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "d"], "--model is required"),
    (["--model", "m", "--dataset", "d", "--beta", "0"], "--beta must be a positive"),
    (["--model", "m", "--dataset", "d", "--loss", "cdpo"], "--label_smoothing > 0"),
    (["--model", "m", "--dataset", "d", "--report_to", "mlflow"], "--report_to"),
])
def test_invalid_values(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_train_args(argv)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such config file"):
        load_yaml("/nonexistent/c.yaml")
