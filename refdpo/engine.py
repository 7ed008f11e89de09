"""Which distributed engine a run is on: set up from what `accelerate launch` asked for, refused when it would
be another, and recorded with every run (log, summary.json, the first metrics.jsonl line).

accelerate decides the engine from its launcher's environment, and on a machine without a GPU it quietly
decides otherwise: a launched FSDP or DeepSpeed run becomes plain data parallelism (or, without
ACCELERATE_USE_CPU, every process a single independent run writing the same folder). `make_accelerator` sets
up what was asked for on a CPU too (gloo process group; FSDP2 and DeepSpeed run there), and `check_engine`
refuses, in one line, any run whose engine or process count is not the one requested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch

from refdpo.errors import ConfigError, RefdpoError

ENGINES = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}

# DeepSpeed (when installed) otherwise warns on stdout, in every process of a machine without a GPU, that it
# found none; every command and the Python API import this module before anything imports DeepSpeed.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def requested_engine() -> dict:
    """What the launcher's environment asks for: {engine: DEEPSPEED | FSDP | None, zero_stage, fsdp_version,
    world_size}."""
    want: dict = {"engine": None, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        want["engine"] = "DEEPSPEED"
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config and os.path.isfile(config):
            with contextlib.suppress(OSError, ValueError):  # DeepSpeed itself names what is wrong with the file
                stage = json.loads(Path(config).read_text()).get("zero_optimization", {}).get("stage", stage)
        want["zero_stage"] = int(stage) if stage not in (None, "") else None
    elif _flag("ACCELERATE_USE_FSDP"):
        want.update(engine="FSDP", fsdp_version=int(os.environ.get("FSDP_VERSION", "1")))
    return want


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def start_processes() -> bool:
    """Set up this process's place in the launch (accelerate's PartialState) as the launcher asked, also on a
    machine without a GPU; returns the `cpu` flag an Accelerator must then be given."""
    from accelerate import PartialState

    want = requested_engine()
    cpu, backend = False, {}
    if "LOCAL_RANK" in os.environ and not _has_accelerator():  # started by a launcher, on CPUs
        if want["engine"] == "DEEPSPEED":
            # accelerate turns DeepSpeed off on a CPU launch, and without a backend leaves each process alone;
            # DeepSpeed itself runs on CPUs over gloo.
            os.environ.pop("ACCELERATE_USE_CPU", None)
            backend = {"backend": "gloo"}
        else:
            cpu = True  # one gloo process group, not independent processes
    PartialState(cpu=cpu, **backend)
    return cpu


def make_accelerator(cpu: bool, **kwargs):
    """The Accelerator for a launch set up by `start_processes` (`cpu`: what it returned), with the engine the
    launcher asked for; refuses (one line, ConfigError) a run that would be another. `kwargs` go to Accelerator."""
    from accelerate import Accelerator

    want = requested_engine()
    if want.get("fsdp_version") == 1:
        raise ConfigError("FSDP1 is not supported: resuming it loses the optimizer state (accelerate loads it "
                          "before the optimizer has any); launch with --fsdp_version 2 (configs/fsdp.yaml)")
    if want["engine"] == "DEEPSPEED" and "LOCAL_RANK" not in os.environ:
        raise ConfigError("DeepSpeed was asked for (ACCELERATE_USE_DEEPSPEED=true) but this process was not "
                          "started by a launcher: run `accelerate launch --use_deepspeed ... -m refdpo train ...`")
    accelerator = Accelerator(cpu=cpu, **kwargs)
    if want["engine"] == "FSDP" and accelerator.distributed_type.value == "MULTI_CPU":
        _enable_fsdp(accelerator)
    check_engine(describe_engine(accelerator), want)
    return accelerator


def _enable_fsdp(accelerator) -> None:
    """accelerate keeps FSDP for GPU-type process groups; on a gloo group PyTorch's FSDP2 works as well."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    from accelerate import PartialState

    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState itself does


def check_engine(got: dict, want: dict) -> None:
    """Refuse a run whose engine or process count is not what the launcher asked for."""
    if want["world_size"] > got["num_processes"]:
        raise ConfigError(
            f"WORLD_SIZE is {want['world_size']} but this process group has {got['num_processes']} process"
            f"{'es' if got['num_processes'] != 1 else ''}: the processes would train independently into one run "
            f"folder; start them with `accelerate launch --num_processes {want['world_size']} -m refdpo train ...`")
    if want["engine"] is None:
        return
    name = ENGINES[want["engine"]]
    detail = {"DEEPSPEED": "zero_stage", "FSDP": "fsdp_version"}[want["engine"]]
    if got["distributed_type"] != want["engine"]:
        hint = "" if "LOCAL_RANK" in os.environ else " (start it with `accelerate launch`)"
        raise ConfigError(f"{name} was asked for (ACCELERATE_USE_{want['engine']}=true) but this run would be "
                          f"{engine_name(got)}: refusing to train with another engine than the one asked for{hint}")
    if want.get(detail) is not None and got.get(detail) != want[detail]:
        raise ConfigError(f"{name} {detail} {want[detail]} was asked for but this run would be {engine_name(got)}")


def describe_engine(accelerator) -> dict:
    """{distributed_type, num_processes, device, mixed_precision, and zero_stage or fsdp_version}."""
    state = accelerator.state
    info = {"distributed_type": state.distributed_type.value, "num_processes": accelerator.num_processes,
            "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision}
    # accelerate's state has a plugin attribute only for the engine in effect (reading another one raises).
    if info["distributed_type"] == "DEEPSPEED":
        info["zero_stage"] = state.deepspeed_plugin.zero_stage
    elif info["distributed_type"] == "FSDP":
        info["fsdp_version"] = getattr(state.fsdp_plugin, "fsdp_version", 1)
    return info


def engine_name(info: dict) -> str:
    """One phrase for the log: 'DEEPSPEED ZeRO-3, 2 processes on cpu, bf16'."""
    name = info["distributed_type"]
    if "zero_stage" in info:
        name += f" ZeRO-{info['zero_stage']}"
    if "fsdp_version" in info:
        name += f" (FSDP{info['fsdp_version']})"
    plural = "es" if info["num_processes"] != 1 else ""
    return f"{name}, {info['num_processes']} process{plural} on {info['device']}, {info['mixed_precision']}"


def keep_fsdp2_outputs_dtype(accelerator) -> None:
    """accelerate's FSDP2 bf16 policy casts every unit's outputs to bf16, the LM head's included, so the tiled
    head's float32 log-probs would come back with 8 bits: let outputs keep the dtype they are computed in
    (PyTorch's default; the decoder layers compute in bf16 anyway). Call before `prepare`."""
    try:
        plugin = accelerator.state.fsdp_plugin
    except AttributeError:  # not an FSDP run
        return
    policy = getattr(plugin, "mixed_precision_policy", None)
    if getattr(plugin, "fsdp_version", 1) == 2 and getattr(policy, "output_dtype", None) is not None:
        plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)


def main_process_first(accelerator, load):
    """`load()` in the main process first, then in the others (which then find its work in the disk cache).
    Unlike accelerate's context manager, an error in the main process still reaches the barrier, so no process
    waits forever: the others then meet the same error in their own `load()`."""
    if accelerator.num_processes == 1:
        return load()
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = load()
        except RefdpoError as e:
            error = e
    accelerator.wait_for_everyone()
    if error is not None:
        raise error
    return result if accelerator.is_main_process else load()
