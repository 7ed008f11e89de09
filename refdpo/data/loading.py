"""Find and read one split of preference records: from the Hugging Face Hub, JSON lines, parquet, CSV,
`save_to_disk`, or a `datasets.Dataset` / list of records handed over in Python.

Where a split lives, in the order tried (`locate_split`, which reads nothing, so that a missing validation
split is reported before the training split is read):
  1. `split` is itself a file or `save_to_disk` folder: that is the split (`--val_split data/val.jsonl`).
  2. `dataset` is a folder: `save_to_disk` DatasetDict[split]; else a file named `{split}`, `{config}_{split}`
     or `{config}/{split}` with extension .jsonl/.json/.parquet/.csv (RefDPO's hub layout is `{config}_{split}.jsonl`).
  3. `dataset` is a file or a single (not DatasetDict) save_to_disk folder: the training split (the
     validation split must then be named by path).
  4. otherwise a hub id: `datasets.load_dataset(dataset, config, split=split, revision=revision)`.
JSON lines are parsed here rather than by `datasets` so a broken line is reported by file and line number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from refdpo.console import progress_bar
from refdpo.errors import DataError, first_line
from refdpo.io import looks_local
from refdpo.provenance import FILE_SUFFIXES, hub_sidecar, sidecar_path

PROGRESS_DELAY = 1.0  # seconds before a bar appears: small splits load without one (and stderr stays clean)


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


@dataclass
class SplitLocation:
    """Where one split is, found without reading it: a file, a saved dataset, a hub split or an object."""

    kind: str  # jsonl | parquet | csv | saved | hub | object
    source: str  # how errors and logs name it
    path: Path | None = None
    split: str | None = None  # the DatasetDict key of a saved folder
    hub: tuple | None = None  # (dataset, config, split, revision)
    provenance: Path | None = None
    obj: object = field(default=None, repr=False)  # a datasets.Dataset or list of records (Python API)

    def read(self) -> RawSplit:
        """The records (JSON lines: with their line numbers)."""
        if self.kind == "object":
            records = self.obj if isinstance(self.obj, list) else self.obj.to_list()
            return RawSplit(list(records), self.source)
        if self.kind == "jsonl":
            return load_jsonl(self.path)
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            try:  # read directly: no cache files, no progress bar before an error message
                return RawSplit(pq.read_table(self.path).to_pylist(), self.source, provenance=self.provenance)
            except Exception as e:  # arrow raises many types; the user needs the file and the reason
                raise DataError(self.source, f"cannot read parquet: {e}") from None
        if self.kind == "csv":
            return _read_csv(self.path, self.provenance)
        return RawSplit(self.dataset().to_list(), self.source, provenance=self.provenance)

    def dataset(self):
        """The `datasets.Dataset` of a saved folder or hub split (memory-mapped arrow: cheap until read)."""
        if self.obj is None:
            self.obj = _load_saved(self) if self.kind == "saved" else _load_hub(*self.hub, self.source)
            if self.kind == "hub":
                self.provenance = hub_sidecar(*self.hub)
        return self.obj

    def fingerprint(self) -> str | None:
        """A digest of the split's content (a disk cache key); None for a list of records handed over."""
        if self.kind in ("jsonl", "parquet", "csv"):
            return f"sha256:{_file_sha256(self.path)}"
        if self.kind == "object" and isinstance(self.obj, list):
            return None
        return f"datasets:{self.dataset()._fingerprint}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


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
    lines_of_text = text.splitlines()
    bar = progress_bar(total=len(lines_of_text), desc=f"read {path.name}", unit=" lines", unit_scale=True,
               delay=PROGRESS_DELAY, leave=False)
    for lineno, line in enumerate(lines_of_text, start=1):
        if lineno % 8192 == 0:
            bar.update(lineno - bar.n)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            bar.close()
            raise DataError(source, f"invalid JSON at column {e.colno}: {e.msg}", row=len(records),
                            line=lineno) from None
        if not isinstance(record, dict):
            bar.close()
            raise DataError(source, f"a record must be a JSON object, got {type(record).__name__}",
                            row=len(records), line=lineno)
        records.append(record)
        lines.append(lineno)
    bar.close()
    return RawSplit(records, source, lines, sidecar_path(path))


def _read_csv(path: Path, provenance: Path | None) -> RawSplit:
    """A CSV file of TRL's standard format (prompt, chosen, rejected, and numeric log-prob columns)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(str(path), f"cannot read CSV: {first_line(e)}") from None
    return RawSplit(table.to_pylist(), str(path), provenance=provenance)


def _load_saved(location: SplitLocation):
    import datasets

    loaded = datasets.load_from_disk(str(location.path))
    if isinstance(loaded, datasets.DatasetDict):
        if location.split not in loaded:
            raise DataError(str(location.path), f"split {location.split!r} not found; it has {', '.join(loaded)}")
        return loaded[location.split]
    return loaded


def _file_location(path: Path, split: str) -> SplitLocation:
    if _is_saved_dataset(path):
        is_dict = (path / "dataset_dict.json").exists()
        return SplitLocation("saved", f"{path}[{split}]" if is_dict else str(path), path,
                             split=split if is_dict else None, provenance=sidecar_path(path, split if is_dict else None))
    kinds = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
    if path.suffix not in kinds:
        raise DataError(str(path), f"unsupported file type {path.suffix!r} (use {', '.join(FILE_SUFFIXES)} "
                                   "or a save_to_disk folder)")
    return SplitLocation(kinds[path.suffix], str(path), path, provenance=sidecar_path(path))


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


def locate_split(dataset, split: str, config: str | None = None, revision: str | None = None,
                 role: str = "split") -> SplitLocation:
    """Where split `split` of `dataset` is (module docstring), checked without reading it. `dataset` may also
    be a `datasets.Dataset`/`DatasetDict` or a list of records (the Python API). `role`: the flag that named
    the split, for the message when it is missing (--train_split, --val_split)."""
    if not isinstance(dataset, str):
        return _object_location(dataset, split)
    split_path = Path(split)
    if split_path.is_file() or _is_saved_dataset(split_path):
        return _file_location(split_path, split)
    path = Path(dataset)
    if path.is_dir() and not (_is_saved_dataset(path) and not (path / "dataset_dict.json").exists()):
        found = _find_in_folder(path, config, split)
        if found is None:
            hint = " (train without evaluation with --val_split '')" if role == "--val_split" else ""
            raise DataError(str(path), f"no split {split!r} here: expected {split}.jsonl, {split}.parquet, "
                                       f"{split}.csv, a save_to_disk folder, or pass the split's path{hint}")
        location = _file_location(found, split)
        if location.kind == "saved" and location.split is not None and split not in _saved_splits(found):
            raise DataError(str(found), f"split {split!r} not found; it has {', '.join(_saved_splits(found))}")
        return location
    if path.exists():  # a file, or one saved Dataset
        if split != "train":
            hint = ", or train without evaluation with --val_split ''" if role == "--val_split" else ""
            raise DataError(str(path), f"holds a single split, so split {split!r} must be given as a path "
                                       f"(e.g. --val_split val.jsonl{hint})")
        return _file_location(path, split)
    if path.suffix in FILE_SUFFIXES or looks_local(dataset):
        raise DataError(dataset, "no such file or folder")
    source = f"{dataset}" + (f"[{config}]" if config else "") + f"/{split}"
    return SplitLocation("hub", source, hub=(dataset, config, split, revision))


def _saved_splits(folder: Path) -> list[str]:
    return json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])


def _object_location(dataset, split: str) -> SplitLocation:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError("DatasetDict", f"split {split!r} not found; it has {', '.join(dataset)}")
        return SplitLocation("object", f"DatasetDict[{split}]", obj=dataset[split])
    if isinstance(dataset, datasets.Dataset):
        return SplitLocation("object", f"Dataset({dataset._fingerprint})", obj=dataset)
    if isinstance(dataset, list):
        return SplitLocation("object", f"list of {len(dataset)} records", obj=dataset)
    raise DataError(type(dataset).__name__, "a dataset must be a path or hub id, a datasets.Dataset or "
                                            "DatasetDict, or a list of records")


def load_split(dataset, split: str, config: str | None = None, revision: str | None = None) -> RawSplit:
    """Load one split of `dataset` (see the module docstring for how a split is found)."""
    return locate_split(dataset, split, config, revision).read()


def _load_hub(dataset: str, config: str | None, split: str, revision: str | None, source: str):
    import datasets

    try:
        return datasets.load_dataset(dataset, config, split=split, revision=revision)
    except Exception as e:  # offline, unknown id, unknown config/split: all reach the user as one line
        raise DataError(source, f"cannot load from the Hugging Face Hub: {type(e).__name__}: "
                                f"{first_line(e)}") from None
