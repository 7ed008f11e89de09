"""The disk cache of tokenised splits: a second run over the same data starts in seconds.

An entry is a folder `<root>/pairs/<key>/` holding one `.npy` file per array (every kept sequence's token ids,
end to end, with their lengths, response starts and untruncated lengths; the rows kept; the reference
log-probs) and `meta.json` (source, statistics, the whole split's provenance facts). The token ids are
memory-mapped (copy-on-write), so reading an entry costs next to nothing until the batches touch them.
The key is a digest of everything the result depends on: the split's content (a file's sha256, a `datasets`
fingerprint), the tokenizer's files, class and library versions, the template, max_len, truncation policy,
reference columns and row limit, and the source of the code that renders and tokenises (so a changed refdpo
never reads a stale entry).

`--cache_dir` picks the root: '' means $REFDPO_CACHE, else ~/.cache/refdpo; 'none' turns the cache off.
Entries are written to a temporary sibling and renamed into place, so a reader never sees half of one, and
processes that build the same entry at once leave one whole copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from refdpo.io import atomic_write_json

log = logging.getLogger(__name__)
_CODE = ("schema.py", "templates.py", "pairs.py", "cache.py")  # the code a cached entry was made by


def root(setting: str | None) -> Path | None:
    """The cache's root folder, or None when caching is off (`--cache_dir none`)."""
    if setting and setting.lower() == "none":
        return None
    if setting:
        return Path(setting)
    env = os.environ.get("REFDPO_CACHE")
    if env:
        return None if env.lower() == "none" else Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refdpo"


def key(data_fingerprint: str, tokenizer, settings: dict) -> str:
    """The digest of everything a tokenised split depends on (module docstring)."""
    import tokenizers
    import transformers

    from refdpo.tokenization import files_fingerprint

    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _CODE)).hexdigest()
    parts = {"data": data_fingerprint, "tokenizer": files_fingerprint(tokenizer),
             "tokenizer_class": type(tokenizer).__name__, "transformers": transformers.__version__,
             "tokenizers": tokenizers.__version__, "code": code, **settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def write(cache_root: Path, entry_key: str, data) -> None:
    """Store a PairData; a failure to write (a full disk, a read-only folder) costs only the cache."""
    target = cache_root / "pairs" / entry_key
    if target.exists():
        return
    tmp = target.with_name(f".{entry_key}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        sequences = [s for pair in zip(data.chosen, data.rejected) for s in pair]
        arrays = {
            "ids": np.concatenate([s.input_ids for s in sequences]),
            "lengths": np.array([len(s.input_ids) for s in sequences], dtype=np.int64),
            "response_start": np.array([s.response_start for s in sequences], dtype=np.int64),
            "full_length": np.array([s.full_length for s in sequences], dtype=np.int64),
            "rows": data.rows}
        if data.ref_chosen is not None:
            arrays.update(ref_chosen=data.ref_chosen, ref_rejected=data.ref_rejected)
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        atomic_write_json(tmp / "meta.json", {"source": data.source, "stats": data.stats, "origin": data.origin,
                                              "arrays": sorted(arrays)})
        os.replace(tmp, target)
    except OSError as e:
        log.warning("could not write the data cache %s: %s", target, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read(cache_root: Path, entry_key: str, source: str):
    """The PairData stored under `entry_key`, or None (absent or unreadable: then it is simply rebuilt)."""
    from refdpo.data.pairs import PairData
    from refdpo.data.templates import Encoded

    folder = cache_root / "pairs" / entry_key
    try:
        meta = json.loads((folder / "meta.json").read_text())
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c" if name == "ids" else None)
                  for name in meta["arrays"]}
    except (OSError, ValueError, KeyError):
        return None
    ids, lengths = arrays["ids"].view(np.ndarray), arrays["lengths"]  # still the mapping; slices 4x cheaper
    if ids.shape != (int(lengths.sum()),):
        return None  # a truncated file
    ends = np.cumsum(lengths).tolist()
    sequences = [Encoded(ids[end - length:end], start, full) for end, length, start, full in
                 zip(ends, lengths.tolist(), arrays["response_start"].tolist(), arrays["full_length"].tolist())]
    # The split is named as it is now (a renamed folder with the same content is the same entry).
    return PairData(chosen=sequences[0::2], rejected=sequences[1::2], ref_chosen=arrays.get("ref_chosen"),
                    ref_rejected=arrays.get("ref_rejected"), rows=arrays["rows"], source=source,
                    stats=meta["stats"], origin=meta["origin"])
