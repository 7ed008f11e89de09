"""Write a split of records: JSON lines, parquet, CSV or a `save_to_disk` folder (by the path's suffix),
atomically.

A reader never sees half a file: the data goes to a temporary sibling that is renamed over the target (a
folder is swapped in with two renames). JSON numbers are written by `json` (shortest round-trip repr), so the
same records always give the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from refdpo.errors import RefdpoError, first_line
from refdpo.io import atomic_folder
from refdpo.provenance import hub_sidecar_name

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}


def output_format(path: str | Path) -> str:
    """jsonl, parquet, csv, or arrow (a save_to_disk folder: any path without a data-file suffix)."""
    return FORMATS.get(Path(path).suffix, "arrow")


def _columns(records: list[dict]) -> list[str]:
    """Every field of every record, in first-seen order (arrow would take the first record's fields only)."""
    return list(dict.fromkeys(key for record in records for key in record))


def _table(records: list[dict], flat: bool = False):
    """The records as an arrow table; a field arrow cannot type (or, `flat`: CSV, a nested one) is a one-line
    error before anything is written."""
    import pyarrow as pa

    columns = _columns(records)
    try:
        table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise RefdpoError(f"cannot store these records as parquet/arrow: {first_line(e)} (a field "
                          "with mixed types?); write .jsonl instead") from None
    nested = [f.name for f in table.schema if pa.types.is_nested(f.type)]
    if flat and nested:
        raise RefdpoError(f"cannot store these records as CSV: field(s) {', '.join(nested)} hold lists or "
                          "objects (message lists); write .jsonl or .parquet instead")
    return table


def check_writable(records: list[dict], path: str | Path) -> None:
    """Fail before a long job when its records could not be written to `path`'s format."""
    if output_format(path) != "jsonl":
        _table(records, flat=output_format(path) == "csv")


def write_records(records: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = output_format(path)
    if kind == "arrow":
        _write_folder(records, path)
        return
    # A temporary sibling opened normally (not mkstemp, whose 0600 mode would make the output private).
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if kind == "jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for record in records:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        elif kind == "csv":
            import pyarrow.csv as pcsv

            pcsv.write_csv(_table(records, flat=True), tmp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(_table(records), tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_folder(records: list[dict], path: Path) -> None:
    import datasets

    with atomic_folder(path) as tmp:
        datasets.Dataset(_table(records)).save_to_disk(str(tmp))


def push_to_hub(records: list[dict], repo_id: str, split: str, config_name: str | None,
                sidecar: Path | None) -> None:
    """Upload the split (and its provenance sidecar, as `{config}_{split}.provenance.json`) to the Hub."""
    import datasets

    try:
        datasets.Dataset(_table(records)).push_to_hub(repo_id, config_name=config_name or "default", split=split)
        if sidecar is not None and sidecar.exists():
            from huggingface_hub import HfApi

            HfApi().upload_file(path_or_fileobj=str(sidecar), path_in_repo=hub_sidecar_name(config_name, split),
                                repo_id=repo_id, repo_type="dataset")
    except Exception as e:  # auth, network, name: one line for the user; the local output is already written
        from refdpo.hub import hub_error

        raise hub_error(repo_id, e, " (the local output was written)") from None
