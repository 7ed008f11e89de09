"""Result tables: rows of metrics written as markdown, CSV and JSON side by side (evaluate, judge, sweep)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from refdpo.io import atomic_write_json, atomic_write_text


def columns_of(rows: list[dict]) -> list[str]:
    """Every key of every row, in first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or columns_of(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns_of(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_tables(rows: list[dict], folder: Path, stem: str, extra: dict | None = None) -> None:
    """folder/{stem}.md, .csv and .json (the rows plus `extra`), each written atomically."""
    columns = columns_of(rows)
    atomic_write_text(folder / f"{stem}.csv", csv_text(rows))
    atomic_write_text(folder / f"{stem}.md", markdown(rows, columns) + "\n")
    atomic_write_json(folder / f"{stem}.json", {"rows": rows, **(extra or {})})
