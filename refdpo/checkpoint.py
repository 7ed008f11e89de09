"""Checkpoints: what they hold, written so that a kill at any moment loses nothing, and read back to resume.

Run folder:
  checkpoints/step-0001200/   HF model (save_pretrained, safetensors) + config + the tokenizer's own files,
                              state/ (the resumable state: optimizer, scheduler, RNG, not the weights again;
                              only in `last`; under DeepSpeed its own checkpoint),
                              trainer_state.json (epoch, step, best val loss, ...)
  last -> checkpoints/step-…  the newest resumable checkpoint
  best -> checkpoints/step-…  lowest validation loss so far
A checkpoint is built in a hidden temporary folder and renamed into place when complete; `last` and `best` are
symlinks swapped with an atomic rename. Older checkpoints are removed only after the links point elsewhere.

The resumable state is written with accelerate's own helpers: the optimizer (sharded under FSDP), the learning-
rate schedule and every process's random-number generators. Under DeepSpeed `state/` is DeepSpeed's checkpoint,
whose float32 master weights are optimizer state; for ZeRO-1/2 the module's copy of the weights is dropped from
it (the optimizer's master copy restores them). Resuming loads the export into the model (broadcast from the
main process under FSDP2), then the state.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch

from refdpo.errors import ConfigError, RefdpoError, first_line
from refdpo.io import atomic_write_bytes, atomic_write_json
from refdpo.tokenization import save_tokenizer

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
STATE = "state"
TRAINER_STATE = "trainer_state.json"


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


def run_folder(output_dir: str) -> Path:
    """`output_dir`, or runs/<date-time> chosen by the main process and shared with the others."""
    from datetime import datetime

    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    name = [output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}"]
    if PartialState().num_processes > 1:
        broadcast_object_list(name)
    return Path(name[0])


def claim_run_folder(run_dir: Path, accelerator, if_exists: bool = False, held=None):
    """The main process's lock on the run folder (`lock_run_dir`; `held`: the one it took already). Every
    process calls this, and all refuse together when another run holds it. `if_exists`: lock only a folder that
    exists already (None otherwise), so that a run refused later for its data creates nothing."""
    from accelerate.utils import broadcast_object_list

    lock, problem = held, [None]
    if accelerator.is_main_process and held is None and not (if_exists and not run_dir.exists()):
        lock, holder = lock_run_dir(run_dir)
        if lock is None:
            problem[0] = (f"{run_dir} is being written by another run (pid {holder}): two runs would overwrite "
                          "each other's checkpoints; wait for it to end, or pick another --output_dir")
    if accelerator.num_processes > 1:
        broadcast_object_list(problem)
    if problem[0]:
        raise ConfigError(problem[0])
    return lock


def resume_point(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (`resume`), or None; refuse to write into a folder holding another run."""
    found = latest_resumable(run_dir) if run_dir.exists() else None
    if resume:
        if found is None:
            log.warning("--resume: %s has no complete checkpoint yet; starting from step 0", run_dir)
        return found
    if found is not None or (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run: continue it with --resume, or pick another "
                          "--output_dir")
    return None


def record_resume(run_dir: Path, checkpoint: Path, changes: dict) -> None:
    """Append a resume, and the settings it changed ({field: (was, now)}), to the run's resumes.json (its
    config.yaml stays as the run started)."""
    path = run_dir / "resumes.json"
    resumes = json.loads(path.read_text()) if path.exists() else []
    resumes.append({"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from": checkpoint.name,
                    "changed": {name: {"was": was, "now": now} for name, (was, now) in changes.items()}})
    atomic_write_json(path, resumes)
    for name, (was, now) in changes.items():
        log.info("resumed with --%s %s (was %s): recorded in %s", name, now, was, path)


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
    """Save a resumable checkpoint for `step` (the export, and the resumable state beside it), point `last`
    (and `best`) at it, prune the rest. Collective."""

    final = run_dir / CHECKPOINTS / f"step-{step:07d}"
    tmp = run_dir / CHECKPOINTS / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    from safetensors import SafetensorError

    try:
        export_model(accelerator, model, tokenizer, tmp)
        save_state(accelerator, model, optimizer, scheduler, tmp / STATE)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, a vanished folder: keep what was saved
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = resolve(run_dir, "last")
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise RefdpoError(f"cannot save the checkpoint of step {step} in {run_dir}: {reason}; "
                          + (f"`last` still points to {kept.name}, resume from it with --resume" if kept
                             else "no checkpoint was saved before")) from None
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


def model_name(path: str) -> str:
    """What a model goes by in tables and outputs: a run folder or its `best` is the run's name; its `last` or
    one of its checkpoints adds which; anything else is its folder's (or hub id's) last part."""
    p = Path(path.rstrip("/"))
    if (p / CHECKPOINTS).is_dir():
        return p.name
    if p.name == "best" and (p.parent / CHECKPOINTS).is_dir():
        return p.parent.name
    if p.name == "last" and (p.parent / CHECKPOINTS).is_dir():
        return f"{p.parent.name}-last"
    if p.parent.name == CHECKPOINTS:
        return f"{p.parent.parent.name}-{p.name}"
    return p.name


def model_path(path: str) -> str:
    """A run folder (with best/last links) stands for its best checkpoint, which is the initial model when
    validation was best at step 0 (its summary.json says which); anything else is loaded as given."""
    run = Path(path)
    if not (run / CHECKPOINTS).is_dir():
        return path
    best = resolve(run, "best")
    if best is None and (run / "summary.json").is_file():
        summary = json.loads((run / "summary.json").read_text())
        return summary["best"] if summary.get("best_step") == 0 and summary.get("best") else path
    return str(best) if best else path


# --- the resumable state beside the export --------------------------------------------------------------

DEEPSPEED_TAG = "pytorch_model"  # accelerate's folder name for DeepSpeed's checkpoint, kept for old runs


def save_state(accelerator, model, optimizer, scheduler, folder: Path) -> None:
    """Everything needed to resume but the weights (the export, one folder up). Collective."""
    from accelerate.checkpointing import save_accelerator_state
    from accelerate.utils import save_fsdp_optimizer

    folder.mkdir(parents=True, exist_ok=True)
    engine, optimizers = accelerator.distributed_type.value, []
    if engine == "DEEPSPEED":
        model.save_checkpoint(str(folder), DEEPSPEED_TAG)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and accelerator.state.deepspeed_plugin.zero_stage < 3:
            _drop_module_weights(folder / DEEPSPEED_TAG / "mp_rank_00_model_states.pt")
    elif engine == "FSDP":
        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(folder))
    else:
        optimizers = [optimizer]
    save_accelerator_state(str(folder), [], optimizers, [scheduler], [], accelerator.process_index,
                           accelerator.step, accelerator.scaler)


def _drop_module_weights(path: Path) -> None:
    """ZeRO-1/2 store the module's weights beside the optimizer's float32 master copy: keep only the master."""

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["module"] = {}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(accelerator, model, optimizer, scheduler, checkpoint: Path) -> None:
    """Restore the weights (the export, or DeepSpeed's own checkpoint) and the state saved by `save_state`."""
    from accelerate.checkpointing import load_accelerator_state
    from accelerate.utils import load_fsdp_optimizer

    folder = checkpoint / "state"
    engine, optimizers = accelerator.distributed_type.value, []
    if engine == "DEEPSPEED":
        # ZeRO-1/2's module copy was dropped at save: the master weights restore the parameters.
        model.load_checkpoint(str(folder), DEEPSPEED_TAG, load_module_strict=False,
                              custom_load_fn=lambda src, dst: None)
    else:
        load_weights(accelerator, model, checkpoint)
        if engine == "FSDP":
            load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(folder))
        else:
            optimizers = [optimizer]
    load_accelerator_state(str(folder), [], optimizers, [scheduler], [], accelerator.process_index,
                           accelerator.scaler, map_location="cpu" if accelerator.device.type == "cpu" else None)


def read_export(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `save_pretrained` folder (one file or an index of shards)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(folder / name))
    return weights


def load_weights(accelerator, model, checkpoint: Path) -> None:
    """Load the checkpoint's exported weights into the (prepared) model: in place under DDP, broadcast from the
    main process and sharded under FSDP2. Only a tied output head may be absent from the export."""
    base = accelerator.unwrap_model(model)
    if hasattr(base, "peft_config"):
        if accelerator.distributed_type.value == "FSDP":
            raise ConfigError("resuming a LoRA run under FSDP is not supported: resume it with DDP or DeepSpeed")
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(base, load_file(checkpoint / "adapter_model.safetensors"))
        return
    weights = read_export(checkpoint) if accelerator.is_main_process or accelerator.distributed_type.value != \
        "FSDP" else {}
    expected = set(base.state_dict())
    if weights and (missing := expected - set(weights) - {tied_head_key(base)}):
        raise ConfigError(f"{checkpoint}: the exported model lacks {len(missing)} weight(s), e.g. "
                          f"{sorted(missing)[0]}: it cannot resume this run")
    if accelerator.distributed_type.value == "FSDP":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                      broadcast_from_rank0=True, strict=False))
    else:
        base.load_state_dict(weights, strict=False)
