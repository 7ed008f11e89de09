"""Configuration: defaults, YAML + CLI precedence, the seed's and TRL's flag names, booleans, validation on
construction (the Python API gets the CLI's messages), clear errors."""

from __future__ import annotations

import dataclasses

import pytest

from refdpo.commands.train_config import SCHEDULERS, TrainConfig, parse_train_args
from refdpo.config import aliases, build_parser, load_yaml, save_yaml
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
    options = build_parser("refdpo train", TrainConfig)._option_string_actions
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


# --- other tools' names: every alias is its field, as a flag and as a YAML key ------------------------------

BASE = ["--model", "m", "--dataset", "d"]
# A value for each alias that differs from its field's default (switch aliases take none).
ALIAS_VALUES = {"max_lr": "2e-6", "batch_size": "3", "eval_batch_size": "5", "accumulate_step": "2", "epochs": "4",
                "max_len": "256", "report_freq": "7", "eval_interval": "9", "save_interval": "11",
                "train_split": "tr", "val_split": "va", "model": "other/model", "dataset": "other/data",
                "dataset_config": "mistral", "lora": "true"}


@pytest.mark.parametrize("flag", sorted(aliases(TrainConfig)))
def test_every_alias_is_its_field_as_flag_and_yaml(flag, tmp_path):
    dest, switch = aliases(TrainConfig)[flag]
    if dest is None:  # accepted and ignored: the config is the one without it
        assert parse_train_args(BASE + [flag]) == parse_train_args(BASE)
        return
    alias_argv = [flag] if switch is not None else [flag, ALIAS_VALUES[dest]]
    own_argv = [f"--{dest}", str(switch) if switch is not None else ALIAS_VALUES[dest]]
    by_alias, by_own = parse_train_args(BASE + alias_argv), parse_train_args(BASE + own_argv)
    assert by_alias == by_own
    assert by_alias != parse_train_args(BASE), f"{flag} changed nothing"
    # The same in a YAML file, under the alias's name.
    path = tmp_path / "c.yaml"
    key = flag.lstrip("-")
    path.write_text(f"model: m\ndataset: d\n{key}: {'true' if switch is not None else ALIAS_VALUES[dest]}\n")
    assert parse_train_args(["--config", str(path)]) == by_own


def test_a_trl_command_line_parses():
    cfg = parse_train_args(["--model_name_or_path", "Qwen/Qwen2-0.5B-Instruct", "--dataset_name",
                            "trl-lib/ultrafeedback_binarized", "--learning_rate", "5.0e-7", "--num_train_epochs",
                            "1.0", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8",
                            "--gradient_checkpointing", "True", "--logging_steps", "25", "--eval_steps", "50",
                            "--output_dir", "Qwen2-0.5B-DPO", "--bf16", "true", "--max_length", "1024",
                            "--use_peft", "--lora_r", "32", "--lora_alpha", "16", "--warmup_steps", "10",
                            "--lr_scheduler_type", "cosine", "--max_steps", "100"])
    assert (cfg.model, cfg.dataset, cfg.max_lr, cfg.epochs, cfg.batch_size, cfg.accumulate_step) == (
        "Qwen/Qwen2-0.5B-Instruct", "trl-lib/ultrafeedback_binarized", 5e-7, 1, 2, 8)
    assert (cfg.gradient_checkpointing, cfg.report_freq, cfg.eval_interval, cfg.mixed_precision, cfg.max_len) == (
        True, 25, 50, "bf16", 1024)
    assert (cfg.lora, cfg.lora_r, cfg.lora_alpha, cfg.warmup_steps, cfg.lr_scheduler_type, cfg.max_steps) == (
        True, 32, 16, 10, "cosine", 100)
    assert parse_train_args(BASE + ["--bf16", "false"]).mixed_precision is None


@pytest.mark.parametrize("argv, expected", [
    ([], True), (["--packing"], True), (["--packing", "false"], False), (["--packing", "0"], False),
    (["--packing", "no"], False), (["--no-packing"], False), (["--no-packing", "--packing", "TRUE"], True),
    (["--packing=off"], False),
])
def test_booleans_take_a_value_or_none(argv, expected):
    assert parse_train_args(BASE + argv).packing is expected


@pytest.mark.parametrize("argv", [["--packing", "maybe"], ["--no-packing", "true"], ["--epochs", "2.5"]])
def test_bad_boolean_or_integer_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_train_args(BASE + argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("refdpo train: error: ") and "--help" in lines[0], lines


def test_one_spelling_per_concept_across_commands():
    """--overwrite (not --force), --max_lr (not --lr), --push_to_hub a switch, wherever they occur."""
    from refdpo.commands.score import ScoreConfig
    from refdpo.testbed.demo import DemoConfig
    from refdpo.testbed.tiny import TinyConfig

    for cls in (TrainConfig, ScoreConfig, DemoConfig, TinyConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & {"force", "lr", "learning_rate"}, cls.__name__
    for cls in (ScoreConfig, DemoConfig, TinyConfig):
        assert "overwrite" in {f.name for f in dataclasses.fields(cls)}
    assert {f.name: f.type for f in dataclasses.fields(ScoreConfig)}["push_to_hub"] == "bool"
    assert {f.name: f.type for f in dataclasses.fields(TrainConfig)}["push_to_hub"] == "bool"


# --- the Python API validates on construction, with the CLI's messages ------------------------------------

@pytest.mark.parametrize("values, message, argv", [
    ({"beta": -1}, "--beta must be a positive number", ["--beta", "-1"]),
    ({"loss": "cdpo"}, "--loss cdpo needs --label_smoothing > 0", ["--loss", "cdpo"]),
    ({"lr_scheduler_type": "exotic"}, "--lr_scheduler_type must be one of", ["--lr_scheduler_type", "exotic"]),
    ({"max_steps": -1}, "--max_steps", ["--max_steps", "-1"]),
    ({"epochs": "three"}, "field 'epochs' must be int", None),
    ({"beta": None}, "field 'beta' cannot be null", None),
])
def test_configs_validate_on_construction(values, message, argv):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(model="m", dataset="d", **values)
    if argv is not None:  # the command line says the same
        with pytest.raises(ConfigError, match=message):
            parse_train_args(BASE + argv)


def test_values_from_code_are_coerced_and_required_inputs_checked_when_run():
    cfg = TrainConfig(beta="0.5", epochs=2.0)  # YAML-like strings and whole floats become their types
    assert (cfg.beta, cfg.epochs) == (0.5, 2)
    with pytest.raises(ConfigError, match="--model is required"):
        cfg.require()
    cfg.require("model", "dataset")  # a loaded model and a Dataset object stand in for them


def test_schedulers_are_transformers_own():
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    for name in SCHEDULERS:
        assert name in {s.value for s in SchedulerType}
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10)
        optimizer.step()
        scheduler.step()


def test_version_flag(capsys):
    from refdpo import __version__
    from refdpo.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"refdpo {__version__}"
