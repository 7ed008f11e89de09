"""`refdpo evaluate`: one table of validation metrics over several checkpoints (the pass itself is
core/forward.py's `evaluate_pairs`, the one training uses).

Validation metrics are those of the paper: the DPO loss on the validation split (used to pick the best
checkpoint), reward accuracy and policy accuracy (Table 2), margins, mean log-probs and response lengths.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from refdpo.checkpoint import CHECKPOINTS, model_path
from refdpo.config import (
    WEIGHT_DTYPES,
    DataSpec,
    LayoutSpec,
    ModelSpec,
    ObjectiveSpec,
    check_all,
    load_yaml,
    option,
)
from refdpo.console import quiet_third_parties
from refdpo.core.forward import evaluate_pairs
from refdpo.core.verify import choose_collate, head_matches_model
from refdpo.data import collate_pairs, load_pairs, parse_ref_columns, to_device
from refdpo.data.templates import check_template
from refdpo.engine import start_processes
from refdpo.io import require_writable
from refdpo.modeling import load_frozen, pad_token_id, reset_accelerate_state
from refdpo.tables import markdown, write_tables
from refdpo.tokenization import load_tokenizer

log = logging.getLogger(__name__)

# --- `refdpo evaluate`: one table over several checkpoints ------------------------------------------------

@dataclass
class EvalConfig(LayoutSpec, ObjectiveSpec, DataSpec, ModelSpec):
    split: str = option("val", "split name, or a path to its file")
    batch_size: int = option(8, "pairs per forward pass")
    max_pairs: int = option(0, "use only the first N pairs (0: all)")
    dtype: str = option("float32", "float32 (exact), bfloat16 or float16 (faster on a GPU; ~1e-2 nats of noise "
                                   "per 100 tokens in the log-probs)")
    out: str = option("", "folder to write evaluate.md, evaluate.csv and evaluate.json to (default: print only)")

    def validate(self) -> EvalConfig:
        check_all(self.spec_checks() + self.objective_checks() + self.layout_checks() + [
            (self.batch_size >= 1 and self.max_pairs >= 0, "--batch_size must be >= 1 and --max_pairs >= 0"),
            (self.dtype in WEIGHT_DTYPES, f"--dtype must be {' | '.join(WEIGHT_DTYPES)}"),
        ])
        return self

    @property
    def models(self) -> list[str]:
        """--model takes several checkpoints, comma-separated; a run folder stands for its best checkpoint."""
        return [m.strip() for m in self.model.split(",") if m.strip()]


TABLE_COLUMNS = ("pairs", "loss", "reward_accuracy", "policy_accuracy", "margin", "reward_chosen",
                 "reward_rejected", "logp_chosen", "logp_rejected", "length_chosen", "length_rejected")
SETTING_COLUMNS = ("objective", "beta", "ref_columns")  # what each row's loss and rewards were computed with
# What a run's own config.yaml decides when the run (or one of its checkpoints) is evaluated: what its
# validation loss meant. Flags given for these apply to the other models in --model.
RUN_SETTINGS = ("loss", "beta", "ref_free", "label_smoothing", "simpo_gamma", "dpo_weight", "ref_columns",
                "ref_mix", "template", "max_len", "on_truncated")


def run_settings(name: str) -> dict:
    """RUN_SETTINGS as the run `name` is (a run folder) or belongs to (its best/last, one of its checkpoints,
    a merged model inside it) trained with; {} for a model that is not part of a run."""
    path = Path(name).absolute()
    if not path.exists():  # a hub id
        return {}
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file() and (folder / CHECKPOINTS).is_dir():
            recorded = load_yaml(folder / "config.yaml")
            return {k: recorded[k] for k in RUN_SETTINGS if k in recorded}
    return {}


def evaluate(cfg: EvalConfig) -> list[dict]:
    """Validation metrics of every checkpoint in --model on one split: one row each, in the given order.

    Ties count 0.5 in both accuracies (metrics.py): log-probs within 1e-4 nats, rewards within beta x 1e-4."""
    from accelerate import Accelerator

    cfg = cfg.validate().require()  # fields may have been set since the config was made
    quiet_third_parties()  # as the CLI does
    if cfg.out:
        require_writable(cfg.out, "--out")  # before any model loads

    reset_accelerate_state()
    accelerator = Accelerator(cpu=start_processes())  # a CPU launch: one gloo group, not independent processes
    rows, tokenised = [], {}  # checkpoints with the same tokenizer files share one tokenisation of the split
    for name in cfg.models:
        path = model_path(name)
        own = run_settings(name)
        spec = dataclasses.replace(cfg, model=path, **own)
        if any(getattr(cfg, k) != v for k, v in own.items()):
            log.info("%s: evaluated as it was trained: loss %s, beta %s, reference columns %s, template %s, "
                     "max_len %d (its config.yaml)", name, spec.loss, spec.beta,
                     "none" if spec.ref_free else spec.ref_columns, spec.template, spec.max_len)
        columns = parse_ref_columns(spec.ref_columns, mix=True) if spec.objective.uses_reference else None
        tokenizer = load_tokenizer(cfg.tokenizer or path, cfg.revision, cfg.trust_remote_code)
        check_template(spec.template, tokenizer)
        data = load_pairs(spec, cfg.split, tokenizer, columns, cfg.max_pairs, tokenised).mixed(spec.ref_mix)
        model = load_frozen(spec, accelerator.device, getattr(torch, cfg.dtype))
        pad_id = pad_token_id(tokenizer)
        probe = to_device(collate_pairs(data, np.arange(1), np.ones(1), pad_id), accelerator.device)
        fused, _ = head_matches_model(model, probe)
        collate = choose_collate(model, data, pad_id, accelerator.device, fused, cfg.packing, cfg.pack_capacity)
        metrics = evaluate_pairs(model, data, spec.objective, accelerator, cfg.batch_size, pad_id, fused,
                                 prefix="", collate=collate)
        rows.append({"model": name, "checkpoint": path, **{k: metrics[k] for k in TABLE_COLUMNS},
                     "objective": spec.loss, "beta": spec.beta, "ref_columns": ",".join(columns or ["none"])
                     + (f" mixed {spec.ref_mix:g}" if spec.ref_mix is not None and columns else "")})
        del model
    if cfg.out and accelerator.is_main_process:
        write_tables(rows, Path(cfg.out), "evaluate", {"config": dataclasses.asdict(cfg)})
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per checkpoint."""
    return markdown(rows, ["model", *TABLE_COLUMNS, *SETTING_COLUMNS])
