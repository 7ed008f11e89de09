"""`refdpo merge`: fold a LoRA run's adapter into its base model, giving a plain model folder.

A `refdpo train --lora` checkpoint holds only the adapter (adapter_config.json, adapter_model.safetensors) and the
tokenizer's files; serving stacks (vLLM and others) and anyone without peft want a plain model folder. The merge is W + (alpha / r) B A per target module, done by peft's `merge_and_unload` in float32
whatever `--dtype` is, so a bfloat16 or float16 output is rounded once, not twice. It runs on the CPU: it is one
pass over the weights, and float32 needs room for the whole model (4 bytes a parameter).

The output is built in a temporary sibling and renamed into place when complete (io.atomic_folder), and holds
`merge.json`: where it came from and the adapter's LoRA settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from refdpo import __version__
from refdpo.checkpoint import CHECKPOINTS, model_path, resolve
from refdpo.config import WEIGHT_DTYPES, Config, ModelSpec, check_all, option
from refdpo.errors import ConfigError, RefdpoError, first_line
from refdpo.io import atomic_folder, atomic_write_json
from refdpo.modeling import load_frozen
from refdpo.tokenization import TOKENIZER_FILES, load_tokenizer, save_tokenizer

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass
class MergeConfig(Config):
    REQUIRED: ClassVar = {"adapter": "--adapter is required", "out": "--out is required"}

    adapter: str = option("", "LoRA checkpoint of `refdpo train --lora` (RUN/best, RUN/checkpoints/step-N); a run "
                              "folder stands for its best checkpoint, or its last when it never validated")
    base: str | None = option(None, "base model id or folder (default: the adapter's base_model_name_or_path)")
    out: str = option("", "folder to write the merged model to")
    dtype: str = option("float32", f"dtype of the saved weights: {' | '.join(WEIGHT_DTYPES)} (merged in float32)")
    overwrite: bool = option(False, "replace --out if it exists")

    def validate(self) -> MergeConfig:
        check_all([
            (self.dtype in WEIGHT_DTYPES, f"--dtype must be {' | '.join(WEIGHT_DTYPES)}"),
        ])
        return self


def adapter_folder(path: str) -> Path:
    """The checkpoint `path` names: a run folder stands for its best checkpoint (as in `evaluate`), or for its last
    one when the run had no validation split (then it has no best)."""
    folder = Path(model_path(path))
    if (folder / CHECKPOINTS).is_dir():
        folder = resolve(folder, "last") or folder
    return folder


def read_adapter_config(folder: Path) -> dict:
    """adapter_config.json of a LoRA checkpoint; a ConfigError naming `folder` when it is not one."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder (--adapter takes a `refdpo train --lora` checkpoint)")
    if not (folder / ADAPTER_CONFIG).is_file():
        hint = " (it holds full weights: there is nothing to merge)" if (folder / "config.json").is_file() else ""
        raise ConfigError(f"{folder}: not a LoRA checkpoint, no {ADAPTER_CONFIG}{hint}")
    try:
        settings = json.loads((folder / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{folder / ADAPTER_CONFIG}: unreadable: {first_line(e)}") from None
    if not isinstance(settings, dict) or settings.get("peft_type") != "LORA":
        kind = settings.get("peft_type") if isinstance(settings, dict) else None
        raise ConfigError(f"{folder}: not a LoRA checkpoint ({ADAPTER_CONFIG} has peft_type {kind!r})")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise ConfigError(f"{folder}: the LoRA checkpoint has no {ADAPTER_WEIGHTS[0]}")
    return settings


def merge(cfg: MergeConfig) -> dict:
    """Merge `cfg.adapter` into its base and write the result to `cfg.out`; returns what merge.json records, with
    `out`. Everything about the input is checked before the base model is loaded."""
    from peft import PeftModel

    adapter = adapter_folder(cfg.adapter)
    settings = read_adapter_config(adapter)
    base = cfg.base or settings.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter / ADAPTER_CONFIG} names no base model: pass --base")
    if base.startswith(("/", ".")) and not Path(base).is_dir():  # a path, not a hub id: say so, not "repo id"
        named = f" (named by {adapter / ADAPTER_CONFIG}: pass --base)" if not cfg.base else ""
        raise ConfigError(f"{base}: no such base model folder{named}")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise ConfigError(f"{out} exists: pass --overwrite to replace it, or pick another --out")
    if out.resolve() in (adapter.resolve(), Path(base).resolve()):
        raise ConfigError(f"--out {out} is the adapter or base folder it would be built from")

    log.info("merging %s into %s (saved as %s)", adapter, base, cfg.dtype)
    model = load_frozen(ModelSpec(model=base, revision=None if cfg.base else settings.get("revision")),
                        torch.device("cpu"), torch.float32)
    try:
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # shapes or module names of another base
        raise RefdpoError(f"{adapter}: cannot apply this adapter to {base}: {first_line(e) or type(e).__name__}"
                          ) from None
    model.to(getattr(torch, cfg.dtype))
    has_tokenizer = any((adapter / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = load_tokenizer(str(adapter) if has_tokenizer else base)  # train saves the one it trained with

    record = {"base": base, "adapter": str(adapter), "dtype": cfg.dtype, "refdpo_version": __version__,
              "lora": {"r": settings.get("r"), "alpha": settings.get("lora_alpha"),
                       "target_modules": _sorted(settings.get("target_modules"))}}
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)  # safetensors; tied embeddings once
        save_tokenizer(tokenizer, tmp)
        atomic_write_json(tmp / "merge.json", record)
    return {**record, "out": str(out)}


def _sorted(modules):
    """peft stores the resolved target modules as a set-order list, or a string ("all-linear", a regex)."""
    return sorted(modules) if isinstance(modules, list) else modules
