"""A tokenised split of preference pairs: validated records -> token ids, response starts, reference log-probs.

Truncation keeps the start (as RefDPO did, so stored log-probs refer to the same tokens). A pair whose chosen
or rejected response is truncated away entirely would score 0 and silently corrupt training; it is dropped
and counted (`on_truncated="drop"`) or reported as an error naming its row (`on_truncated="error"`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from refdpo.console import progress_bar
from refdpo.data import cache as disk_cache
from refdpo.data.loading import PROGRESS_DELAY, RawSplit, SplitLocation, locate_split
from refdpo.data.schema import record_format, resolve_ref_columns, split_format, validate_records
from refdpo.data.templates import (
    Encoded,
    check_prefix,
    prior_conversation,
    prior_template,
    render_batch,
    render_full,
    render_prompt,
    tokenize_rendered,
)
from refdpo.errors import DataError, DataErrors
from refdpo.provenance import CONVERSATIONS, records_fingerprint
from refdpo.tokenization import files_fingerprint

log = logging.getLogger(__name__)
ON_TRUNCATED = ("drop", "error")
_CHUNK_PAIRS = 2048  # pairs rendered and tokenised at a time (the progress bar's step)


@dataclass
class PairData:
    """Tokenised pairs. Index i is the i-th kept pair; `rows[i]` is its row in the source split."""

    chosen: list[Encoded]
    rejected: list[Encoded]
    # float64 [N], None when training reference-free; [N, 2] when two column pairs were read (reference,
    # self) for a mixed reference: `mixed` makes it one.
    ref_chosen: np.ndarray | None
    ref_rejected: np.ndarray | None
    rows: np.ndarray  # int64 [N]
    source: str
    stats: dict = field(default_factory=dict)
    # The whole split it came from, for the provenance check: its sidecar, row count and conversations' digest.
    origin: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.chosen)

    def num_tokens(self, i: int) -> int:
        return len(self.chosen[i].input_ids) + len(self.rejected[i].input_ids)

    def mixed(self, lam: float | None) -> PairData:
        """The pairs against the geometric mixture p_lam ∝ p_ref^lam · p_self^(1-lam) of the two column pairs
        read: log p_lam(y|x) = lam·log p_ref(y|x) + (1-lam)·log p_self(y|x) + c(x). The normaliser c(x) depends
        only on the prompt, so it cancels in every pairwise objective and the mixture is exact from the stored
        columns (Aminian et al. 2025, arXiv 2502.01203; MRPO). One pair read: returned as it is."""
        if self.ref_chosen is None or self.ref_chosen.ndim == 1:
            return self
        weights = np.array([lam, 1.0 - lam])
        return dataclasses.replace(self, ref_chosen=self.ref_chosen @ weights, ref_rejected=self.ref_rejected @ weights)

    def token_counts(self) -> np.ndarray:
        """int64 [N]: each pair's chosen + rejected tokens (what batches are split by)."""
        return np.array([self.num_tokens(i) for i in range(len(self))], dtype=np.int64)


def _render(pairs: list, template: str, tokenizer, source: str, line_of) -> tuple[list[str], list[str]]:
    """One prompt per pair (chosen and rejected share it) and the two full texts, chosen then rejected."""
    batch = render_batch([c for _, (c, _) in pairs], [m for _, pair in pairs for m in pair], template, tokenizer)
    if batch is not None and all(full.startswith(batch[0][k // 2]) for k, full in enumerate(batch[1])):
        return batch
    prompts, fulls = [], []  # one by one: the row that fails is named
    for row, (chosen, rejected) in pairs:
        side = "chosen"
        try:  # a chat template's own error (jinja) belongs to this row
            prompt = render_prompt(chosen, template, tokenizer)
            full_c = render_full(chosen, template, tokenizer)
            check_prefix(prompt, full_c)
            side = "rejected"
            full_r = render_full(rejected, template, tokenizer)
            check_prefix(prompt, full_r)
        except Exception as e:
            raise DataError(source, f"template {template!r} failed: {e}", row=row, field=side,
                            line=line_of(row)) from None
        prompts.append(prompt)
        fulls += [full_c, full_r]
    return prompts, fulls


def build_pairs(raw: RawSplit, tokenizer, template: str, max_len: int,
                ref_columns: tuple[str, ...] | None, on_truncated: str = "drop", validate: bool = True,
                score_hint: str = "") -> PairData:
    """Validate, render and tokenise a split. `ref_columns=None`: no reference log-probs are read.
    `validate=False`: the records are conversation pairs derived from validated ones (prior mode).
    `score_hint`: the `refdpo score` command shown when the reference columns are missing."""
    if on_truncated not in ON_TRUNCATED:
        raise ValueError(f"on_truncated must be one of {ON_TRUNCATED}, got {on_truncated!r}")
    if not raw.records:
        raise DataError(raw.source, "has no records")
    fmt = split_format(raw.records, raw.source) if validate else "messages"  # the format, then its columns
    if ref_columns is not None:
        ref_columns = resolve_ref_columns(raw.columns, ref_columns, raw.source, score_hint)
    if validate:
        conversations = validate_records(raw.records, raw.source, ref_columns, raw.line_of, fmt)
    else:
        conversations = [(r["chosen"], r["rejected"]) for r in raw.records]

    encoded, merges = [], 0
    bar = progress_bar(total=len(conversations), desc=f"tokenize {raw.source}", unit=" pairs", delay=PROGRESS_DELAY,
               leave=False)
    for lo in range(0, len(conversations), _CHUNK_PAIRS):
        chunk = list(enumerate(conversations[lo:lo + _CHUNK_PAIRS], start=lo))
        prompts, fulls = _render(chunk, template, tokenizer, raw.source, raw.line_of)
        part, part_merges = tokenize_rendered(prompts, fulls, tokenizer, template, max_len,
                                              prompt_of=[k // 2 for k in range(len(fulls))])
        encoded += part
        merges += part_merges
        bar.update(len(chunk))
    bar.close()

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

    stats = {"data_format": fmt, "rows": len(raw.records), "pairs": len(keep),
             "dropped_truncated": len(raw.records) - len(keep), "partially_truncated": partial,
             "boundary_merges": merges, "max_len": max_len}
    ref_c = ref_r = None
    if ref_columns is not None:
        values = np.array([[float(raw.records[i][c]) for c in ref_columns] for i in keep], dtype=np.float64)
        ref_c, ref_r = values[:, 0::2], values[:, 1::2]  # [N, pairs]: one pair is one column
        if len(ref_columns) == 2:
            ref_c, ref_r = ref_c[:, 0], ref_r[:, 0]
        stats["ref_columns"] = list(ref_columns)
        stats["zero_logprobs"] = int(np.sum(ref_c == 0.0) + np.sum(ref_r == 0.0))
    data = PairData(chosen=[encoded[2 * i] for i in keep], rejected=[encoded[2 * i + 1] for i in keep],
                    ref_chosen=ref_c, ref_rejected=ref_r, rows=np.asarray(keep, dtype=np.int64),
                    source=raw.source, stats=stats)
    log_stats(data)
    return data


def log_stats(data: PairData) -> None:
    """What a user should know about a tokenised split (logged whether it was built or read from the cache)."""
    stats, source = data.stats, data.source
    if stats["dropped_truncated"]:
        log.warning("%s: dropped %d of %d pairs whose response is truncated away by max_len=%d",
                    source, stats["dropped_truncated"], stats["rows"], stats["max_len"])
    if stats["partially_truncated"]:
        log.info("%s: %d pairs have a response cut short by max_len=%d (kept; no end token)",
                 source, stats["partially_truncated"], stats["max_len"])
    if stats["boundary_merges"]:
        log.warning("%s: in %d conversations the tokenizer merges the prompt's last characters with the "
                    "response's first; the merged token counts as response", source, stats["boundary_merges"])
    if stats.get("zero_logprobs"):
        log.warning("%s: %d reference log-probs are exactly 0.0, which usually means the response was "
                    "truncated away when it was scored", source, stats["zero_logprobs"])


def reference_pairs(raw: RawSplit, tokenizer, template: str, max_len: int, on_truncated: str,
                    mode: str = "conditional", prior_prefix: str = "empty_user") -> tuple[PairData, str]:
    """The pairs as the reference sees them (its tokenizer and template; prior mode: prompt replaced), and the
    template actually rendered ("bos" for a bare-BOS prior)."""
    if mode == "conditional":
        return build_pairs(raw, tokenizer, template, max_len, None, on_truncated), template
    conversations = validate_records(raw.records, raw.source, None, raw.line_of)  # before the prompts go
    rendered = prior_template(template, prior_prefix, tokenizer)
    prior = [{"chosen": prior_conversation(c, prior_prefix), "rejected": prior_conversation(r, prior_prefix)}
             for c, r in conversations]
    view = RawSplit(prior, raw.source, raw.line_numbers)
    return build_pairs(view, tokenizer, rendered, max_len, None, on_truncated, validate=False), rendered


def conversations_fingerprint(records: list) -> str:
    """The digest a provenance entry keeps of the conversations scored: chosen and rejected, and the prompt
    of the formats that keep it apart (the messages format's digest is what it always was)."""
    fmt = next((f for f in map(record_format, records) if f is not None), "messages")
    return records_fingerprint(records, CONVERSATIONS if fmt == "messages" else ("prompt", *CONVERSATIONS))


def score_command(spec, split: str) -> str:
    """The `refdpo score` command that stores a reference's log-probs for this split (shown when they are
    missing)."""
    dataset = spec.dataset if isinstance(spec.dataset, str) else "DATA"
    config = f" --dataset_config {spec.dataset_config}" if getattr(spec, "dataset_config", None) else ""
    return (f"refdpo score --model REFERENCE --dataset {dataset}{config} --split {split} --template "
            f"{spec.template} --max_len {spec.max_len} --out {split}.scored.jsonl")


def load_pairs(spec, split: str, tokenizer, ref_columns: tuple[str, ...] | None, limit: int = 0,
               cache: dict | None = None, location: SplitLocation | None = None) -> PairData:
    """Load one split as `spec` (a DataSpec: dataset, config, revision, template, max_len, on_truncated,
    cache_dir) says, keep its first `limit` records (0: all), validate and tokenise them.

    A split tokenised before in the same way (same content, tokenizer files and versions, template, max_len,
    columns, limit and code) is read back from the disk cache (data/cache.py) instead. With `cache` (a
    sweep's, or evaluate's over checkpoints) it is also reused in memory. `location`: where the split is, when
    the caller located it already (locate_split)."""
    location = location or locate_split(spec.dataset, split, spec.dataset_config, spec.dataset_revision)
    settings = {"template": spec.template, "max_len": spec.max_len, "on_truncated": spec.on_truncated,
                "ref_columns": list(ref_columns) if ref_columns else None, "limit": limit}
    memory_key = (location.source, str(sorted(settings.items())), files_fingerprint(tokenizer))
    if cache is not None and memory_key in cache:
        return cache[memory_key]
    root = disk_cache.root(getattr(spec, "cache_dir", ""))
    fingerprint = location.fingerprint() if root is not None else None
    key = disk_cache.key(fingerprint, tokenizer, settings) if fingerprint is not None else None
    data = disk_cache.read(root, key, location.source) if key is not None else None
    if data is not None and data.origin.get("conversations_sha256") is None and _sidecar_exists(location):
        data = None  # a provenance sidecar appeared since: its check needs the records
    if data is None:
        raw = location.read()
        data = build_pairs(raw.head(limit), tokenizer, spec.template, spec.max_len, ref_columns,
                           spec.on_truncated, score_hint=score_command(spec, split))
        has_sidecar = raw.provenance is not None and raw.provenance.exists()
        data.origin = {"provenance": str(raw.provenance) if raw.provenance else None, "rows_total": len(raw),
                       "conversations_sha256": conversations_fingerprint(raw.records) if has_sidecar else None}
        if key is not None:
            disk_cache.write(root, key, data)
    else:
        data.origin["provenance"] = str(location.provenance) if location.provenance else None
        log_stats(data)
        log.info("%s: read from the cache (%s)", data.source, root)
    log.info("%s: %d pairs (%s)", data.source, len(data), ", ".join(f"{k} {v}" for k, v in data.stats.items()))
    if cache is not None:
        cache[memory_key] = data
    return data


def _sidecar_exists(location: SplitLocation) -> bool:
    return location.provenance is not None and location.provenance.exists()
