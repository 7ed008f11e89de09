"""`refdpo check`: are the reference log-probs stored in a dataset what training will assume they are?

Without a model: per column pair, the count, missing/NaN/inf values, positive values (a log-prob is <= 0),
exact zeros (a response truncated away when it was scored), the reference's own ranking accuracy, and the
correlation of the log-probs with response length (summed log-probs fall with length; a weak correlation
suggests per-token averages). The provenance sidecar is summarised.

With `--model POLICY` (and the template/max_len training will use, or `--config` with the training YAML):
the provenance is compared with these settings (as `train` does), and when the model is the reference (by
the provenance's weight fingerprint; assumed when there is no provenance) a sample of rows is recomputed in
float32. A per-sequence difference above `--tolerance` (1e-3 nats) is explained by trying the usual causes in
turn: another template, the end token left out, the sequence truncated, BOS added or not, another tokenizer.
Exit status 1 when a value is invalid or the recomputation disagrees, 0 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from refdpo import provenance as prov
from refdpo.commands.analyze import token_logprobs
from refdpo.config import DataSpec, ModelSpec, check_all, option
from refdpo.data import UNBOUNDED, PairData, RawSplit, build_pairs, load_split, parse_ref_columns
from refdpo.data.pairs import reference_pairs
from refdpo.data.schema import DEFAULT_REF_COLUMNS, POSITIVE_TOLERANCE, TRL_REF_COLUMNS
from refdpo.data.templates import TEMPLATES, Encoded, check_template
from refdpo.io import atomic_write_json
from refdpo.modeling import default_device, load_frozen, pad_token_id
from refdpo.tokenization import load_tokenizer

WEAK_LENGTH_CORRELATION = -0.3


@dataclass
class CheckConfig(DataSpec, ModelSpec):
    REQUIRED: ClassVar = {"model": None}  # without --model: statistics and provenance only

    split: str = option("train", "split name, or a path to its file")
    ref_columns: str = option("", "column pair CHOSEN,REJECTED to check (default: every pair with provenance, "
                                  "else chosen_logprob,rejected_logprob)")
    sample: int = option(64, "rows recomputed with --model (evenly spaced over the split)")
    tolerance: float = option(1e-3, "largest acceptable per-sequence difference in nats (float32)")
    report: str | None = option(None, "also write the report as JSON to this file")

    def validate(self) -> CheckConfig:
        check_all(self.spec_checks() + [
            (self.sample >= 1, "--sample must be >= 1"), (self.tolerance > 0, "--tolerance must be > 0")])
        return self


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _column_stats(raw: RawSplit, columns: tuple[str, str]) -> tuple[dict, list[str], list[str]]:
    """(statistics, errors, warnings) of one column pair."""
    errors, warnings = [], []
    values = {}
    for side, name in zip(("chosen", "rejected"), columns):
        numbers = [_number(r.get(name)) for r in raw.records]
        values[side] = (np.array([np.nan if x is None else x for x in numbers], dtype=np.float64),
                        sum(x is None for x in numbers))
    stats = {"rows": len(raw)}
    for side, (v, missing) in values.items():
        finite = v[np.isfinite(v)]
        stats[side] = {"missing": missing, "nan": int(np.sum(np.isnan(v))) - missing, "inf": int(np.sum(np.isinf(v))),
                       "positive": int(np.sum(finite > POSITIVE_TOLERANCE)), "zeros": int(np.sum(finite == 0.0)),
                       "mean": float(finite.mean()) if finite.size else None,
                       "min": float(finite.min()) if finite.size else None,
                       "max": float(finite.max()) if finite.size else None}
        s, name = stats[side], columns[0 if side == "chosen" else 1]
        for key, what in (("missing", "missing or not numbers"), ("nan", "NaN"), ("inf", "infinite"),
                          ("positive", f"positive (> {POSITIVE_TOLERANCE}; a log-prob is <= 0)")):
            if s[key]:
                errors.append(f"{name}: {s[key]} values are {what}")
        if s["zeros"]:
            warnings.append(f"{name}: {s['zeros']} values are exactly 0.0: a response truncated away when it was "
                            "scored (or empty)")
    c, r = values["chosen"][0], values["rejected"][0]
    ok = np.isfinite(c) & np.isfinite(r)
    if ok.any():
        stats["margin_mean"] = float(np.mean(c[ok] - r[ok]))
        stats["reference_accuracy"] = float(np.mean((c[ok] > r[ok]) + 0.5 * (c[ok] == r[ok])))
    lengths = np.array([len(str(rec[side][-1].get("content", ""))) if isinstance(rec.get(side), list) and rec[side]
                        and isinstance(rec[side][-1], dict) else np.nan
                        for side in ("chosen", "rejected") for rec in raw.records], dtype=np.float64)
    both = np.concatenate([c, r])
    ok = np.isfinite(both) & np.isfinite(lengths)
    if ok.sum() >= 20 and np.std(lengths[ok]) > 0 and np.std(both[ok]) > 0:
        corr = float(np.corrcoef(both[ok], lengths[ok])[0, 1])
        stats["length_correlation"] = corr
        if corr > WEAK_LENGTH_CORRELATION:
            warnings.append(f"{columns[0]},{columns[1]}: log-probs hardly fall with response length (correlation "
                            f"{corr:.2f} with characters): were they averaged per token instead of summed?")
    return stats, errors, warnings


def _pairs_to_check(raw: RawSplit, cfg: CheckConfig, entries: dict) -> list[tuple[str, str]]:
    if cfg.ref_columns:
        return [parse_ref_columns(cfg.ref_columns)]
    if entries:
        return [tuple(key.split(",")) for key in entries]
    cols = raw.columns
    return [pair for pair in (DEFAULT_REF_COLUMNS, TRL_REF_COLUMNS) if set(pair) <= cols] or [DEFAULT_REF_COLUMNS]


def _response_logprobs(model, data: PairData, pad_id: int) -> list[np.ndarray]:
    """Per-token response log-probs of every chosen, then every rejected sequence (analysis's one pass)."""
    tl = token_logprobs(model, data, pad_id)
    sequence = tl.side.astype(np.int64) * len(data) + tl.pair  # chosen i -> i, rejected i -> N + i
    order = np.argsort(sequence, kind="stable")  # positions stay in order within a sequence
    return np.split(tl.logprobs[order], np.cumsum(np.bincount(sequence, minlength=2 * len(data)))[:-1])


def _sums(model, data: PairData, pad_id: int) -> np.ndarray:
    return np.array([t.sum() for t in _response_logprobs(model, data, pad_id)])


def _with_bos_toggled(data: PairData, bos_id: int) -> PairData:
    def toggle(e: Encoded) -> Encoded:
        if len(e.input_ids) and e.input_ids[0] == bos_id:
            return Encoded(e.input_ids[1:], e.response_start - 1, e.full_length - 1)
        return Encoded(np.concatenate([[bos_id], e.input_ids]), e.response_start + 1, e.full_length + 1)

    return PairData([toggle(e) for e in data.chosen], [toggle(e) for e in data.rejected], data.ref_chosen,
                    data.ref_rejected, data.rows, data.source)


def _diagnose(model, sub: RawSplit, data: PairData, stored: np.ndarray, tokens: list[np.ndarray], tokenizer,
              cfg: CheckConfig, columns: tuple[str, str], entry: dict | None) -> list[str]:
    """The likely causes of a disagreement, each verified on the sampled rows."""
    tol, pad_id, causes = cfg.tolerance, pad_token_id(tokenizer), []
    if entry and (drift := prov.tokenizer_drift(entry, tokenizer)):
        causes.append(drift)
    elif entry and entry.get("tokenizer_sha256") not in (None, prov.tokenizer_fingerprint(tokenizer)):
        causes.append("tokenizer: the provenance says the data was scored with another tokenizer "
                      f"({entry.get('tokenizer')})")
    for template in TEMPLATES:
        if template == cfg.template:
            continue
        try:
            check_template(template, tokenizer)
            alt = build_pairs(sub, tokenizer, template, cfg.max_len, columns, "drop")
        except Exception:  # this template cannot render these rows: not the cause
            continue
        if len(alt) == len(data) and np.max(np.abs(_sums(model, alt, pad_id) - stored)) <= tol:
            causes.append(f"template: the stored values match template {template!r} (insert_eos "
                          f"{template == 'zephyr'}), not {cfg.template!r}")
    prefix_match = []
    for t, s in zip(tokens, stored):
        cums = np.concatenate([[0.0], np.cumsum(t)])
        hits = np.nonzero(np.abs(cums - s) <= tol)[0]
        prefix_match.append((int(hits[-1]) if hits.size else None, len(t)))
    short = [(k, n) for k, n in prefix_match if k is not None and k < n]
    if short and all(k == n - 1 for k, n in short) and len(short) == len(prefix_match):
        causes.append("EOS: the stored values leave out the response's final end token")
    elif short:
        k, n = short[0]
        causes.append(f"truncation: {len(short)} stored values cover only the first tokens of their response "
                      f"(e.g. {k} of {n}): scored with a smaller max_len than {cfg.max_len}")
    if not short:
        longer = build_pairs(sub, tokenizer, cfg.template, UNBOUNDED, columns, "drop")
        if len(longer) == len(data) and np.max(np.abs(_sums(model, longer, pad_id) - stored)) <= tol:
            causes.append(f"truncation: the stored values cover whole responses that max_len {cfg.max_len} cuts")
    if tokenizer.bos_token_id is not None:
        toggled = _with_bos_toggled(data, tokenizer.bos_token_id)
        if np.max(np.abs(_sums(model, toggled, pad_id) - stored)) <= tol:
            causes.append("BOS: the stored values were computed " + (
                "without" if data.chosen[0].input_ids[0] == tokenizer.bos_token_id else "with") + " a BOS token")
    if entry and entry.get("dtype") in ("bfloat16", "float16"):
        causes.append(f"dtype: the data was scored in {entry['dtype']}, which alone differs by ~1e-2 nats per 100 "
                      "tokens")
    return causes or ["unexplained: other weights, dtype, attention implementation or scoring mode?"]


def _recompute(cfg: CheckConfig, raw: RawSplit, columns: tuple[str, str], entry: dict | None, tokenizer,
               model) -> tuple[dict, list[str]]:
    rows = np.unique(np.linspace(0, len(raw) - 1, min(cfg.sample, len(raw))).round().astype(int))
    sub = RawSplit([raw.records[i] for i in rows], raw.source, [raw.line_of(i) for i in rows]
                   if raw.line_numbers else None)
    if entry and entry.get("mode") == "prior":
        # A prior reference is rendered its own way, not with the policy's template: verify what it claims.
        cfg = dataclasses.replace(cfg, template=entry["template"], max_len=entry["max_len"])
        data, _ = reference_pairs(sub, tokenizer, cfg.template, cfg.max_len, "drop", "prior", entry["prior_prefix"])
        data.ref_chosen = np.array([sub.records[i][columns[0]] for i in data.rows], dtype=np.float64)
        data.ref_rejected = np.array([sub.records[i][columns[1]] for i in data.rows], dtype=np.float64)
    else:
        data = build_pairs(sub, tokenizer, cfg.template, cfg.max_len, columns, "drop")
    pad_id = pad_token_id(tokenizer)
    tokens = _response_logprobs(model, data, pad_id)
    stored = np.concatenate([data.ref_chosen, data.ref_rejected])
    diff = np.abs(np.array([t.sum() for t in tokens]) - stored)
    result = {"rows": len(data), "max_abs_diff": float(diff.max()), "over_tolerance": int(np.sum(diff > cfg.tolerance)),
              "tolerance": cfg.tolerance, "template": cfg.template, "max_len": cfg.max_len}
    if result["over_tolerance"]:
        bad = np.nonzero(diff > cfg.tolerance)[0]
        n = len(data)
        pick = sorted({int(i % n) for i in bad})
        sub_bad = RawSplit([sub.records[data.rows[i]] for i in pick], sub.source)
        data_bad = build_pairs(sub_bad, tokenizer, cfg.template, cfg.max_len, columns, "drop")
        bad_tokens = [tokens[i] for i in pick] + [tokens[n + i] for i in pick]
        bad_stored = np.concatenate([data.ref_chosen[pick], data.ref_rejected[pick]])
        result["causes"] = _diagnose(model, sub_bad, data_bad, bad_stored, bad_tokens, tokenizer, cfg, columns,
                                     entry)
        return result, [f"{','.join(columns)}: recomputed log-probs differ from the stored ones by up to "
                        f"{result['max_abs_diff']:.3g} nats ({result['over_tolerance']} of {2 * n} sequences above "
                        f"{cfg.tolerance}); likely cause: " + "; ".join(result["causes"])]
    return result, []


def check(cfg: CheckConfig) -> dict:
    """Run the checks; returns the report ({errors, warnings, notes, columns: {pair: {...}}})."""
    raw = load_split(cfg.dataset, cfg.split, cfg.dataset_config, cfg.dataset_revision)
    entries = prov.read(raw.provenance)
    report = {"dataset": raw.source, "rows": len(raw), "errors": [], "warnings": [], "notes": [], "columns": {}}
    tokenizer = model = None
    if cfg.model:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
        check_template(cfg.template, tokenizer)
    for columns in _pairs_to_check(raw, cfg, entries):
        key = prov.column_key(columns)
        if not set(columns) <= raw.columns:
            report["errors"].append(f"columns {key} not found in {raw.source}")
            continue
        stats, errors, warnings = _column_stats(raw, columns)
        report["columns"][key] = {"stats": stats}
        report["errors"] += errors
        report["warnings"] += warnings
        entry = entries.get(key)
        if entry is None:
            report["notes"].append(f"{key}: no provenance (not written by refdpo score)")
        else:
            report["columns"][key]["provenance"] = {k: entry.get(k) for k in (
                "model", "mode", "prior_prefix", "template", "max_len", "dtype", "rows_out", "created")}
        if tokenizer is None or errors:
            continue
        same = True
        if entry is not None:
            longest = 0
            if entry.get("max_len") != cfg.max_len:  # do sequences exceed the smaller of the two?
                full = build_pairs(raw, tokenizer, cfg.template, UNBOUNDED, None, "drop")
                longest = max(e.full_length for seqs in (full.chosen, full.rejected) for e in seqs)
            warnings, notes = prov.training_report(entry, model=cfg.model, revision=cfg.revision,
                                                   tokenizer=tokenizer, template=cfg.template,
                                                   max_len=cfg.max_len, rows=len(raw), longest=longest)
            report["warnings"] += [f"{key}: {w}" for w in warnings]
            report["notes"] += [f"{key}: {n}" for n in notes]
            same = prov.is_same_model(entry, cfg.model, cfg.revision, prov.weights_fingerprint(cfg.model,
                                                                                                cfg.revision))
        else:
            report["notes"].append(f"{key}: assuming {cfg.model} is the reference")
        if same is False:
            report["notes"].append(f"{key}: {cfg.model} is not the reference; nothing to recompute")
            continue
        if model is None:
            model = load_frozen(cfg, default_device(), torch.float32)
        result, errors = _recompute(cfg, raw, columns, entry, tokenizer, model)
        report["columns"][key]["recompute"] = result
        report["errors"] += errors
    if cfg.report:
        atomic_write_json(Path(cfg.report), report)
    return report


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def format_report(report: dict) -> str:
    """The report as text: one block per column pair, then errors, warnings and notes."""
    lines = [f"{report['dataset']}: {report['rows']} rows"]
    for key, info in report["columns"].items():
        s = info["stats"]
        lines.append(f"\n[{key}]")
        for side in ("chosen", "rejected"):
            lines.append(f"  {side:9s} " + "  ".join(f"{k} {_fmt(v)}" for k, v in s[side].items()))
        lines.append("  " + "  ".join(f"{k} {_fmt(s[k])}" for k in ("margin_mean", "reference_accuracy",
                                                                       "length_correlation") if k in s))
        if "provenance" in info:
            lines.append("  provenance: " + json.dumps(info["provenance"]))
        if "recompute" in info:
            r = info["recompute"]
            lines.append(f"  recomputed {r['rows']} rows with template {r['template']}, max_len {r['max_len']}: "
                         f"max |diff| {r['max_abs_diff']:.3g} nats ({r['over_tolerance']} above {r['tolerance']})")
    for kind in ("errors", "warnings", "notes"):
        for message in report[kind]:
            lines.append(f"{kind[:-1].upper()}: {message}")
    lines.append("OK" if not report["errors"] else f"{len(report['errors'])} problem(s) found")
    return "\n".join(lines)
