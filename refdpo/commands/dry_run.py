"""`--dry_run` for `train` and `score`: what a run would do, from its config and data alone. The data is located,
validated and tokenised as the run would (and so cached for it); no model weights are loaded.

It reports the resolved config, each split's format and counts, the token lengths of prompts and replies before
truncation (percentiles), how many pairs `max_len` drops or cuts, and the steps (train) or batches (score).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import yaml

from refdpo.data import PairData, PairSampler

PERCENTILES = (50, 90, 95, 99)


def _lengths(values: list[int]) -> dict:
    array = np.asarray(values, dtype=np.int64)
    return {**{f"p{q}": int(np.percentile(array, q)) for q in PERCENTILES}, "max": int(array.max())}


def split_report(data: PairData) -> dict:
    """A tokenised split's counts and untruncated token lengths (prompt: once per pair; replies: both sides)."""
    replies = [e.full_length - e.response_start for side in (data.chosen, data.rejected) for e in side]
    stats = data.stats
    return {"source": data.source, "format": stats["data_format"], "rows": stats["rows"], "pairs": stats["pairs"],
            "dropped_by_max_len": stats["dropped_truncated"], "cut_by_max_len": stats["partially_truncated"],
            "boundary_merges": stats["boundary_merges"], "ref_columns": stats.get("ref_columns"),
            "prompt_tokens": _lengths([e.response_start for e in data.chosen]), "reply_tokens": _lengths(replies),
            "sequence_tokens": _lengths([e.full_length for side in (data.chosen, data.rejected) for e in side])}


def processes() -> int:
    """How many processes a launch would train with: `accelerate launch` sets WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def train_dry_run(cfg, inputs) -> dict:
    """What `refdpo train` would do with `cfg` (and the Python API's `inputs`)."""
    from refdpo.commands.train_config import schedule_steps
    from refdpo.commands.train_data import load_split_data, locate_data
    from refdpo.data.templates import check_template
    from refdpo.tokenization import load_tokenizer

    train_at, val_at = locate_data(cfg, inputs)
    tokenizer = inputs.tokenizer or load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    check_template(cfg.template, tokenizer)
    lenient = dataclasses.replace(cfg, strict=False)  # a mismatch is reported below, not raised
    train_data, train_mismatch = load_split_data(lenient, cfg.train_split, train_at, cfg.max_train_pairs,
                                                 tokenizer, None)
    val_data, val_mismatch = (load_split_data(lenient, cfg.val_split, val_at, cfg.max_val_pairs, tokenizer, None)
                              if val_at else (None, []))
    sampler = PairSampler(len(train_data), cfg.batch_size, cfg.accumulate_step, processes(), 0, cfg.seed)
    steps, warmup = schedule_steps(cfg, sampler.steps_per_epoch)
    plan = {"processes": processes(), "global_batch": sampler.global_batch,
            "steps_per_epoch": sampler.steps_per_epoch, "epochs": -(-steps // sampler.steps_per_epoch),
            "steps": steps, "warmup_steps": warmup, "schedule": cfg.lr_scheduler_type,
            "evaluations": 0 if val_data is None else len({*range(cfg.eval_interval, steps + 1, cfg.eval_interval),
                                                           *range(sampler.steps_per_epoch, steps + 1,
                                                                  sampler.steps_per_epoch), steps})}
    splits = {"train": split_report(train_data)} | ({"val": split_report(val_data)} if val_data else {})
    for name, found in (("train", train_mismatch), ("val", val_mismatch)):
        if found:  # what the run would refuse (or, with --strict false, train through and record)
            splits[name]["reference_mismatches"] = found
    return {"dry_run": True, "command": "train", "config": cfg.to_dict(), "splits": splits, "plan": plan}


def format_report(report: dict) -> str:
    """The dry run as text: config (YAML, loadable with --config), splits, plan."""
    lines = [f"refdpo {report['command']} --dry_run: nothing was run and no model weights were loaded.", "",
             "resolved config:", yaml.safe_dump(report["config"], sort_keys=False).rstrip(), ""]
    lam = report["config"].get("ref_mix")
    for name, split in report["splits"].items():
        columns = split["ref_columns"]
        reference = (f"; reference {lam:g} x {','.join(columns[:2])} + {1 - lam:g} x {','.join(columns[2:])} (a "
                     "geometric mixture)" if columns and len(columns) == 4 else
                     f"; reference columns {','.join(columns)}" if columns else "")
        lines.append(f"{name}: {split['source']} ({split['format']} format): {split['pairs']} of {split['rows']} "
                     f"pairs kept; max_len drops {split['dropped_by_max_len']}, cuts {split['cut_by_max_len']}"
                     + reference)
        for what in ("prompt_tokens", "reply_tokens", "sequence_tokens"):
            lengths = split[what]
            lines.append(f"  {what.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in lengths.items()))
        strict = report["config"].get("strict", True)
        for mismatch in split.get("reference_mismatches", []):
            lines.append(f"  reference log-probs: {mismatch} ("
                         + ("the run refuses this; --strict false trains anyway)" if strict else
                            "trained through with --strict false, recorded in summary.json)"))
    lines.append("")
    lines.append("plan: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in report["plan"].items()))
    return "\n".join(lines)
