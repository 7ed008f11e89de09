"""`refdpo advise`: before training, say per candidate reference whether it will help the policy (use it,
mix it with the self reference, or don't), which β (and mixture weight λ) to train with, and why, from the
log-prob columns stored in a split (refdpo/advise/: the scores and rules; report.py: intervals, tables, plots).

  refdpo advise --dataset D --split val --references mistralv2=mv2_chosen,mv2_rejected free=none
  refdpo advise --dataset D --split val --policy MODEL --references ...   # scores the self columns first

The self reference is the policy's own columns (--self_columns); `NAME=none` is the uniform reference
(reference-free DPO). Token counts for the length-scaled β rule come from --tokenizer (or --policy) on a sample
of replies; without either, that rule is skipped and said so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refdpo import provenance as prov
from refdpo.advise.scores import Columns
from refdpo.config import DataSpec, check_all, option
from refdpo.data import parse_ref_columns
from refdpo.data.loading import RawSplit, locate_split
from refdpo.data.schema import DEFAULT_REF_COLUMNS, logprob_columns, resolve_ref_columns, validate_records
from refdpo.errors import ConfigError, DataError
from refdpo.io import require_writable

log = logging.getLogger(__name__)
DEFAULT_GRID = "10,3,1,0.3,0.1,0.03,0.01,0.003"
UNIFORM = "none"  # NAME=none: the uniform reference, margin 0


@dataclass
class AdviseConfig(DataSpec):
    split: str = option("val", "split name, or a path to its file (a held-out split: a checkpoint used as a "
                               "reference has seen its training split)")
    references: str = option("", "candidate references NAME=CHOSEN,REJECTED ... (space- or ;-separated; "
                                  "NAME=none: the uniform reference, i.e. reference-free); CHOSEN,REJECTED@SOURCE "
                                  "reads them from another split whose pairs are matched by their text: SOURCE a "
                                  "file or folder, or config:NAME (another config of --dataset, as RefDPO keeps "
                                  "each reference)")
    self_columns: str = option(",".join(DEFAULT_REF_COLUMNS), "the policy's own log-prob columns CHOSEN,REJECTED")
    policy: str | None = option(None, "the policy model: scores --self_columns with `refdpo score` when the split "
                                      "lacks them, and counts reply tokens")
    tokenizer: str | None = option(None, "the policy's tokenizer, for reply lengths in tokens (default: --policy's)")
    token_sample: int = option(2000, "replies tokenised to estimate tokens per byte (0: all)")
    bootstrap: int = option(500, "bootstrap resamples over prompts for the 95% intervals (0: none)")
    bootstrap_prompts: int = option(2000, "prompts per bootstrap draw: a larger split is resampled m-out-of-n and "
                                          "the intervals rescaled (refdpo/advise/report.py), which keeps 60k pairs "
                                          "to seconds")
    betas: str = option(DEFAULT_GRID, "the β grid of the plot (and where a recommendation falls)")
    out: str = option("advise", "folder for advise.md/.csv/.json and the plots")
    seed: int = option(0, "bootstrap seed")
    workers: int = option(0, "processes for the references' bootstraps (0: one per CPU core; the numbers do not "
                             "depend on it)")
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> AdviseConfig:
        check_all(self.spec_checks() + [
            (bool(self.references.strip()), "--references is required: NAME=CHOSEN,REJECTED ..."),
            (self.token_sample >= 0 and self.bootstrap >= 0, "--token_sample and --bootstrap must be >= 0"),
            (self.bootstrap_prompts >= 10, "--bootstrap_prompts must be >= 10"),
            (self.workers >= 0, "--workers must be >= 0"),
        ])
        self.reference_specs()
        self.grid()
        parse_ref_columns(self.self_columns)
        return self

    def reference_specs(self) -> dict[str, tuple[tuple[str, str] | None, str | None]]:
        """NAME -> ((CHOSEN, REJECTED), or None for the uniform reference; SOURCE, or None for --dataset's
        split itself)."""
        specs = {}
        for item in (s for s in re.split(r"[\s;]+", self.references.strip()) if s):
            name, sep, spec = item.partition("=")
            if not sep or not name:
                raise ConfigError(f"--references: expected NAME=CHOSEN,REJECTED[@SOURCE], got {item!r}")
            if name in specs:
                raise ConfigError(f"--references: {name!r} is named twice")
            columns, _, source = spec.partition("@")
            specs[name] = (None if columns == UNIFORM else tuple(parse_ref_columns(columns)), source or None)
        return specs

    def grid(self) -> list[float]:
        try:
            values = sorted({float(b) for b in self.betas.split(",") if b.strip()})
        except ValueError:
            raise ConfigError(f"--betas: expected comma-separated numbers, got {self.betas!r}") from None
        if not values or values[0] <= 0:
            raise ConfigError(f"--betas: expected positive numbers, got {self.betas!r}")
        return values


def _reply(conversation) -> str:
    return str(conversation[-1].get("content") or "")


def _scored_split(cfg: AdviseConfig, location) -> tuple[RawSplit, set[str]]:
    """The split with the self columns, as it is or scored by --policy through `refdpo score` into OUT, and its
    column names (a scan of every record: done once)."""
    raw = location.read()
    names = raw.columns
    if set(parse_ref_columns(cfg.self_columns)) <= names or not cfg.policy:
        return raw, names
    from refdpo.commands.score import ScoreConfig, score

    target = Path(cfg.out) / f"{Path(str(cfg.split)).stem}.self.jsonl"
    job = ScoreConfig(model=cfg.policy, tokenizer=cfg.tokenizer, dataset=cfg.dataset,
                      dataset_config=cfg.dataset_config, dataset_revision=cfg.dataset_revision, split=cfg.split,
                      out=str(target), columns=cfg.self_columns, template=cfg.template, max_len=cfg.max_len,
                      on_truncated=cfg.on_truncated, progress=cfg.progress, overwrite=True).validate()
    entry = prov.read(prov.sidecar_path(target)).get(prov.column_key(parse_ref_columns(cfg.self_columns)), {})
    scored_as = {k: entry.get(k) for k in ("model", "template", "max_len", "dataset", "dataset_config", "split")}
    if target.is_file() and scored_as == {k: getattr(job, k) for k in scored_as} and entry.get("rows_in") == len(raw):
        log.info("%s: the self columns scored before (%s)", raw.source, target)  # a second advise: reused
    else:
        log.info("%s: no %s columns: scoring them with %s into %s", raw.source, cfg.self_columns, cfg.policy,
                 target)
        score(job)
    raw = locate_split(str(target.parent), str(target)).read()
    return raw, raw.columns


def _tokens_per_byte(cfg: AdviseConfig, replies: list[str], rng: np.random.Generator) -> float | None:
    """Policy tokens per UTF-8 byte of reply text (one EOS per reply included), on a sample of replies. A folder
    with a tokenizer.json is read by `tokenizers` alone (what refdpo's tokenizer loading uses as written; a
    tenth of the time of loading it through transformers)."""
    name = cfg.tokenizer or cfg.policy
    if not name:
        return None
    if cfg.token_sample and len(replies) > cfg.token_sample:
        replies = [replies[i] for i in rng.choice(len(replies), cfg.token_sample, replace=False)]
    if (Path(name) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        encoded = Tokenizer.from_file(str(Path(name) / "tokenizer.json")).encode_batch(replies,
                                                                                       add_special_tokens=False)
        counts = [len(e.ids) for e in encoded]
    else:
        from refdpo.tokenization import load_tokenizer

        counts = list(map(len, load_tokenizer(name, None, False)(replies, add_special_tokens=False)["input_ids"]))
    return (sum(counts) + len(replies)) / max(sum(len(r.encode()) for r in replies), 1)


def _conversation_keys(pairs: list) -> list[bytes]:
    """A digest of each pair's two conversations: how rows of two splits are matched."""
    return [hashlib.blake2b(json.dumps(pair, sort_keys=True, ensure_ascii=False, default=str).encode(),
                            digest_size=16).digest() for pair in pairs]


def _other_source(cfg: AdviseConfig, source: str, columns: list[str], keys: list[bytes]) -> tuple[dict, np.ndarray]:
    """The log-prob `columns` of another split, aligned to the main split's rows by their conversations:
    (column -> float64 [N] with NaN where unmatched, bool [N] matched)."""
    if source.startswith("config:"):
        location = locate_split(cfg.dataset, cfg.split, source[len("config:"):], cfg.dataset_revision)
    else:
        location = locate_split(source, cfg.split)
    raw = location.read()
    names = raw.columns
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(raw.source, f"no column(s) {', '.join(missing)} for --references", field=missing[0])
    values = logprob_columns(raw.records, columns, raw.source, raw.line_of)
    where = {key: row for row, key in enumerate(_conversation_keys(validate_records(raw.records, raw.source, None,
                                                                                     raw.line_of)))}
    rows = np.array([where.get(key, -1) for key in keys])
    matched = rows >= 0
    if not matched.any():
        raise DataError(raw.source, f"none of its {len(raw.records)} pairs has the conversations of a pair of "
                                    f"{cfg.split} (they are matched by their text)")
    return {c: np.where(matched, values[c][np.maximum(rows, 0)], np.nan) for c in columns}, matched


def load_columns(cfg: AdviseConfig) -> tuple[dict[str, Columns], dict]:
    """Per reference, its Columns against the self columns (on the pairs it has); and what was read."""
    specs = cfg.reference_specs()
    location = locate_split(cfg.dataset, cfg.split, cfg.dataset_config, cfg.dataset_revision)
    raw, names = _scored_split(cfg, location)
    if not raw.records:
        raise DataError(raw.source, "has no records")
    self_pair = resolve_ref_columns(names, parse_ref_columns(cfg.self_columns), raw.source,
                                    f"refdpo advise --policy MODEL (or refdpo score --model POLICY --split {cfg.split})")
    needed = [c for pair, source in specs.values() if pair and not source for c in pair]
    missing = [c for c in needed if c not in names]
    if missing:
        raise DataError(raw.source, f"no column(s) {', '.join(missing)} for --references (columns that look like "
                                    f"log-probs: {', '.join(sorted(c for c in names if 'logp' in c))})",
                        field=missing[0])
    pairs = validate_records(raw.records, raw.source, None, raw.line_of)
    column = logprob_columns(raw.records, list(dict.fromkeys((*self_pair, *needed))), raw.source, raw.line_of)
    everywhere = np.ones(len(pairs), dtype=bool)
    matched = {name: everywhere for name in specs}
    sources = {source for _, source in specs.values() if source}
    keys = _conversation_keys(pairs) if sources else []
    for source in sorted(sources):
        wanted = [c for pair, s in specs.values() if s == source and pair for c in pair]
        found, where = _other_source(cfg, source, list(dict.fromkeys(wanted)), keys)
        column.update({f"{c}@{source}": v for c, v in found.items()})
        matched.update({name: where for name, (_, s) in specs.items() if s == source})
    chosen, rejected = [_reply(c) for c, _ in pairs], [_reply(r) for _, r in pairs]
    bytes_c = np.array([len(t.encode()) for t in chosen], dtype=np.float64)
    bytes_r = np.array([len(t.encode()) for t in rejected], dtype=np.float64)
    ids: dict[str, int] = {}  # prompt (every turn before the reply) -> its number, in order of appearance
    prompt_ids = np.array([ids.setdefault(repr(c[:-1]), len(ids)) for c, _ in pairs], dtype=np.int64)
    per_byte = _tokens_per_byte(cfg, chosen + rejected, np.random.default_rng(cfg.seed))
    tokens = (None, None) if per_byte is None else (bytes_c * per_byte, bytes_r * per_byte)
    columns = {}
    for name, (pair, source) in specs.items():
        ref = [column[f"{c}@{source}" if source else c] for c in pair] if pair else [None, None]
        full = Columns(column[self_pair[0]], column[self_pair[1]], *ref, bytes_c, bytes_r, *tokens, prompt_ids)
        columns[name] = full if matched[name].all() else _renumbered(full.take(np.flatnonzero(matched[name])))
    info = {"source": raw.source, "pairs": len(raw.records), "prompts": len(ids),
            "self_columns": list(self_pair), "tokens_per_byte": per_byte,
            "references": {n: {"columns": list(p) if p else UNIFORM, "source": s, "pairs": int(matched[n].sum())}
                           for n, (p, s) in specs.items()}}
    return columns, info


def _renumbered(c: Columns) -> Columns:
    """Prompt ids 0..P-1 again after a subset was taken (the bootstrap counts prompts by them)."""
    return dataclasses.replace(c, prompt_ids=np.unique(c.prompt_ids, return_inverse=True)[1])


def advise_split(cfg: AdviseConfig) -> dict:
    """Everything `refdpo advise` prints and writes; returns the report."""
    from refdpo.advise.report import assess

    cfg = cfg.validate().require()
    require_writable(cfg.out, "--out")
    columns, info = load_columns(cfg)
    workers = min(len(columns), cfg.workers or os.cpu_count() or 1)
    boot = [(assess, (c, cfg.bootstrap, cfg.seed, cfg.bootstrap_prompts, cfg.progress and workers == 1))
            for c in columns.values()]
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return _report(cfg, columns, info, [function(*args) for function, args in boot], None)
    # The references' bootstraps, then the plots, are independent: one process each (fork: nothing is copied).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        def run_jobs(jobs: list[tuple]) -> list:
            return [future.result() for future in [pool.submit(function, *args) for function, args in jobs]]

        return _report(cfg, columns, info, run_jobs(boot), run_jobs)


def _report(cfg: AdviseConfig, columns: dict[str, Columns], info: dict, assessed: list, run_jobs) -> dict:
    from refdpo.advise.report import write_report

    results = dict(zip(columns, assessed))
    return write_report(results, columns, info, cfg.grid(), Path(cfg.out), dataclasses.asdict(cfg), run_jobs)
