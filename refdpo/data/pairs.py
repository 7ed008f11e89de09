"""A tokenised split of preference pairs: validated records -> token ids, response starts, reference log-probs.

Truncation keeps the start (as RefDPO did, so stored log-probs refer to the same tokens). A pair whose chosen
or rejected response is truncated away entirely would score 0 and silently corrupt training; it is dropped
and counted (`on_truncated="drop"`) or reported as an error naming its row (`on_truncated="error"`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from refdpo.data.loading import RawSplit, load_split
from refdpo.data.schema import resolve_ref_columns, validate_records
from refdpo.data.templates import Encoded, prior_conversation, prior_template, render, tokenize_rendered
from refdpo.errors import DataError, DataErrors
from refdpo.tokenization import files_fingerprint

log = logging.getLogger(__name__)
ON_TRUNCATED = ("drop", "error")


@dataclass
class PairData:
    """Tokenised pairs. Index i is the i-th kept pair; `rows[i]` is its row in the source split."""

    chosen: list[Encoded]
    rejected: list[Encoded]
    ref_chosen: np.ndarray | None  # float64 [N], None when training reference-free
    ref_rejected: np.ndarray | None
    rows: np.ndarray  # int64 [N]
    source: str
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen)

    def num_tokens(self, i: int) -> int:
        return len(self.chosen[i].input_ids) + len(self.rejected[i].input_ids)

    def token_counts(self) -> np.ndarray:
        """int64 [N]: each pair's chosen + rejected tokens (what batches are split by)."""
        return np.array([self.num_tokens(i) for i in range(len(self))], dtype=np.int64)


def build_pairs(raw: RawSplit, tokenizer, template: str, max_len: int,
                ref_columns: tuple[str, str] | None, on_truncated: str = "drop", validate: bool = True) -> PairData:
    """Validate, render and tokenise a split. `ref_columns=None`: no reference log-probs are read.
    `validate=False`: the records were derived from validated ones (prior mode's prompt-less conversations)."""
    if on_truncated not in ON_TRUNCATED:
        raise ValueError(f"on_truncated must be one of {ON_TRUNCATED}, got {on_truncated!r}")
    if not raw.records:
        raise DataError(raw.source, "has no records")
    if ref_columns is not None:
        ref_columns = resolve_ref_columns(raw.columns, ref_columns, raw.source)
    if validate:
        validate_records(raw.records, raw.source, ref_columns, raw.line_of)

    prompts, fulls = [], []
    for row, record in enumerate(raw.records):
        for side in ("chosen", "rejected"):
            try:
                prompt, full = render(record[side], template, tokenizer)
            except Exception as e:  # a chat template's own error (jinja) belongs to this row
                raise DataError(raw.source, f"template {template!r} failed: {e}", row=row, field=side,
                                line=raw.line_of(row)) from None
            prompts.append(prompt)
            fulls.append(full)
    encoded, merges = tokenize_rendered(prompts, fulls, tokenizer, template, max_len)

    keep, errors, partial = [], [], 0
    for row in range(len(raw.records)):
        c, r = encoded[2 * row], encoded[2 * row + 1]
        lost = [side for side, e in (("chosen", c), ("rejected", r)) if e.response_tokens == 0]
        if lost:
            if on_truncated == "error" and len(errors) < 20:
                e = c if lost[0] == "chosen" else r
                errors.append(DataError(
                    raw.source, f"the response is truncated away by max_len={max_len} (prompt is "
                                f"{e.response_start} tokens); raise --max_len or drop such pairs with "
                                f"--on_truncated drop", row=row, field=lost[0], line=raw.line_of(row)))
            continue
        partial += int(c.full_length > max_len or r.full_length > max_len)
        keep.append(row)
    if errors:
        raise DataErrors(errors, len(raw.records) - len(keep))
    if not keep:
        raise DataError(raw.source, f"every pair's response is truncated away by max_len={max_len}")

    stats = {"rows": len(raw.records), "pairs": len(keep), "dropped_truncated": len(raw.records) - len(keep),
             "partially_truncated": partial, "boundary_merges": merges}
    if stats["dropped_truncated"]:
        log.warning("%s: dropped %d of %d pairs whose response is truncated away by max_len=%d",
                    raw.source, stats["dropped_truncated"], len(raw.records), max_len)
    if partial:
        log.info("%s: %d pairs have a response cut short by max_len=%d (kept; no end token)",
                 raw.source, partial, max_len)
    if merges:
        log.warning("%s: in %d conversations the tokenizer merges the prompt's last characters with the "
                    "response's first; the merged token counts as response", raw.source, merges)

    ref_c = ref_r = None
    if ref_columns is not None:
        ref_c = np.array([float(raw.records[i][ref_columns[0]]) for i in keep], dtype=np.float64)
        ref_r = np.array([float(raw.records[i][ref_columns[1]]) for i in keep], dtype=np.float64)
        zeros = int(np.sum(ref_c == 0.0) + np.sum(ref_r == 0.0))
        if zeros:
            log.warning("%s: %d reference log-probs are exactly 0.0, which usually means the response was "
                        "truncated away when it was scored", raw.source, zeros)
        stats["ref_columns"] = list(ref_columns)
    return PairData(chosen=[encoded[2 * i] for i in keep], rejected=[encoded[2 * i + 1] for i in keep],
                    ref_chosen=ref_c, ref_rejected=ref_r, rows=np.asarray(keep, dtype=np.int64),
                    source=raw.source, stats=stats)


def reference_pairs(raw: RawSplit, tokenizer, template: str, max_len: int, on_truncated: str,
                    mode: str = "conditional", prior_prefix: str = "empty_user") -> tuple[PairData, str]:
    """The pairs as the reference sees them (its tokenizer and template; prior mode: prompt replaced), and the
    template actually rendered ("bos" for a bare-BOS prior)."""
    if mode == "conditional":
        return build_pairs(raw, tokenizer, template, max_len, None, on_truncated), template
    validate_records(raw.records, raw.source, None, raw.line_of)  # the original prompts, before they go
    rendered = prior_template(template, prior_prefix, tokenizer)
    prior = [{"chosen": prior_conversation(r["chosen"], prior_prefix),
              "rejected": prior_conversation(r["rejected"], prior_prefix)} for r in raw.records]
    view = RawSplit(prior, raw.source, raw.line_numbers)
    return build_pairs(view, tokenizer, rendered, max_len, None, on_truncated, validate=False), rendered


def load_pairs(spec, split: str, tokenizer, ref_columns: tuple[str, str] | None, limit: int = 0,
               cache: dict | None = None) -> tuple[RawSplit, PairData]:
    """Load one split as `spec` (a DataSpec: dataset, config, revision, template, max_len, on_truncated) says,
    keep its first `limit` records (0: all), validate and tokenise them. Returns the whole split as loaded (its
    provenance describes all of it) and the pairs. With `cache` (a sweep's, or evaluate's over checkpoints),
    a split tokenised the same way before, by a tokenizer with the same files, is reused."""
    key = (spec.dataset, spec.dataset_config, spec.dataset_revision, split, limit, spec.template, spec.max_len,
           spec.on_truncated, ref_columns, files_fingerprint(tokenizer))
    if cache is not None and key in cache:
        return cache[key]
    raw = load_split(spec.dataset, split, spec.dataset_config, spec.dataset_revision)
    data = build_pairs(raw.head(limit), tokenizer, spec.template, spec.max_len, ref_columns, spec.on_truncated)
    log.info("%s: %d pairs (%s)", data.source, len(data), ", ".join(f"{k} {v}" for k, v in data.stats.items()))
    if cache is not None:
        cache[key] = (raw, data)
    return raw, data
