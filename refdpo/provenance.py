"""Provenance of stored reference log-probs: what scored them, how, and whether training matches (README: "Reference log-probs for any model").

`refdpo score` writes a JSON sidecar beside its output, one entry per reference column pair (a dataset may hold
several references):
  data.jsonl (data.parquet)   ->  data.jsonl.provenance.json (data.parquet.provenance.json)
  save_to_disk folder         ->  folder/refdpo_provenance.json
An entry records the reference (model id, revision, resolved commit, a fingerprint of its weight files, dtype,
backend), its tokenizer (a fingerprint of the whole tokenizer), the template (name, insert_eos, a fingerprint
of a rendered and tokenised probe conversation), the mode (conditional | prior, and the prior's prefix), max_len
and the truncation policy, and the rows scored.

`train` compares what it can: a fingerprint says whether the reference *is* the policy, and a shared tokenizer
makes template and max_len comparable. Mismatches are errors, or with --strict false warnings the run records.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from refdpo.errors import ConfigError
from refdpo.io import atomic_write_json
from refdpo.tokenization import PROBE, files_fingerprint

log = logging.getLogger(__name__)
_PROBE = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Say hi, then stop."},
          {"role": "assistant", "content": "Hi!"}]
_EDGE_BYTES = 1 << 20


# --- where a split's provenance lives ----------------------------------------------------------------------

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
FOLDER_SIDECAR = "refdpo_provenance.json"


def sidecar_path(data_path: str | Path, split: str | None = None) -> Path:
    """Where the provenance (refdpo/provenance.py) of a dataset file or folder lives: `train.jsonl` ->
    `train.jsonl.provenance.json` (so train.jsonl and train.parquet keep their own); a save_to_disk folder ->
    inside it; a DatasetDict folder -> `{split}.provenance.json` inside it."""
    path = Path(data_path)
    if path.suffix in FILE_SUFFIXES:
        return path.with_name(f"{path.name}.provenance.json")
    return path / (f"{split}.provenance.json" if split is not None else FOLDER_SIDECAR)


def hub_sidecar_name(config: str | None, split: str) -> str:
    """The name of a split's provenance in a Hub dataset repo (`refdpo score --push_to_hub` uploads it)."""
    return f"{config}_{split}.provenance.json" if config else f"{split}.provenance.json"


def hub_sidecar(dataset: str, config: str | None, split: str, revision: str | None) -> Path | None:
    """The provenance `refdpo score --push_to_hub` uploads beside a split, if the repo has one."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(dataset, hub_sidecar_name(config, split), repo_type="dataset",
                                    revision=revision))
    except Exception:  # no sidecar (most datasets), or offline: nothing to compare
        return None


def read(sidecar: Path | None) -> dict[str, dict]:
    """{"chosen_col,rejected_col": entry}; empty when there is no sidecar."""
    if sidecar is None or not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())["references"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{sidecar}: not a refdpo provenance file ({e})") from None


def write(sidecar: Path, entries: dict[str, dict]) -> None:
    atomic_write_json(sidecar, {"format": "refdpo-provenance/1", "references": entries})


def column_key(columns: tuple[str, str] | list[str]) -> str:
    return ",".join(columns)


def weights_fingerprint(model: str, revision: str | None = None) -> str | None:
    """sha256 over the names, sizes and first and last MiB of the weight files (headers and real values: a
    fine-tune differs from its base) — cheap even for 70B. None when the files cannot be found locally."""
    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(model, revision=revision, local_files_only=True,
                                            allow_patterns=["*.safetensors", "*.bin"]))
        except Exception:  # not cached, or not a hub id: nothing to fingerprint
            return None
    files = sorted(p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            digest.update(f.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                f.seek(size - _EDGE_BYTES)
                digest.update(f.read())
    return digest.hexdigest()


CONVERSATIONS = ("chosen", "rejected")


def records_fingerprint(records: list[dict], fields: tuple[str, ...] | None = None) -> str:
    """sha256 of the records in order: whole, or only `fields` (CONVERSATIONS: other columns may come and
    go, as references are added)."""
    digest = hashlib.sha256()
    for record in records:
        part = record if fields is None else [record.get(f) for f in fields]
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the files' fingerprint and of the token ids of tokenization.PROBE (special tokens followed by
    spaces, whitespace runs, ...): the same files tokenised otherwise here (another transformers or tokenizers
    version) give another fingerprint."""
    ids = [tokenizer(text)["input_ids"] for text in PROBE]
    return hashlib.sha256((files_fingerprint(tokenizer) + json.dumps(ids)).encode()).hexdigest()


def tokenizer_versions() -> dict:
    """The libraries that turn the files into tokens, for a provenance entry."""
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def tokenizer_drift(entry: dict, tokenizer) -> str | None:
    """The warning for data scored with the same tokenizer files that tokenise differently here, or None."""
    if entry.get("tokenizer_sha256") in (None, tokenizer_fingerprint(tokenizer)):
        return None
    if entry.get("tokenizer_files_sha256") != files_fingerprint(tokenizer):
        return None  # another tokenizer altogether: said elsewhere
    then = entry.get("tokenizer_versions") or {}
    now = tokenizer_versions()
    return ("tokenizer: the same files tokenise differently here (scored with transformers "
            f"{then.get('transformers', '?')}, tokenizers {then.get('tokenizers', '?')}; now {now['transformers']}, "
            f"{now['tokenizers']}): the stored log-probs cover other tokens than training would use")


def template_fingerprint(template: str, tokenizer, prior_prefix: str | None = None) -> str:
    """sha256 of a probe conversation rendered and tokenised as scoring does (text, BOS, EOS, boundary)."""
    from refdpo.data.templates import UNBOUNDED, prior_conversation, render, tokenize_rendered

    messages = _PROBE if prior_prefix is None else prior_conversation(_PROBE, prior_prefix)
    if template == "model":
        messages = messages[1:] if prior_prefix is None else messages  # not every chat template takes a system turn
    try:
        prompt, full = render(messages, template, tokenizer)
    except Exception as e:  # the template cannot render the probe: record that instead
        return f"unrenderable: {type(e).__name__}"
    encoded, _ = tokenize_rendered([prompt], [full], tokenizer, template, UNBOUNDED)
    ids = encoded[0].input_ids.tolist()
    return hashlib.sha256(json.dumps([template, ids, encoded[0].response_start]).encode()).hexdigest()


def is_same_model(entry: dict, model: str, revision: str | None, fingerprint: str | None) -> bool | None:
    """Is the entry's reference this model? None when it cannot be told."""
    stored = entry.get("weights_sha256")
    if stored and fingerprint:
        return stored == fingerprint
    if Path(model).exists():
        return entry.get("model_path") == str(Path(model).resolve())
    if entry.get("model") == model:
        return entry.get("revision") == revision
    return None


def training_report(entry: dict, *, model: str, revision: str | None, tokenizer, template: str, max_len: int,
                    rows: int, longest: int, conversations: str | None = None) -> tuple[list[str], list[str]]:
    """(warnings, notes) comparing how a column pair was scored with how it is about to be used.

    `rows`: rows in the split now; `longest`: its longest tokenised sequence under the training tokenizer;
    `conversations`: the split's records_fingerprint(records, CONVERSATIONS)."""
    warnings, notes = [], []
    fingerprint = weights_fingerprint(model, revision)
    same = is_same_model(entry, model, revision, fingerprint)
    where = f"reference {entry.get('model')!r} ({entry.get('mode', 'conditional')}"
    where += f", prefix {entry['prior_prefix']})" if entry.get("mode") == "prior" else ")"
    if same:
        notes.append(f"{where} is the policy itself")
    elif same is None:
        notes.append(f"{where}: cannot tell whether it is the policy")
    else:
        notes.append(f"{where} is not the policy")
        if entry.get("model") == model or entry.get("model_path") == str(Path(model).resolve()):
            warnings.append(f"the reference was scored with {model!r}, whose weights have changed since "
                            "(their fingerprint differs)")
    same_tokenizer = entry.get("tokenizer_sha256") == tokenizer_fingerprint(tokenizer)
    if drift := tokenizer_drift(entry, tokenizer):
        warnings.append(drift)
    if same or same_tokenizer:  # template and max_len are comparable only with the same tokenizer
        scored = entry.get("template")
        if entry.get("mode") != "prior" and scored != template:
            warnings.append(f"scored with template {scored!r} (insert_eos {scored == 'zephyr'}) but training "
                            f"uses {template!r} (insert_eos {template == 'zephyr'})")
        elif entry.get("mode") != "prior" and entry.get("template_sha256") != template_fingerprint(template,
                                                                                                  tokenizer):
            warnings.append(f"template {template!r} renders differently now than when the data was scored "
                            "(chat template or special tokens changed)")
        scored_len = entry.get("max_len")
        if scored_len is not None and scored_len != max_len and longest > min(scored_len, max_len):
            warnings.append(f"scored with max_len {scored_len} but training uses {max_len}, and some sequences "
                            f"({longest} tokens) are longer than the smaller: those log-probs cover other spans")
    if entry.get("rows_out") is not None and entry["rows_out"] != rows:
        warnings.append(f"{entry['rows_out']} rows were scored but the split now has {rows}: the data changed "
                        "after scoring")
    elif conversations and entry.get("conversations_sha256") not in (None, conversations):
        warnings.append("the split's conversations changed after scoring (same row count, other content or "
                        "order)")
    return warnings, notes


# --- an entry, as `refdpo score` writes it ---------------------------------------------------------------

def reference_entry(cfg, model, tokenizer, rendered: str, raw, data, weights: str | None, dtype: str,
                    manifest: dict, coverage: dict) -> dict:
    """The entry of one scored column pair (cfg: a ScoreConfig; raw: the RawSplit; data: its PairData)."""
    from refdpo import __version__
    from refdpo.data.schema import parse_ref_columns

    local = Path(cfg.model).exists()
    prior = cfg.mode == "prior"
    return {
        "columns": list(parse_ref_columns(cfg.columns)), "refdpo_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": cfg.model, "model_path": str(Path(cfg.model).resolve()) if local else None,
        "revision": cfg.revision, "commit": getattr(getattr(model, "config", None), "_commit_hash", None),
        "weights_sha256": weights, "dtype": dtype, "backend": cfg.backend, "device_map": cfg.device_map,
        "tokenizer": cfg.tokenizer or cfg.model, "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "tokenizer_files_sha256": files_fingerprint(tokenizer),
        "tokenizer_versions": tokenizer_versions(),
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "template": cfg.template, "insert_eos": cfg.template == "zephyr",
        "template_sha256": template_fingerprint(rendered, tokenizer, cfg.prior_prefix if prior else None),
        "mode": cfg.mode, "prior_prefix": cfg.prior_prefix if prior else None,
        "max_len": cfg.max_len, "on_truncated": cfg.on_truncated,
        "dataset": cfg.dataset, "dataset_config": cfg.dataset_config, "split": cfg.split, "source": raw.source,
        "rows_in": len(raw), "rows_out": len(data), **{k: data.stats[k] for k in (
            "dropped_truncated", "partially_truncated", "boundary_merges")},
        "coverage": coverage, "layout": {"fused_head": manifest["fused"], "shared_prompt": manifest["share"]},
    }


def check_for_training(data, tokenizer, cfg, strict: bool = True) -> list[str]:
    """Compare how a split's reference columns were scored (its provenance) with the run about to use them
    (`cfg`: model, revision, template, max_len): log what matches; refuse (ConfigError, naming every mismatch
    and the override) what would make the stored log-probs mean something else than the objective assumes, or
    without `strict` warn and return those mismatches for the run to record. `data`: a PairData, whose
    `origin` describes the whole split it came from."""
    columns, origin = data.stats["ref_columns"], data.origin
    sidecar = Path(origin["provenance"]) if origin.get("provenance") else None
    entries = read(sidecar)
    longest = max(e.full_length for seqs in (data.chosen, data.rejected) for e in seqs)
    warnings, notes = [], []
    for pair in (columns[i:i + 2] for i in range(0, len(columns), 2)):  # two pairs: a mixed reference
        entry = entries.get(column_key(pair))
        if entry is None:
            log.info("%s: no provenance for %s (not written by refdpo score): how they were scored is unchecked",
                     data.source, ",".join(pair))
            continue
        more_warnings, more_notes = training_report(
            entry, model=cfg.model, revision=cfg.revision, tokenizer=tokenizer, template=cfg.template,
            max_len=cfg.max_len, rows=origin["rows_total"], longest=longest,
            conversations=origin.get("conversations_sha256"))
        label = f"{','.join(pair)}: " if len(columns) > 2 else ""
        warnings += [label + w for w in more_warnings]
        notes += [label + n for n in more_notes]
    for note in notes:
        log.info("%s: %s", data.source, note)
    if warnings and strict:
        raise ConfigError(f"{data.source}: the reference log-probs do not match this run: " + "; ".join(warnings)
                          + " (rescore with `refdpo score`, or train anyway with --strict false: the run records "
                          "the mismatch)")
    for warning in warnings:
        log.warning("%s: %s (trained anyway: --strict false; recorded in summary.json)", data.source, warning)
    return warnings
