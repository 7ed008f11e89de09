"""Plain helpers for the tests (import with `from helpers import ...`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_config(setup: Path, out: Path, **overrides):
    """A TrainConfig for the tiny setup: small, fast, fp32 on the CPU, no trackers."""
    from refdpo.config import from_dict

    values = dict(model=str(setup / "model"), dataset=str(setup / "data"), template="tulu", max_len=512,
                  epochs=1, batch_size=8, accumulate_step=1, max_lr=1e-3, eval_interval=1000, report_freq=1,
                  gradient_checkpointing=False, report_to="none", output_dir=str(out), seed=0)
    values.update(overrides)
    return from_dict(values)


def run_cli(args: list[str], env: dict | None = None, timeout: int = 600, cwd: Path = REPO):
    """Run `python -m refdpo ARGS` in a subprocess; returns the CompletedProcess (text mode)."""
    import subprocess

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "refdpo", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)
