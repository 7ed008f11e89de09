"""Checkpoints written so that a kill at any moment loses nothing already written.

Run folder:
  checkpoints/step-0001200/   HF model (save_pretrained, safetensors) + tokenizer + config,
                              state/ (accelerate save_state: optimizer, scheduler, RNG; only in `last`),
                              trainer_state.json (epoch, step, best val loss, ...)
  last -> checkpoints/step-…  the newest resumable checkpoint
  best -> checkpoints/step-…  lowest validation loss so far
A checkpoint is built in a hidden temporary folder and renamed into place when complete; `last` and `best` are
symlinks swapped with an atomic rename. Older checkpoints are removed only after the links point elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE = "state"
TRAINER_STATE = "trainer_state.json"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _point(run_dir: Path, name: str, target: Path) -> None:
    """Atomically make run_dir/name a symlink to `target` (relative, so the run folder can be moved)."""
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, run_dir), tmp)
    os.replace(tmp, run_dir / name)


def resolve(run_dir: str | Path, name: str) -> Path | None:
    """The checkpoint folder that `last` or `best` points to, if any."""
    link = Path(run_dir) / name
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def export_model(accelerator, model, tokenizer, out: Path) -> None:
    """save_pretrained of the unwrapped model (gathered under ZeRO-3/FSDP) and the tokenizer. Collective."""
    state_dict = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(out, state_dict=state_dict,
                                                    is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(out)


def save_checkpoint(accelerator, model, tokenizer, run_dir: Path, step: int, trainer_state: dict,
                    is_best: bool) -> Path:
    """Save a resumable checkpoint for `step`, point `last` (and `best`) at it, prune the rest. Collective."""
    final = run_dir / CHECKPOINTS / f"step-{step:07d}"
    tmp = run_dir / CHECKPOINTS / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    export_model(accelerator, model, tokenizer, tmp)
    accelerator.save_state(str(tmp / STATE))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / TRAINER_STATE, trainer_state)
        stale = None
        if final.exists():  # left by a run killed between this rename and the link swap below
            stale = final.with_name(f".stale-{final.name}")
            os.replace(final, stale)
        os.replace(tmp, final)
        _point(run_dir, "last", final)
        if is_best:
            _point(run_dir, "best", final)
        prune(run_dir)
        if stale is not None:
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def prune(run_dir: Path) -> None:
    """Remove checkpoints no link points to, and the optimizer state of any that is not `last`."""
    keep = {p for p in (resolve(run_dir, "last"), resolve(run_dir, "best")) if p is not None}
    last = resolve(run_dir, "last")
    for folder in (run_dir / CHECKPOINTS).iterdir():
        if folder.name.startswith("."):
            continue
        if folder.resolve() not in keep:
            shutil.rmtree(folder)
        elif folder.resolve() != last and (folder / STATE).exists():
            shutil.rmtree(folder / STATE)


def load_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def latest_resumable(run_dir: Path) -> Path | None:
    """`last`, or if a kill left that link dangling, the newest complete checkpoint with optimizer state."""
    last = resolve(run_dir, "last")
    if last is not None and (last / STATE).is_dir() and (last / TRAINER_STATE).is_file():
        return last
    folder = run_dir / CHECKPOINTS
    candidates = sorted(p for p in folder.glob("step-*") if (p / STATE).is_dir() and (p / TRAINER_STATE).is_file()) \
        if folder.is_dir() else []
    return candidates[-1] if candidates else None


def model_path(path: str) -> str:
    """A run folder (with best/last links) stands for its best checkpoint; anything else is loaded as given."""
    best = resolve(Path(path), "best") if (Path(path) / CHECKPOINTS).is_dir() else None
    return str(best) if best else path
