"""Bad input: every malformed record gives one line naming its file, row (and line) and field, and exit 2.

Each case writes a dataset folder whose train.jsonl holds three records with the bad one at row 1 (line 2), runs
the real CLI in-process (`refdpo.cli.main`) and checks stderr line for line. Validation happens before the
model is loaded, so each case takes well under a second once the session's tiny setup exists.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, run_main

from refdpo.cli import main
from refdpo.data.schema import DEFAULT_REF_COLUMNS, _Bad, validate_record

PREFIX = "refdpo train: error: "
RAW = "__RAW_VALUE__"  # stands for a literal the json module would not write by itself, swapped in after dumps


# --- valid material ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_records(tiny_setup) -> list[dict]:
    """Three valid records from the tiny setup: row 1 has a system turn, so its sides are
    [system, user, assistant] and the bad cases below can name chosen[0..2] / rejected[0..2]."""
    records = [json.loads(line) for line in (tiny_setup / "data" / "train.jsonl").read_text().splitlines()]
    with_system = [r for r in records if r["chosen"][0]["role"] == "system" and len(r["chosen"]) == 3]
    without = [r for r in records if r["chosen"][0]["role"] != "system"]
    rows = [without[0], with_system[0], without[1]]
    for r in rows:  # the premises of the cases below
        validate_record(r, DEFAULT_REF_COLUMNS)
        assert [m["role"] for m in r["chosen"][:-1]] == [m["role"] for m in r["rejected"][:-1]]
    assert [m["role"] for m in rows[1]["chosen"]] == ["system", "user", "assistant"]
    return rows


def _line(record: dict | str) -> str:
    return record if isinstance(record, str) else json.dumps(record)


def write_dataset(folder: Path, train_rows: list[dict | str], val_rows: list[dict | str]) -> Path:
    folder.mkdir(parents=True)
    for name, rows in (("train", train_rows), ("val", val_rows)):
        (folder / f"{name}.jsonl").write_text("".join(_line(r) + "\n" for r in rows))
    return folder


def train_args(tiny_setup: Path, dataset: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(tiny_setup / "model"), "--dataset", str(dataset), "--output_dir", str(run),
            "--report_to", "none", "--no-gradient_checkpointing", "--max_len", "512", *extra]


def run_failing(argv: list[str], capsys) -> list[str]:
    """Run the CLI in-process; it must exit with status 2. Returns the lines it wrote to stderr."""
    return run_main(argv, capsys)[1]


# --- the corpus of malformed records ---------------------------------------------------------------------------
# Each case: (id, make(record) -> bad record (dict) or raw line (str), field named in the error, message part).
# `make` gets a deep copy of the valid row-1 record: chosen/rejected = [system, user, assistant].

def _set(path: tuple, value):
    def make(r):
        target = r
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return r
    return make


def _delete(path: tuple):
    def make(r):
        target = r
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
        return r
    return make


def _raw_value(column: str, literal: str):
    """The record with `column` written as the bare JSON-ish literal `literal` (NaN, Infinity, ...)."""
    def make(r):
        r[column] = RAW
        line = json.dumps(r)
        assert line.count(f'"{RAW}"') == 1
        return line.replace(f'"{RAW}"', literal)
    return make


def _only_assistant(r):
    r["chosen"], r["rejected"] = r["chosen"][-1:], r["rejected"][-1:]
    return r


def _extra_turn_in_chosen(r):
    r["chosen"] = r["chosen"][:1] + [{"role": "user", "content": "Hi."},
                                     {"role": "assistant", "content": "Hello."}] + r["chosen"][1:]
    return r


def _system_only_in_chosen(r):
    r["rejected"] = r["rejected"][1:]
    return r


def _prompt_content_differs(r):
    r["rejected"][1]["content"] += " Please."
    return r


def _huge_int(r):
    r["chosen_logprob"] = -(10 ** 400)
    return r


CASES = [
    ("missing_chosen", _delete(("chosen",)), "chosen", "is missing"),
    ("missing_rejected", _delete(("rejected",)), "rejected", "is missing"),
    ("chosen_is_string", _set(("chosen",), "Hello there"), "chosen",
     "must be a list of {role, content} messages, got str"),
    ("rejected_is_object", _set(("rejected",), {"role": "assistant", "content": "x"}), "rejected",
     "must be a list of {role, content} messages, got dict"),
    ("chosen_empty", _set(("chosen",), []), "chosen", "is empty"),
    ("rejected_empty", _set(("rejected",), []), "rejected", "is empty"),
    ("message_not_object", _set(("chosen", 1), "user: hi"), "chosen[1]",
     "must be an object with 'role' and 'content', got str"),
    ("message_missing_role", _delete(("chosen", 1, "role")), "chosen[1].role", "is missing"),
    ("message_missing_content", _delete(("rejected", 2, "content")), "rejected[2].content", "is missing"),
    ("content_int", _set(("chosen", 2, "content"), 42), "chosen[2].content", "must be a string, got int"),
    ("content_null", _set(("rejected", 1, "content"), None), "rejected[1].content",
     "must be a string, got null"),
    ("role_int", _set(("chosen", 0, "role"), 0), "chosen[0].role", "must be a string, got int"),
    ("role_invalid", _set(("chosen", 1, "role"), "bot"), "chosen[1].role",
     "must be one of system, user, assistant, got 'bot'"),
    ("last_from_user", _set(("chosen", 2, "role"), "user"), "chosen[2].role",
     "the last message must be from the assistant, got 'user'"),
    ("only_assistant", _only_assistant, "chosen", "has no prompt"),
    ("prompt_content_differs", _prompt_content_differs, "rejected[1].content", "differs from chosen's"),
    ("prompt_length_differs", _extra_turn_in_chosen, "rejected",
     "has 2 prompt messages but chosen has 4"),
    ("system_only_in_chosen", _system_only_in_chosen, "rejected", "has 1 prompt messages but chosen has 2"),
    ("logprob_missing", _delete(("chosen_logprob",)), "chosen_logprob", "is missing (needed unless training "
                                                                          "reference-free with --ref_free)"),
    ("logprob_null", _set(("rejected_logprob",), None), "rejected_logprob", "is missing"),
    ("logprob_string", _set(("chosen_logprob",), "-12.5"), "chosen_logprob",
     "must be a number, got str '-12.5'"),
    ("logprob_bool", _set(("rejected_logprob",), True), "rejected_logprob", "must be a number, got bool True"),
    ("logprob_list", _set(("chosen_logprob",), [-1.0]), "chosen_logprob", "must be a number, got list [-1.0]"),
    ("logprob_nan", _raw_value("rejected_logprob", "NaN"), "rejected_logprob", "is NaN"),
    ("logprob_infinity", _raw_value("chosen_logprob", "Infinity"), "chosen_logprob",
     "is inf: a log-probability must be finite"),
    ("logprob_minus_infinity", _raw_value("rejected_logprob", "-Infinity"), "rejected_logprob",
     "is -inf: a log-probability must be finite"),
    ("logprob_positive", _set(("chosen_logprob",), 3.2), "chosen_logprob",
     "is positive (3.2): a summed log-probability is <= 0"),
    ("logprob_just_above_tolerance", _set(("rejected_logprob",), 2e-4), "rejected_logprob", "is positive"),
    # Not a record at all: no field to name; the line number and the reason instead.
    ("broken_json_line", lambda r: json.dumps(r)[:-25], None, "invalid JSON at column"),
    ("unquoted_garbage_line", lambda r: "chosen: hello", None, "invalid JSON at column 1"),
    ("array_line", lambda r: json.dumps([r["chosen"], r["rejected"]]), None,
     "a record must be a JSON object, got list"),
    ("number_line", lambda r: "-12.5", None, "a record must be a JSON object, got float"),
]
assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def bad_row(valid_records: list[dict], make) -> dict | str:
    return make(copy.deepcopy(valid_records[1]))


def expected_start(source: Path, field: str | None, row: int = 1, line: int | None = 2) -> str:
    where = f"{PREFIX}{source}: row {row}" + (f" (line {line})" if line is not None else "")
    return where + (f": field '{field}': " if field else ": ")


@pytest.mark.parametrize("make, field, message", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_each_malformed_record_gives_one_line_naming_row_and_field(tiny_setup, valid_records, tmp_path,
                                                                   capsys, make, field, message):
    rows = [valid_records[0], bad_row(valid_records, make), valid_records[2]]
    data = write_dataset(tmp_path / "data", rows, valid_records)
    run = tmp_path / "run"

    lines = run_failing(train_args(tiny_setup, data, run), capsys)

    assert len(lines) == 1 and lines[0].strip(), lines
    line = lines[0]
    assert line.startswith(expected_start(data / "train.jsonl", field)), line
    assert message in line, line
    assert "row 1 (line 2)" in line
    if field is None:
        assert "field '" not in line
    assert not run.exists(), "a run folder was created for bad data"


def test_raw_literals_reach_the_file_unquoted(valid_records):
    """The NaN/Infinity cases really write the bare literal, not a string (premise of the cases above)."""
    line = bad_row(valid_records, _raw_value("rejected_logprob", "NaN"))
    assert '"rejected_logprob": NaN' in line
    assert json.loads(line)["rejected_logprob"] != json.loads(line)["rejected_logprob"]  # NaN


def test_bad_row_in_the_validation_split_is_named_there(tiny_setup, valid_records, tmp_path, capsys):
    bad = bad_row(valid_records, _set(("chosen_logprob",), 3.2))
    data = write_dataset(tmp_path / "data", valid_records, [valid_records[0], bad, valid_records[2]])
    lines = run_failing(train_args(tiny_setup, data, tmp_path / "run"), capsys)
    assert lines == [expected_start(data / "val.jsonl", "chosen_logprob")
                     + "is positive (3.2): a summed log-probability is <= 0"]


def test_line_numbers_count_blank_lines_but_rows_do_not(tiny_setup, valid_records, tmp_path, capsys):
    bad = bad_row(valid_records, _set(("chosen", 2, "role"), "user"))
    data = write_dataset(tmp_path / "data", [valid_records[0], "", "   ", bad, valid_records[2]], valid_records)
    lines = run_failing(train_args(tiny_setup, data, tmp_path / "run"), capsys)
    assert lines == [expected_start(data / "train.jsonl", "chosen[2].role", row=1, line=4)
                     + "the last message must be from the assistant, got 'user'"]


def test_three_bad_rows_give_three_lines(tiny_setup, valid_records, tmp_path, capsys):
    rows = [bad_row(valid_records, _delete(("chosen",))),
            bad_row(valid_records, _raw_value("rejected_logprob", "NaN")),
            bad_row(valid_records, _set(("chosen", 2, "role"), "user"))]
    data = write_dataset(tmp_path / "data", rows, valid_records)
    lines = run_failing(train_args(tiny_setup, data, tmp_path / "run"), capsys)
    source = data / "train.jsonl"
    assert lines == [expected_start(source, "chosen", row=0, line=1) + "is missing",
                     expected_start(source, "rejected_logprob", row=1, line=2) + "is NaN",
                     expected_start(source, "chosen[2].role", row=2, line=3)
                     + "the last message must be from the assistant, got 'user'"]
    assert not (tmp_path / "run").exists()


def test_many_bad_rows_are_capped_with_a_count(tiny_setup, valid_records, tmp_path, capsys):
    bad = bad_row(valid_records, _set(("chosen_logprob",), "x"))
    data = write_dataset(tmp_path / "data", [valid_records[0]] + [bad] * 25, valid_records)
    lines = run_failing(train_args(tiny_setup, data, tmp_path / "run"), capsys)
    assert len(lines) == 21
    assert [line.split(": row ")[1].split(" ")[0] for line in lines[:20]] == [str(r) for r in range(1, 21)]
    assert all("field 'chosen_logprob': must be a number, got str 'x'" in line for line in lines[:20])
    assert lines[20] == f"{PREFIX}... and 5 more bad records"


def test_parquet_bad_logprob_names_file_row_and_field(tiny_setup, valid_records, tmp_path, capsys):
    import datasets

    rows = copy.deepcopy(valid_records)
    rows[1]["chosen_logprob"] = 3.2
    parquet = tmp_path / "train.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in valid_records))

    lines = run_failing(train_args(tiny_setup, tmp_path, tmp_path / "run", "--train_split", str(parquet),
                                   "--val_split", str(val)), capsys)
    assert lines == [f"{PREFIX}{parquet}: row 1: field 'chosen_logprob': "
                     "is positive (3.2): a summed log-probability is <= 0"]
    assert not (tmp_path / "run").exists()


def test_ref_free_accepts_a_record_without_logprobs(tiny_setup, valid_records, tmp_path, capsys):
    """The missing/NaN log-prob cases are errors only because the reference is used; --ref_free reads no
    reference column, so the same record trains."""
    rows = [valid_records[0], bad_row(valid_records, _delete(("chosen_logprob",))),
            bad_row(valid_records, _raw_value("rejected_logprob", "NaN"))]
    data = write_dataset(tmp_path / "data", rows, valid_records)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(train_args(tiny_setup, data, run, "--ref_free", "--epochs", "1", "--max_train_pairs", "3",
                        "--max_val_pairs", "3", "--batch_size", "3", "--seed", "0"))
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert "error" not in err
    assert out.splitlines()[-1].startswith(f"done: 1 steps in {run.resolve()}"), out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["data"]["train"]["pairs"] == 3
    assert "ref_columns" not in summary["data"]["train"]


def test_ref_free_still_rejects_a_malformed_conversation(tiny_setup, valid_records, tmp_path, capsys):
    rows = [valid_records[0], bad_row(valid_records, _prompt_content_differs), valid_records[2]]
    data = write_dataset(tmp_path / "data", rows, valid_records)
    lines = run_failing(train_args(tiny_setup, data, tmp_path / "run", "--ref_free"), capsys)
    assert len(lines) == 1
    assert lines[0].startswith(expected_start(data / "train.jsonl", "rejected[1].content") + "differs")


def test_real_process_exits_2_with_one_line(tiny_setup, valid_records, tmp_path):
    rows = [valid_records[0], bad_row(valid_records, _raw_value("chosen_logprob", "Infinity")), valid_records[2]]
    data = write_dataset(tmp_path / "data", rows, valid_records)
    result = run_cli(train_args(tiny_setup, data, tmp_path / "run"), timeout=300)
    assert result.returncode == 2, result.stderr
    # No filtering: nothing but the error reaches stderr (the INFO log starts only after the data is loaded).
    lines = result.stderr.splitlines()
    assert lines == [expected_start(data / "train.jsonl", "chosen_logprob")
                     + "is inf: a log-probability must be finite"], result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "run").exists()


# --- regressions: a value missing from row 0 only, and an integer too large for a float ---------------------

def test_logprob_missing_in_row_0_names_the_row(tiny_setup, valid_records, tmp_path, capsys):
    rows = [bad_row(valid_records, _delete(("chosen_logprob",))), valid_records[0], valid_records[2]]
    data = write_dataset(tmp_path / "data", rows, valid_records)
    lines = run_failing(train_args(tiny_setup, data, tmp_path / "run"), capsys)
    assert lines == [expected_start(data / "train.jsonl", "chosen_logprob", row=0, line=1)
                     + "is missing (needed unless training reference-free with --ref_free)"]


def test_huge_integer_logprob_is_a_one_line_error(tiny_setup, valid_records, tmp_path, capsys):
    rows = [valid_records[0], bad_row(valid_records, _huge_int), valid_records[2]]
    data = write_dataset(tmp_path / "data", rows, valid_records)
    lines = run_failing(train_args(tiny_setup, data, tmp_path / "run"), capsys)
    assert len(lines) == 1
    assert lines[0].startswith(expected_start(data / "train.jsonl", "chosen_logprob"))


# --- edge cases validate_record must accept -------------------------------------------------------------------

def _pair(**overrides) -> dict:
    record = {"chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
              "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
              "chosen_logprob": -3.5, "rejected_logprob": -7.25}
    record.update(overrides)
    return record


@pytest.mark.parametrize("record", [
    pytest.param(_pair(chosen=[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": ""}]),
                 id="empty_final_response"),
    pytest.param(_pair(prompt_id="p-7", scores=[1, 2], source="ultrafeedback", other_logprob="x"),
                 id="extra_fields"),
    pytest.param(_pair(chosen_logprob=np.float32(-2.5), rejected_logprob=np.float64(-1.0)), id="numpy_floats"),
    pytest.param(_pair(chosen_logprob=0, rejected_logprob=-4), id="integer_zero"),
    pytest.param(_pair(chosen_logprob=5e-5), id="positive_within_tolerance"),
    pytest.param(_pair(chosen_logprob=-0.0), id="negative_zero"),
    pytest.param(_pair(chosen=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                               {"role": "assistant", "content": "Hello."}],
                       rejected=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                                 {"role": "assistant", "content": "No.", "name": "bot"}]),
                 id="system_turn_and_extra_message_key"),
])
def test_validate_record_accepts(record):
    before = copy.deepcopy(record)
    validate_record(record, DEFAULT_REF_COLUMNS)
    assert record.keys() == before.keys()  # nothing dropped or added: extra fields are carried through
    validate_record(record, None)


def test_validate_record_rejects_just_above_tolerance_and_skips_columns_when_ref_free():
    with pytest.raises(_Bad) as bad:
        validate_record(_pair(chosen_logprob=1.5e-4), DEFAULT_REF_COLUMNS)
    assert bad.value.field == "chosen_logprob" and bad.value.message.startswith("is positive (0.00015)")
    record = _pair()
    del record["chosen_logprob"]
    record["rejected_logprob"] = float("nan")
    validate_record(record, None)

