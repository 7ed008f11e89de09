"""The record contract (README: "Data formats"): the shapes of preference records accepted, and their validation.

A split is in one of three formats, detected from its first record of a known shape and named in the log:
  messages        RefDPO / HuggingFaceH4: `chosen` and `rejected` are whole conversations, lists of {role,
                  content} messages (system/user/assistant) identical but for the final assistant reply. A
                  `prompt` string beside them (H4's ultrafeedback_binarized) is not used.
  conversational  TRL's conversational format with the prompt apart: `prompt` a message list (or a string: one
                  user turn), `chosen`/`rejected` the reply's messages (usually one assistant message).
  standard        TRL's standard format: `prompt`, `chosen` and `rejected` strings; the prompt becomes one user
                  turn and each reply an assistant turn of the template (also what a .csv file holds).
Every format becomes the same thing: two conversations, identical but for the final assistant reply.

Reference log-probs are two numeric columns: refdpo's `chosen_logprob`/`rejected_logprob` (the reference's
log-probability of the final reply, summed over its tokens, end token included), TRL's
`ref_chosen_logps`/`ref_rejected_logps`, or any pair named with --ref_columns. Other fields are carried
through untouched.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from refdpo.errors import DataError, DataErrors

ROLES = ("system", "user", "assistant")
DEFAULT_REF_COLUMNS = ("chosen_logprob", "rejected_logprob")
TRL_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# A summed log-probability is <= 0; float32 rounding of a near-certain sequence may land a hair above it.
POSITIVE_TOLERANCE = 1e-4
MAX_REPORTED_ERRORS = 20


def parse_ref_columns(spec: str | Sequence[str], mix: bool = False) -> tuple[str, ...]:
    """`"chosen_logprob,rejected_logprob"` -> ("chosen_logprob", "rejected_logprob"). `mix`: four names are
    accepted too, REF_CHOSEN,REF_REJECTED,SELF_CHOSEN,SELF_REJECTED: the two pairs of a mixed reference."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec)]
    if len(parts) not in ((2, 4) if mix else (2,)) or not all(parts):
        expected = "two column names 'CHOSEN,REJECTED'" + (" or four (two pairs, with --ref_mix)" if mix else "")
        raise DataError("ref_columns", f"expected {expected}, got {spec!r}")
    return tuple(parts)


def resolve_ref_columns(columns: Iterable[str], requested: tuple[str, ...], source: str,
                        score_hint: str = "") -> tuple[str, ...]:
    """The reference columns to read: the requested pair, or TRL's names when the default pair is absent.
    `score_hint`: the `refdpo score` command that would compute them, shown when they are missing."""
    columns = set(columns)
    if set(requested) <= columns:
        return requested
    if requested == DEFAULT_REF_COLUMNS and set(TRL_REF_COLUMNS) <= columns:
        return TRL_REF_COLUMNS
    missing = [c for c in requested if c not in columns]
    candidates = sorted(c for c in columns if "logp" in c)
    other = f" (columns that look like log-probs: {', '.join(candidates)}; pick a pair with --ref_columns " \
            "CHOSEN,REJECTED)" if candidates else ""
    compute = f"compute them with `{score_hint}`" if score_hint else "compute them with `refdpo score`"
    raise DataError(source, f"no reference log-probs: column(s) {', '.join(missing)} not found{other}; "
                            f"{compute}, or train reference-free with --ref_free", field=missing[0])


class _Bad(Exception):
    """One problem in one record: the field path (`chosen[2].role`) and what is wrong with it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(messages: object, field: str, reply: bool = True) -> list[Mapping]:
    """Check a list of well-formed messages; `reply`: it must end with an assistant message."""
    if not isinstance(messages, (list, tuple)):
        raise _Bad(field, f"must be a list of {{role, content}} messages, got {_type_name(messages)}")
    if len(messages) == 0:
        raise _Bad(field, "is empty: a conversation needs a prompt and a final assistant reply" if reply
                   else "is empty")
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
    last = len(messages) - 1
    if reply and messages[last]["role"] != "assistant":
        raise _Bad(f"{field}[{last}].role",
                   f"the last message must be from the assistant, got {messages[last]['role']!r}")
    return list(messages)


def _check_string(record: Mapping, field: str) -> str:
    if field not in record:
        raise _Bad(field, "is missing")
    if not isinstance(record[field], str):
        raise _Bad(field, f"must be a string, got {_type_name(record[field])}")
    return record[field]


def _same_prompt(chosen: list[Mapping], rejected: list[Mapping], offset: int = 0) -> None:
    """Chosen and rejected must share every message but the last (`offset`: messages not in these lists)."""
    if len(chosen) != len(rejected):
        raise _Bad("rejected", f"has {len(rejected) - 1 + offset} prompt messages but chosen has "
                               f"{len(chosen) - 1 + offset}: chosen and rejected must share every message but "
                               "the last")
    for i, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1])):
        for key in ("role", "content"):
            if c[key] != r[key]:
                raise _Bad(f"rejected[{i}].{key}", "differs from chosen's: chosen and rejected must share "
                                                   "every message but the last")


FORMATS = {
    "messages": "RefDPO/H4 'messages' (chosen and rejected: whole conversations as {role, content} lists)",
    "conversational": "TRL 'conversational' (prompt: a message list; chosen and rejected: the reply's messages)",
    "standard": "TRL 'standard' (prompt, chosen and rejected: strings)",
}


def record_format(record: object) -> str | None:
    """The format a record's shape says (module docstring), or None when it has none of them."""
    if not isinstance(record, Mapping):
        return None
    chosen, rejected, prompt = record.get("chosen"), record.get("rejected"), record.get("prompt")
    if isinstance(chosen, list) and isinstance(rejected, list):
        if isinstance(prompt, list):
            return "conversational"
        starts_with_reply = bool(chosen) and isinstance(chosen[0], Mapping) and chosen[0].get("role") == "assistant"
        return "conversational" if isinstance(prompt, str) and starts_with_reply else "messages"
    if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str):
        return "standard"
    return None


def split_format(records: Sequence[object], source: str) -> str:
    """A split's format: that of its first record of a known shape (the rows after it are validated as such)."""
    for record in records:
        found = record_format(record)
        if found is not None:
            return found
    first = records[0] if records else None
    fields = ", ".join(sorted(map(str, first))) if isinstance(first, Mapping) else _type_name(first)
    hint = "; a TRL record without 'prompt' needs one" if isinstance(first, Mapping) and isinstance(
        first.get("chosen"), str) else ""
    raise DataError(source, f"no record is in a format refdpo reads (row 0 has: {fields}){hint}; accepted: "
                            + "; ".join(FORMATS.values()), row=None)


def conversation_pair(record: object, fmt: str = "messages") -> tuple[list[Mapping], list[Mapping]]:
    """The record as two conversations identical but for the final assistant reply; raises `_Bad(field,
    message)` on the first problem, the field named as the record has it."""
    if not isinstance(record, Mapping):
        raise _Bad("", f"a record must be an object, got {_type_name(record)}")
    if fmt == "standard":
        prompt = [{"role": "user", "content": _check_string(record, "prompt")}]
        return (prompt + [{"role": "assistant", "content": _check_string(record, "chosen")}],
                prompt + [{"role": "assistant", "content": _check_string(record, "rejected")}])
    for field in ("chosen", "rejected"):
        if field not in record:
            raise _Bad(field, "is missing")
    if fmt == "conversational":
        if "prompt" not in record:
            raise _Bad("prompt", "is missing")
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(
            prompt, "prompt", reply=False)
        chosen = _check_messages(record["chosen"], "chosen")
        rejected = _check_messages(record["rejected"], "rejected")
        _same_prompt(chosen, rejected, offset=len(prompt))
        if chosen[:len(prompt)] == prompt:  # the prompt repeated inside chosen/rejected (TRL's implicit prompt)
            return chosen, rejected
        return prompt + chosen, prompt + rejected
    chosen = _check_messages(record["chosen"], "chosen")
    rejected = _check_messages(record["rejected"], "rejected")
    if len(chosen) < 2:
        raise _Bad("chosen", "has no prompt: it needs at least one message before the final assistant reply "
                             "(or a 'prompt' field beside it: TRL's conversational format)")
    _same_prompt(chosen, rejected)
    return chosen, rejected


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


def validate_record(record: object, ref_columns: tuple[str, ...] | None,
                    fmt: str = "messages") -> tuple[list[Mapping], list[Mapping]]:
    """Check one record of format `fmt`; returns its two conversations, or raises `_Bad(field, message)` on
    the first problem. `ref_columns=None` skips the reference columns (reference-free training, or scoring a
    new reference)."""
    pair = conversation_pair(record, fmt)
    if ref_columns is not None:
        for column in ref_columns:
            _check_logprob(record, column)
    return pair


def validate_records(records: Sequence[object], source: str, ref_columns: tuple[str, ...] | None,
                     line_of: Callable[[int], int | None] = lambda row: None,
                     fmt: str | None = None) -> list[tuple[list[Mapping], list[Mapping]]]:
    """Validate every record (in format `fmt`, default: the split's); returns their conversation pairs, or
    raises DataErrors listing the first bad records, one line each."""
    fmt = fmt or split_format(records, source)
    return _each_record(records, source, lambda record: validate_record(record, ref_columns, fmt), line_of)


def _each_record(records: Sequence[object], source: str, check: Callable, line_of: Callable[[int], int | None]
                 ) -> list:
    """`check(record)` of every record, or DataErrors naming the first bad records (row, line, field)."""
    errors: list[DataError] = []
    results, total = [], 0
    for row, record in enumerate(records):
        try:
            results.append(check(record))
        except _Bad as bad:
            total += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(DataError(source, bad.message, row=row, field=bad.field or None,
                                        line=line_of(row)))
    if errors:
        raise DataErrors(errors, total)
    return results


def logprob_columns(records: Sequence[Mapping], columns: Sequence[str], source: str,
                    line_of: Callable[[int], int | None] = lambda row: None) -> dict[str, np.ndarray]:
    """float64 [N] arrays of log-prob columns, checked as `validate_record` checks them: in bulk, and record by
    record (for the one-line errors naming row and field) when the bulk check finds a problem."""
    out = {}
    for column in columns:
        values = [record.get(column) for record in records]
        try:
            array = np.array(values, dtype=np.float64) if all(type(v) in (float, int) for v in values) else None
        except OverflowError:  # an integer too large for a float
            array = None
        if array is None or not np.all(np.isfinite(array)) or np.any(array > POSITIVE_TOLERANCE):
            _each_record(records, source, lambda record, column=column: _check_logprob(record, column), line_of)
        out[column] = array
    return out
