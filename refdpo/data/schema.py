"""The record contract (README: "Data") and its validation.

A record is RefDPO-compatible:
  chosen, rejected   lists of {role, content} messages (system/user/assistant), identical but for the final
                     assistant message.
  chosen_logprob,    the reference's log-probability of the final assistant response, summed over its tokens
  rejected_logprob   (end token included). TRL's ref_chosen_logps/ref_rejected_logps are accepted as aliases.
Other fields (prompt, prompt_id, scores, source, further reference columns) are carried through untouched.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

from refdpo.errors import DataError, DataErrors

ROLES = ("system", "user", "assistant")
DEFAULT_REF_COLUMNS = ("chosen_logprob", "rejected_logprob")
TRL_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# A summed log-probability is <= 0; float32 rounding of a near-certain sequence may land a hair above it.
POSITIVE_TOLERANCE = 1e-4
MAX_REPORTED_ERRORS = 20


def parse_ref_columns(spec: str | Sequence[str]) -> tuple[str, str]:
    """`"chosen_logprob,rejected_logprob"` -> ("chosen_logprob", "rejected_logprob")."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(parts) != 2 or not all(parts):
        raise DataError("ref_columns", f"expected two column names 'CHOSEN,REJECTED', got {spec!r}")
    return parts[0], parts[1]


def resolve_ref_columns(columns: Iterable[str], requested: tuple[str, str], source: str) -> tuple[str, str]:
    """The reference columns to read: the requested pair, or TRL's names when the default pair is absent."""
    columns = set(columns)
    if set(requested) <= columns:
        return requested
    if requested == DEFAULT_REF_COLUMNS and set(TRL_REF_COLUMNS) <= columns:
        return TRL_REF_COLUMNS
    missing = [c for c in requested if c not in columns]
    candidates = sorted(c for c in columns if "logp" in c)
    hint = f"; columns that look like log-probs: {', '.join(candidates)}" if candidates else ""
    raise DataError(source, f"reference column(s) {', '.join(missing)} not found (pick a pair with "
                            f"--ref_columns CHOSEN,REJECTED, or train with --ref_free){hint}",
                    field=missing[0])


class _Bad(Exception):
    """One problem in one record: the field path (`chosen[2].role`) and what is wrong with it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(messages: object, field: str) -> list[Mapping]:
    """Check one side of a pair: well-formed messages ending with an assistant reply after a prompt."""
    if not isinstance(messages, (list, tuple)):
        raise _Bad(field, f"must be a list of {{role, content}} messages, got {_type_name(messages)}")
    if len(messages) == 0:
        raise _Bad(field, "is empty: a conversation needs a prompt and a final assistant reply")
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, Mapping):
            raise _Bad(where, f"must be an object with 'role' and 'content', got {_type_name(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise _Bad(f"{where}.{key}", "is missing")
            if not isinstance(message[key], str):
                raise _Bad(f"{where}.{key}", f"must be a string, got {_type_name(message[key])}")
        if message["role"] not in ROLES:
            raise _Bad(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {message['role']!r}")
    if len(messages) < 2:
        raise _Bad(field, "has no prompt: it needs at least one message before the final assistant reply")
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise _Bad(f"{field}[{last}].role",
                   f"the last message must be from the assistant, got {messages[last]['role']!r}")
    return list(messages)


def _check_logprob(record: Mapping, column: str) -> None:
    if column not in record or record[column] is None:
        raise _Bad(column, "is missing (needed unless training reference-free with --ref_free)")
    value = record[column]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _Bad(column, f"must be a number, got {_type_name(value)} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        raise _Bad(column, "is too large: a log-probability must be finite") from None
    if math.isnan(value):
        raise _Bad(column, "is NaN")
    if math.isinf(value):
        raise _Bad(column, f"is {value}: a log-probability must be finite")
    if value > POSITIVE_TOLERANCE:
        raise _Bad(column, f"is positive ({value:g}): a summed log-probability is <= 0")


def validate_record(record: object, ref_columns: tuple[str, str] | None) -> None:
    """Check one record; raise `_Bad(field, message)` on the first problem found.

    `ref_columns=None` skips the reference columns (reference-free training, or scoring a new reference).
    """
    if not isinstance(record, Mapping):
        raise _Bad("", f"a record must be an object, got {_type_name(record)}")
    for field in ("chosen", "rejected"):
        if field not in record:
            raise _Bad(field, "is missing")
    chosen = _check_messages(record["chosen"], "chosen")
    rejected = _check_messages(record["rejected"], "rejected")
    if len(chosen) != len(rejected):
        raise _Bad("rejected", f"has {len(rejected) - 1} prompt messages but chosen has {len(chosen) - 1}: "
                               "chosen and rejected must share every message but the last")
    for i, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1])):
        for key in ("role", "content"):
            if c[key] != r[key]:
                raise _Bad(f"rejected[{i}].{key}", "differs from chosen's: chosen and rejected must share "
                                                   "every message but the last")
    if ref_columns is not None:
        for column in ref_columns:
            _check_logprob(record, column)


def validate_records(records: Iterable[object], source: str, ref_columns: tuple[str, str] | None,
                     line_of: Callable[[int], int | None] = lambda row: None) -> None:
    """Validate every record; raise DataErrors listing the first bad ones, one line each."""
    errors: list[DataError] = []
    total = 0
    for row, record in enumerate(records):
        try:
            validate_record(record, ref_columns)
        except _Bad as bad:
            total += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(DataError(source, bad.message, row=row, field=bad.field or None,
                                        line=line_of(row)))
    if errors:
        raise DataErrors(errors, total)
