"""Checkpoints written so that a kill at any moment loses nothing already written.

Run folder:
  checkpoints/step-0001200/   HF model (save_pretrained, safetensors) + config + the tokenizer's own files,
                              state/ (resume.py: optimizer, scheduler, RNG, not the weights again; only in
                              `last`),
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

from refdpo.tokenization import save_tokenizer

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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


_LOCKS: dict[Path, object] = {}  # this process's open locks: a run that failed in-process (a sweep) and is
# retried must reuse its own lock, as flock refuses a second open file of the same process too


def lock_run_dir(run_dir: Path):
    """Create `run_dir` and take an exclusive lock on its `.lock` for as long as the returned file stays open
    (the kernel releases it when the process ends, killed or not). Returns (lock file, None), or (None, the
    holder's pid as written) when another process holds it: two runs must not write one folder at once."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    held = _LOCKS.get(run_dir.resolve())
    if held is not None and not held.closed:
        return held, None
    handle = open(run_dir / ".lock", "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        return None, holder
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _LOCKS[run_dir.resolve()] = handle
    return handle, None


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


def full_state_dict(accelerator, model) -> dict:
    """The model's whole state dict on the main process (gathered under ZeRO-3 and FSDP2; FSDP2's own
    accelerate path returns sharded DTensors), tied weights once: the keys a 1-process export has. Collective."""
    if accelerator.distributed_type.value == "FSDP":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif accelerator.distributed_type.value == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        # What accelerate's get_state_dict returns only when the DeepSpeed config sets
        # stage3_gather_16bit_weights_on_model_save (else it raises): gathered module by module, in the
        # module's dtype (bf16 under DeepSpeed's bf16; its float32 master copy is in the optimizer state).
        state_dict = model._zero3_consolidated_16bit_state_dict() or {}  # None off the main process
    else:
        state_dict = accelerator.get_state_dict(model)
    head_key = tied_head_key(accelerator.unwrap_model(model))
    if head_key in state_dict and len(state_dict) > 1:
        del state_dict[head_key]  # the embeddings' weight, saved once; from_pretrained ties it again
    return state_dict


def tied_head_key(model) -> str | None:
    """The state-dict key of the output head's weight when it is tied to the input embeddings, else None."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if head is None or embeddings is None or not getattr(config, "tie_word_embeddings", False):
        return None
    return next((f"{name}.weight" for name, module in model.named_modules() if module is head), None)


def export_model(accelerator, model, tokenizer, out: Path) -> None:
    """save_pretrained of the unwrapped model (gathered under ZeRO-3/FSDP) and the tokenizer. Collective."""
    state_dict = full_state_dict(accelerator, model)
    accelerator.unwrap_model(model).save_pretrained(out, state_dict=state_dict,
                                                    is_main_process=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_tokenizer(tokenizer, out)


def save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, run_dir: Path, step: int,
                    trainer_state: dict, is_best: bool) -> Path:
    """Save a resumable checkpoint for `step` (the export, and the state of resume.py beside it), point `last`
    (and `best`) at it, prune the rest. Collective."""
    from refdpo.resume import save_state

    final = run_dir / CHECKPOINTS / f"step-{step:07d}"
    tmp = run_dir / CHECKPOINTS / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    export_model(accelerator, model, tokenizer, tmp)
    save_state(accelerator, model, optimizer, scheduler, tmp / STATE)
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
