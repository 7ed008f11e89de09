"""The resumable state of a run: what a checkpoint holds beside its exported model, and loading both back.

A checkpoint folder is `save_pretrained`'s export (the weights, once) plus `state/`: the optimizer (sharded under
FSDP), the learning-rate schedule and every process's random-number generators, written with accelerate's own
helpers. Under DeepSpeed `state/` is DeepSpeed's checkpoint, whose float32 master weights are optimizer state;
for ZeRO-1/2 the module's copy of the weights is dropped from it (the optimizer's master copy restores them).
Resuming loads the export into the model (broadcast from the main process under FSDP2), then the state.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from refdpo.errors import ConfigError

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
    from refdpo.checkpoint import atomic_write_bytes

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
    from refdpo.checkpoint import tied_head_key

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
