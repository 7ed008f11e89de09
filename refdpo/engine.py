"""Which distributed engine a run is on, as accelerate set it up: recorded with every run (log, summary.json,
the first metrics.jsonl line) so that a result says how it was made."""

from __future__ import annotations

import dataclasses


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
    """One phrase for the log: 'DEEPSPEED ZeRO-3, 2 processes on cuda:0, bf16'."""
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
