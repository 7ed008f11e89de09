"""Loading the policy and frozen models: attention backend, dtype, gradient checkpointing, LoRA, Liger, compile.

The tokenizer is never modified. RefDPO added a `<pad>` token and resized the embeddings (which needs gathering
under ZeRO-3 and changes the model); padding positions are masked out of attention and loss, so any existing
id pads: the tokenizer's pad token, else EOS.
"""

from __future__ import annotations

import torch

from refdpo.config import INFERENCE_DTYPES
from refdpo.errors import ConfigError, RefdpoError, first_line
from refdpo.io import local_or_hub, require_local


def pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """auto: FlashAttention-2 when installed and on a GPU, else PyTorch's sdpa."""
    from transformers.utils import is_flash_attn_2_available

    if requested == "auto":
        return "flash_attention_2" if device.type == "cuda" and is_flash_attn_2_available() else "sdpa"
    if requested == "flash_attention_2" and not is_flash_attn_2_available():
        raise ConfigError("--attn_implementation flash_attention_2 needs the flash-attn package and a GPU "
                          "(pip install flash-attn), or use sdpa")
    if requested not in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        raise ConfigError(f"unknown --attn_implementation {requested!r}")
    return requested


def _from_pretrained(spec, dtype: torch.dtype, attn: str, **kwargs) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    require_local(spec.model, "the model: --model")
    # A local folder by its absolute path: the model's name_or_path is what a LoRA adapter records as its base.
    try:
        return AutoModelForCausalLM.from_pretrained(local_or_hub(spec.model), revision=spec.revision, dtype=dtype,
                                                    attn_implementation=attn,
                                                    trust_remote_code=spec.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise RefdpoError(f"cannot load model {spec.model!r}: {first_line(e) or type(e).__name__}") from None


def load_policy(cfg, device: torch.device, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The trainable policy, as configured: loaded, or `model` (already loaded, from the Python API) prepared the
    same way. Under DeepSpeed ZeRO-3 the Accelerator must exist already, so that from_pretrained partitions the
    weights while loading them (a model handed over is partitioned only when accelerate prepares it)."""
    if model is None:
        attn = resolve_attn_implementation(cfg.attn_implementation, device)
        model = _from_pretrained(cfg, getattr(torch, cfg.dtype), attn)
    else:
        dtype = next(model.parameters()).dtype
        if dtype != getattr(torch, cfg.dtype):
            raise ConfigError(f"the model given has {str(dtype).removeprefix('torch.')} weights but the config says "
                              f"dtype {cfg.dtype}: set dtype to match (the run records it)")
        if cfg.lora and hasattr(model, "peft_config"):
            raise ConfigError("the model given has LoRA adapters already: train them with lora=False")
    model.config.use_cache = False
    if cfg.gradient_checkpointing and not cfg.compile:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.liger:
        _apply_liger(model)
    if cfg.compile:
        # Layer by layer, not the whole model: refdpo redirects the LM head's forward at call time (core/lm_head.py),
        # which a whole-model graph would bake in; the layers share one compiled graph. With gradient
        # checkpointing the checkpoint goes inside each compiled layer: a layer called from inside a checkpoint
        # is run eagerly by dynamo without a word (measured: training losses equal to eager to the last bit).
        for layer in _decoder_layers(model):
            if cfg.gradient_checkpointing:
                layer.forward = _checkpointed(layer.forward)
            layer.compile()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout,
                          target_modules=targets if targets == "all-linear" else targets.split(","))
        model = get_peft_model(model, lora)
    return model


def _apply_liger(model: torch.nn.Module) -> None:
    """Liger's fused Triton kernels for the model's RMSNorm, SwiGLU MLP and rotary embedding (GPU only). Its
    fused linear cross-entropy is not used: refdpo's own chunked head computes the log-probs DPO needs."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ConfigError("--liger needs the liger-kernel package (GPU): pip install 'refdpo[liger]'") from None
    _apply_liger_kernel_to_instance(model=model, rms_norm=True, swiglu=True, rope=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)


def _checkpointed(forward):
    """`forward` under non-reentrant activation checkpointing (recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"--compile: {type(model).__name__} has no model.layers to compile")
    return list(layers)


def default_device() -> torch.device:
    """Where a single-process command (check, analyze, generate) runs a model: the GPU if there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a GPU that has it, else float32 (on a CPU, the exactness the float64 checks assume)."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    if name not in INFERENCE_DTYPES:
        raise ConfigError(f"--dtype must be {' | '.join(INFERENCE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def load_frozen(spec, device: torch.device, dtype: torch.dtype, device_map: str | None = None) -> torch.nn.Module:
    """A model for inference only (a reference to score with, a checkpoint to check): eval mode, no gradients,
    on `device`, or spread over every visible GPU (and CPU) by `device_map` ("auto") for a model too large for
    one."""
    attn = resolve_attn_implementation(spec.attn_implementation, device)
    kwargs = {"device_map": device_map} if device_map else {}
    model = _from_pretrained(spec, dtype, attn, **kwargs)
    if not device_map:
        model.to(device)
    model.eval().requires_grad_(False)
    return model


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go: its embeddings' device (the first GPU of a device map)."""
    return model.get_input_embeddings().weight.device


def reset_accelerate_state() -> None:
    """accelerate keeps its settings in process-wide singletons; a second run in the same process (tests,
    sweeps) must not inherit the first one's precision or accumulation steps. Single process only."""
    import os

    from accelerate.state import AcceleratorState, GradientState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()
        GradientState._reset_state()


def load_vllm(spec, **kwargs):
    """A vLLM engine for `spec` (a ModelSpec + InferenceSpec config); vLLM is an optional package."""
    try:
        from vllm import LLM
    except ImportError:
        raise ConfigError("--backend vllm needs the vllm package (pip install vllm)") from None
    return LLM(model=spec.model, tokenizer=spec.tokenizer or spec.model, revision=spec.revision, dtype=spec.dtype,
               trust_remote_code=spec.trust_remote_code, tensor_parallel_size=spec.tensor_parallel_size, **kwargs)


def mask_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a custom 4D attention mask: sdpa takes bool (a quarter of the memory), eager adds a float."""
    attn = getattr(model.config, "_attn_implementation", "eager")
    return torch.bool if attn == "sdpa" else next(model.parameters()).dtype


def custom_mask_problem(model: torch.nn.Module, longest: int) -> str | None:
    """Why this model cannot take a custom 4D attention mask over sequences of up to `longest` tokens, or None."""
    config = model.config
    attn = getattr(config, "_attn_implementation", None)
    if attn not in ("sdpa", "eager"):
        return f"attention {attn!r} takes no custom 4D mask"
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window < longest:
        return f"sliding-window attention ({window} tokens) would be bypassed by a custom mask"
    return None
