"""Plain helpers for the tests (import with `from helpers import ...`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_config(setup: Path, out: Path, **overrides):
    """A TrainConfig for the tiny setup: small, fast, fp32 on the CPU, no trackers."""
    from refdpo.commands.train_config import TrainConfig
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


# --- records, scoring and the CLI, in-process ----------------------------------------------------------------

KEY = "chosen_logprob,rejected_logprob"
COLUMNS = ("chosen_logprob", "rejected_logprob")


def read_jsonl(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, records: list[dict]) -> None:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_split(folder: Path, records: list[dict], name: str = "train") -> Path:
    """folder/{name}.jsonl holding `records` (no provenance sidecar); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / f"{name}.jsonl", records)
    return folder


def scored(setup: Path, out: Path, dataset: Path | None = None, split: str = "val", **overrides) -> dict:
    """Run `refdpo score` in-process on the tiny setup (default: its val split, template tulu, max_len 512)."""
    from refdpo.commands.score import ScoreConfig, score

    values = dict(model=str(setup / "model"), dataset=str(dataset or setup / "data"), split=split, out=str(out),
                  template="tulu", max_len=512, progress=False)
    values.update(overrides)
    return score(ScoreConfig(**values).validate())


def entry_of(out: Path, key: str = KEY) -> dict:
    """The provenance entry of a scored output's column pair."""
    from refdpo import provenance as prov

    return prov.read(prov.sidecar_path(out))[key]


def run_main(argv: list[str], capsys, code: int = 2) -> tuple[str, list[str]]:
    """Run the CLI in-process; it must exit with `code`. Returns (stdout, stderr lines)."""
    import pytest

    from refdpo.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return out, err.splitlines()
