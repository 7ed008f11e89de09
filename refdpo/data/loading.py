"""Load one split of preference records: from the Hugging Face Hub, JSON lines, parquet or `save_to_disk`.

Where a split lives, in the order tried:
  1. `split` is itself a file or `save_to_disk` folder: that is the split (`--val_split data/val.jsonl`).
  2. `dataset` is a folder: `save_to_disk` DatasetDict[split]; else a file named `{split}`, `{config}_{split}`
     or `{config}/{split}` with extension .jsonl/.json/.parquet (the RefDPO hub layout is `{config}_{split}.jsonl`).
  3. `dataset` is a file or a single (not DatasetDict) save_to_disk folder: the training split (the
     validation split must then be named by path).
  4. otherwise a hub id: `datasets.load_dataset(dataset, config, split=split, revision=revision)`.
JSON lines are parsed here rather than by `datasets` so a broken line is reported by file and line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from refdpo.errors import DataError, first_line
from refdpo.provenance import FILE_SUFFIXES, hub_sidecar, sidecar_path


@dataclass
class RawSplit:
    """The records of one split, with where they came from (for error messages and provenance)."""

    records: list[dict]
    source: str
    line_numbers: list[int] | None = None  # 1-based line of each record in a JSON-lines file
    provenance: Path | None = None  # where its provenance sidecar is (None for the hub)

    def __len__(self) -> int:
        return len(self.records)

    def line_of(self, row: int) -> int | None:
        return self.line_numbers[row] if self.line_numbers else None

    def head(self, n: int) -> RawSplit:
        """The first `n` records (all when n is 0), with their line numbers and provenance."""
        if not n or n >= len(self.records):
            return self
        lines = self.line_numbers[:n] if self.line_numbers else None
        return RawSplit(self.records[:n], self.source, lines, self.provenance)

    @property
    def columns(self) -> set[str]:
        """Every field that appears in any record (a column missing from some rows is reported per row)."""
        names: set[str] = set()
        for record in self.records:
            names.update(record)
        return names


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()
                              or (path / "dataset_dict.json").exists())


def load_jsonl(path: Path) -> RawSplit:
    """JSON lines (a .json file may instead hold one JSON array); blank lines are skipped, a broken line names
    its line number."""
    source = str(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(source, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        for row, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataError(source, f"a record must be an object, got {type(record).__name__}", row=row)
        return RawSplit(records, source, provenance=sidecar_path(path))
    records, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(source, f"invalid JSON at column {e.colno}: {e.msg}", row=len(records),
                            line=lineno) from None
        if not isinstance(record, dict):
            raise DataError(source, f"a record must be a JSON object, got {type(record).__name__}",
                            row=len(records), line=lineno)
        records.append(record)
        lines.append(lineno)
    return RawSplit(records, source, lines, sidecar_path(path))


def _from_datasets(ds, source: str) -> RawSplit:
    return RawSplit(ds.to_list(), source)


def _read_path(path: Path, split: str) -> RawSplit:
    import datasets

    if _is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(str(path), f"split {split!r} not found; it has {', '.join(loaded)}")
            raw = _from_datasets(loaded[split], f"{path}[{split}]")
            raw.provenance = sidecar_path(path, split)
            return raw
        raw = _from_datasets(loaded, str(path))
        raw.provenance = sidecar_path(path)
        return raw
    if path.suffix in (".jsonl", ".json"):
        return load_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:  # read directly: no cache files, no progress bar before an error message
            return RawSplit(pq.read_table(path).to_pylist(), str(path), provenance=sidecar_path(path))
        except Exception as e:  # arrow raises many types; the user needs the file and the reason
            raise DataError(str(path), f"cannot read parquet: {e}") from None
    raise DataError(str(path), f"unsupported file type {path.suffix!r} (use {', '.join(FILE_SUFFIXES)} "
                               "or a save_to_disk folder)")


def _find_in_folder(folder: Path, config: str | None, split: str) -> Path | None:
    if (folder / "dataset_dict.json").exists():
        return folder
    stems = [split] + ([f"{config}_{split}", f"{config}/{split}"] if config else [])
    for stem in stems:
        if _is_saved_dataset(folder / stem):
            return folder / stem
        for suffix in FILE_SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return None


def load_split(dataset: str, split: str, config: str | None = None, revision: str | None = None) -> RawSplit:
    """Load one split of `dataset` (see the module docstring for how a split is found)."""
    split_path = Path(split)
    if split_path.is_file() or _is_saved_dataset(split_path):
        return _read_path(split_path, split)
    path = Path(dataset)
    if path.is_dir() and not (_is_saved_dataset(path) and not (path / "dataset_dict.json").exists()):
        found = _find_in_folder(path, config, split)
        if found is None:
            raise DataError(str(path), f"no split {split!r} here: expected {split}.jsonl, {split}.parquet, "
                                       f"a save_to_disk folder, or pass the split's path")
        return _read_path(found, split)
    if path.exists():  # a file, or one saved Dataset
        if split != "train":
            raise DataError(str(path), f"holds a single split, so split {split!r} must be given as a path "
                                       f"(e.g. --val_split val.jsonl)")
        return _read_path(path, split)
    if path.suffix in FILE_SUFFIXES or dataset.startswith((".", "/")):
        raise DataError(dataset, "no such file or folder")
    return _load_hub(dataset, config, split, revision)


def _load_hub(dataset: str, config: str | None, split: str, revision: str | None) -> RawSplit:
    import datasets

    source = f"{dataset}" + (f"[{config}]" if config else "") + f"/{split}"
    try:
        ds = datasets.load_dataset(dataset, config, split=split, revision=revision)
    except Exception as e:  # offline, unknown id, unknown config/split: all reach the user as one line
        raise DataError(source, f"cannot load from the Hugging Face Hub: {type(e).__name__}: "
                                f"{first_line(e)}") from None
    raw = _from_datasets(ds, source)
    raw.provenance = hub_sidecar(dataset, config, split, revision)
    return raw


