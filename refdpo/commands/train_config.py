"""`refdpo train`'s settings: `TrainConfig` (the defaults are the paper's, RefDPO's released code), the flag
names of other tools it takes, and what the settings imply (the schedule's steps)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from refdpo.config import (
    WEIGHT_DTYPES,
    DataSpec,
    LayoutSpec,
    ModelSpec,
    ObjectiveSpec,
    check_all,
    option,
    parse_args,
)
from refdpo.errors import ConfigError
from refdpo.io import local_or_hub

# transformers' schedules (get_scheduler) that need nothing but the warmup and total steps; the others want a
# metric each step or arguments of their own.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


@dataclass
class TrainConfig(LayoutSpec, ObjectiveSpec, DataSpec, ModelSpec):
    """`refdpo train`'s settings: the defaults are the paper's (RefDPO's released code)."""

    # TRL's and transformers' names, and the flags of RefDPO's released code: its commands run unchanged apart
    # from the program name (--cuda and -l/--log are accepted and ignored: the device comes from accelerate,
    # and refdpo always writes its run folder).
    ALIASES: ClassVar = {
        "TRL and transformers": {
            "--learning_rate": ("max_lr", None), "--per_device_train_batch_size": ("batch_size", None),
            "--per_device_eval_batch_size": ("eval_batch_size", None),
            "--gradient_accumulation_steps": ("accumulate_step", None), "--num_train_epochs": ("epochs", None),
            "--logging_steps": ("report_freq", None), "--eval_steps": ("eval_interval", None),
            "--save_steps": ("save_interval", None), "--dataset_train_split": ("train_split", None),
            "--dataset_test_split": ("val_split", None), "--use_peft": ("lora", None),
            "--bf16": ("mixed_precision", "bf16"), "--fp16": ("mixed_precision", "fp16")},
        "RefDPO's released code": {
            "--model_type": ("model", None), "--data_split": ("dataset_config", None), "--epoch": ("epochs", None),
            "--insert_eos": ("template", "zephyr"), "--cuda": (None, True), "-l": (None, True),
            "--log": (None, True)},
    }

    # model (and ModelSpec's fields)
    dtype: str = option("float32", "dtype the weights are loaded in: float32 (master weights for mixed "
                               "precision), bfloat16, float16")
    mixed_precision: str | None = option(None, "no | bf16 | fp16; default: what `accelerate launch` was given")
    gradient_checkpointing: bool = option(True, "recompute activations in backward (non-reentrant)")
    liger: bool = option(False, "Liger's fused kernels for RMSNorm, SwiGLU and RoPE (GPU; needs liger-kernel)")
    compile: bool = option(False, "torch.compile each decoder layer (GPU; on a CPU it needs a C++ compiler)")
    lora: bool = option(False, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: str = option("all-linear", "comma-separated module names, or all-linear")
    # data (and DataSpec's fields)
    train_split: str = option("train", "training split name, or a path to its file")
    val_split: str = option("val", "validation split name or path; empty to train without evaluation")
    max_train_pairs: int = option(0, "use only the first N training pairs (0: all)")
    max_val_pairs: int = option(0, "use only the first N validation pairs (0: all)")
    strict: bool = option(True, "refuse reference log-probs scored otherwise than this run uses them (weights, "
                                "tokenizer, template, max_len cutting scored replies, rows or conversations); "
                                "--strict false trains anyway and records the mismatch in summary.json")
    # optimisation
    epochs: int = option(3, "passes over the training split (RefDPO: --epoch)")
    max_steps: int = option(0, "stop after this many optimizer steps (0: the epochs decide)")
    batch_size: int = option(4, "pairs per device per micro-batch")
    accumulate_step: int = option(1, "micro-batches per optimizer step")
    eval_batch_size: int = option(0, "pairs per device when evaluating (0: batch_size)")
    max_lr: float = option(5e-7, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    lr_scheduler_type: str = option("linear", f"learning-rate schedule after warmup: {' | '.join(SCHEDULERS)} "
                                              "(transformers' get_scheduler)")
    warmup_ratio: float = option(0.1, "fraction of the steps spent warming up linearly from 0")
    warmup_steps: int = option(0, "steps of warmup (when > 0, instead of --warmup_ratio)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    seed: int = option(18890426, "random seed (data order, initialisation of LoRA)")
    # evaluation, checkpoints, logging
    eval_interval: int = option(500, "evaluate every N optimizer steps (and at each epoch end)")
    eval_at_start: bool = option(True, "evaluate before the first step (step 0: the reference's own loss)")
    save_interval: int = option(0, "save a resumable checkpoint every N steps (0: at each evaluation)")
    report_freq: int = option(10, "log training metrics every N optimizer steps")
    output_dir: str = option("", "run folder (default runs/<date-time>)")
    resume: bool = option(False, "continue the run in --output_dir from its last checkpoint")
    report_to: str = option("tensorboard", "comma-separated: tensorboard, wandb, none")
    wandb_project: str = option("refdpo", "W&B project when --report_to wandb")
    progress: bool = option(True, "show a progress bar")
    push_to_hub: bool = option(False, "upload the best (else last) checkpoint, with a model card, to the Hub")
    hub_model_id: str | None = option(None, "the Hub repo for --push_to_hub (default: the run folder's name)")
    hub_private_repo: bool = option(False, "create the Hub repo private")
    dry_run: bool = option(False, "load and tokenise the data, print what would run (formats, lengths, drops, "
                                  "steps) and stop: no model weights are loaded")

    # --- derived views -------------------------------------------------------------------------------
    @property
    def trackers(self) -> list[str]:
        names = [t.strip() for t in self.report_to.split(",") if t.strip()]
        return [] if names in ([], ["none"]) else names

    def validate(self) -> TrainConfig:
        check_all(self.spec_checks() + self.objective_checks() + self.layout_checks() + [
            (self.dtype in WEIGHT_DTYPES, f"--dtype must be {' | '.join(WEIGHT_DTYPES)}"),
            (self.mixed_precision in (None, "no", "bf16", "fp16"), "--mixed_precision must be no, bf16 or fp16"),
            *[(getattr(self, name) >= 1, f"--{name} must be >= 1, got {getattr(self, name)}")
              for name in ("epochs", "batch_size", "accumulate_step", "report_freq", "eval_interval")],
            *[(getattr(self, name) >= 0, f"--{name} must be >= 0, got {getattr(self, name)}")
              for name in ("max_steps", "warmup_steps", "save_interval", "eval_batch_size", "max_train_pairs",
                           "max_val_pairs")],
            (self.max_lr > 0 and math.isfinite(self.max_lr), "--max_lr must be a positive number"),
            (0 <= self.warmup_ratio <= 1, "--warmup_ratio must be in [0, 1]"),
            (self.lr_scheduler_type in SCHEDULERS, f"--lr_scheduler_type must be one of {', '.join(SCHEDULERS)}"),
            (self.max_grad_norm >= 0, "--max_grad_norm must be >= 0 (0: no clipping)"),
            (set(self.trackers) <= {"tensorboard", "wandb"}, "--report_to takes tensorboard, wandb or none"),
        ])
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# What a resumed run may change: how it is watched, evaluated, saved, and laid out in memory (layouts and
# kernels are checked equal at start-up), not what it optimises. Every other setting must be the run's own.
RESUME_MAY_CHANGE = frozenset({
    "attn_implementation", "trust_remote_code", "cache_dir", "packing", "pack_capacity", "gradient_checkpointing",
    "liger", "compile", "val_split", "max_val_pairs", "eval_batch_size", "strict", "eval_interval",
    "eval_at_start", "save_interval", "report_freq", "output_dir", "resume", "report_to", "wandb_project",
    "progress", "push_to_hub", "hub_model_id", "hub_private_repo", "dry_run"})


def resume_changes(cfg: TrainConfig, recorded: dict, run_dir) -> dict:
    """{field: (recorded, now)} of the settings this resume changes, all of them ones a run may change
    (RESUME_MAY_CHANGE); one that changes what the run optimises is refused, naming every such difference.
    `recorded`: the run's config.yaml (a field it lacks, from an older refdpo, had its default)."""
    refused, allowed = {}, {}
    for f in dataclasses.fields(cfg):
        if f.name == "resume":  # what makes this a resume
            continue
        was, now = recorded.get(f.name, f.default), getattr(cfg, f.name)
        if _place(was) != _place(now):  # runs/x and its absolute form are one model
            (allowed if f.name in RESUME_MAY_CHANGE else refused)[f.name] = (was, now)
    if refused:
        listed = ", ".join(f"--{name} {was} -> {now}" for name, (was, now) in refused.items())
        raise ConfigError(f"cannot resume {run_dir}: {listed} (a resumed run keeps every setting that changes what "
                          "it optimises, as its config.yaml records them; start a new run in another --output_dir)")
    return allowed


def _place(value):
    return local_or_hub(value) if isinstance(value, str) else value


def parse_train_args(argv: list[str] | None = None) -> TrainConfig:
    return parse_args(TrainConfig, argv, "refdpo train", "Train a policy with DPO (or a variant) from reference "
                      "log-probs stored in the dataset.")


def schedule_steps(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps, warmup steps): the epochs' steps, or --max_steps (which, as in transformers, may run
    past --epochs); warmup --warmup_steps, else --warmup_ratio of the steps."""
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    return total, min(cfg.warmup_steps or int(cfg.warmup_ratio * total), total)
