"""Plain helpers for the tests (import with `from helpers import ...`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_config(setup: Path, out: Path, **overrides):
    """A TrainConfig for the tiny setup: small, fast, fp32 on the CPU, no trackers."""
    from refdpo.commands.train import TrainConfig
    from refdpo.config import from_dict

    values = dict(model=str(setup / "model"), dataset=str(setup / "data"), template="tulu", max_len=512,
                  epochs=1, batch_size=8, accumulate_step=1, max_lr=1e-3, eval_interval=1000, report_freq=1,
                  gradient_checkpointing=False, report_to="none", output_dir=str(out), seed=0)
    values.update(overrides)
    return from_dict(values, TrainConfig)


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600, cwd: Path = REPO):
    """Run `python -m refdpo ARGS` in a subprocess; returns the CompletedProcess (text mode)."""
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "refdpo", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl."""
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def weights(run: Path, name: str = "last") -> dict:
    """The exported weights of a run's `last` (or `best`) checkpoint."""
    from safetensors.torch import load_file

    return load_file(run / name / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def kill_at_checkpoint(proc, run: Path, step: int, timeout: float = 300) -> None:
    """SIGKILL `proc` (started with start_new_session=True) and every process of its group as soon as
    `run/last` points at checkpoint `step` or later; fails if the run ended first."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        last = run / "last"
        if last.is_symlink() and last.resolve().name >= f"step-{step:07d}":
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
