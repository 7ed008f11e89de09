"""`refdpo sweep`: a two-beta, two-objective grid gives the table; a killed sweep resumes; --dry-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import REPO, run_cli

from refdpo.commands.sweep import dry_run, load_grid
from refdpo.errors import ConfigError


def _grid(tiny_setup, tmp_path) -> tuple:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "model": str(tiny_setup / "model"), "dataset": str(tiny_setup / "data"), "max_len": 512, "epochs": 1,
        "batch_size": 8, "max_train_pairs": 32, "max_val_pairs": 16, "max_lr": 1e-3, "eval_interval": 2,
        "report_freq": 1, "gradient_checkpointing": False, "report_to": "none", "seed": 0}))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": str(base), "out": str(tmp_path / "sweep"),
                                    "grid": {"beta": [0.1, 0.5], "loss": ["dpo", "ipo"]}}))
    return grid, tmp_path / "sweep"


def test_a_killed_sweep_resumes_and_gives_the_table(tiny_setup, tmp_path):
    grid, out = _grid(tiny_setup, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "refdpo", "sweep", "--grid", str(grid)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "beta0.1-lossdpo" / "summary.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not first.exists():
        time.sleep(0.01)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished_at = first.stat().st_mtime_ns

    done = run_cli(["sweep", "--grid", str(grid)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert first.stat().st_mtime_ns == finished_at  # the finished run was not redone
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["beta"], r["loss"]) for r in rows] == [(0.1, "dpo"), (0.1, "ipo"), (0.5, "dpo"), (0.5, "ipo")]
    for row in rows:
        summary = json.loads((out / row["run"] / "summary.json").read_text())
        assert row["best_step"] == summary["best_step"]
        # The table's loss is the best checkpoint re-evaluated: the run's own best validation loss.
        assert row["val_loss"] == pytest.approx(summary["best_val_loss"], abs=1e-6)
        assert 0 <= row["val_reward_accuracy"] <= 1 and row["val_pairs"] == 16
    assert "| beta0.1-lossdpo |" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().splitlines()[0].startswith("run,beta,loss,best_step,val_pairs")


def test_dry_run_and_bad_grids(tiny_setup, tmp_path):
    grid, out = _grid(tiny_setup, tmp_path)
    commands = dry_run(load_grid(grid))
    assert len(commands) == 4 and all(c.startswith("accelerate launch -m refdpo train --config ") for c in commands)
    assert commands[1].endswith(f"--beta 0.1 --loss ipo --output_dir {out / 'beta0.1-lossipo'}")
    cli = run_cli(["sweep", "--grid", str(grid), "--dry-run"])
    assert cli.returncode == 0 and cli.stdout.count("accelerate launch") == 4 and not out.exists()
    bad = tmp_path / "bad.yaml"
    for spec, message in (({"out": "x", "grid": {"beta": 0.1}}, "non-empty list"),
                          ({"out": "x", "grid": {"betta": [0.1]}}, "unknown field"),
                          ({"grid": {"beta": [0.1]}}, "'out'"), ({"out": "x", "grids": {}}, "unknown key")):
        bad.write_text(yaml.safe_dump(spec))
        with pytest.raises(ConfigError, match=message):
            load_grid(bad)


def test_a_sweep_can_generate_for_each_run(tiny_setup, tmp_path):
    from refdpo.commands.sweep import sweep

    grid, out = _grid(tiny_setup, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Why do people like bees?"}\n{"instruction": "Say hi."}\n')
    spec = load_grid(grid)
    spec["grid"] = [{"beta": [0.1]}]
    spec["generate"] = {"prompts": str(prompts), "max_new_tokens": 8}
    (row,) = sweep(spec)
    outputs = json.loads((out / "beta0.1" / "outputs.json").read_text())
    assert [o["generator"] for o in outputs] == ["beta0.1", "beta0.1"]
    assert row["length_mean"] <= 8 and 0 <= row["degenerate"] <= 2


def test_a_run_is_evaluated_with_every_setting_it_trained_with():
    """The best checkpoint is evaluated as the run trained: dpo_weight, revision, tokenizer, layout, attention."""
    from refdpo.commands.sweep import evaluation_config
    from refdpo.commands.train_config import TrainConfig

    cfg = TrainConfig(model="m", dataset="d", dpo_weight=0.5, revision="abc", tokenizer="t", packing=False,
                      attn_implementation="eager", on_truncated="error", eval_batch_size=3,
                      max_val_pairs=7).validate()
    evaluated = evaluation_config(cfg, "best", "val")
    assert (evaluated.dpo_weight, evaluated.revision, evaluated.tokenizer, evaluated.packing,
            evaluated.attn_implementation, evaluated.on_truncated) == (0.5, "abc", "t", False, "eager", "error")
    assert (evaluated.model, evaluated.split, evaluated.batch_size, evaluated.max_pairs) == ("best", "val", 3, 7)
