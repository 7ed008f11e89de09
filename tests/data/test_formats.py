"""The data formats refdpo reads (README "Your data"): each README example trains end to end, reference-free
and with the columns `refdpo score` stores; every format tokenises exactly as the same conversation in
RefDPO's own format; an unknown shape or missing columns is one line saying what to do."""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, run_main, scored

from refdpo.data import build_pairs, load_split
from refdpo.data.schema import FORMATS, conversation_pair, record_format

PREFIX = "refdpo train: error: "


def readme_examples() -> dict[str, str]:
    """{format: the text of the code block after `<!-- format: NAME -->`} from the README."""
    text = (REPO / "README.md").read_text()
    found = dict(re.findall(r"<!-- format: (\w+) -->\n```\w+\n(.*?)```", text, flags=re.S))
    assert set(found) == {"messages", "conversational", "standard", "csv"}, found.keys()
    return found


EXAMPLES = readme_examples()


def example_records(fmt: str) -> list[dict]:
    if fmt == "csv":
        return list(csv.DictReader(EXAMPLES["csv"].splitlines()))
    return [json.loads(line) for line in EXAMPLES[fmt].splitlines() if line.strip()]


def write_format(folder: Path, fmt: str, copies: int = 6) -> Path:
    """folder/{train,val}.{jsonl|csv}: the README's example, `copies` times (each copy a row)."""
    folder.mkdir(parents=True)
    for split in ("train", "val"):
        if fmt == "csv":
            header, row = EXAMPLES["csv"].splitlines()[:2]
            (folder / f"{split}.csv").write_text("\n".join([header] + [row] * copies) + "\n")
        else:
            (folder / f"{split}.jsonl").write_text((EXAMPLES[fmt].strip() + "\n") * copies)
    return folder


def test_readme_examples_are_the_formats_they_claim():
    for fmt in ("messages", "conversational", "standard"):
        (record,) = example_records(fmt)
        assert record_format(record) == fmt
    (row,) = example_records("csv")
    assert record_format(row) == "standard"
    # All four are one conversation: the README's example is the same pair written four ways.
    pairs = {fmt: conversation_pair(example_records(fmt)[0], record_format(example_records(fmt)[0]))
             for fmt in EXAMPLES}
    assert pairs["standard"] == pairs["csv"] == pairs["messages"]
    assert pairs["conversational"][0][1:] == pairs["messages"][0]
    assert pairs["conversational"][0][0]["role"] == "system"


@pytest.mark.parametrize("fmt", ["conversational", "standard", "csv"])
def test_each_format_tokenises_as_the_same_conversation_in_refdpos_format(tmp_path, tok, fmt):
    """Same ids and response starts as the `messages` record holding the same conversation."""
    data = write_format(tmp_path / fmt, fmt, copies=2)
    raw = load_split(str(data), "train")
    got = build_pairs(raw, tok, "tulu", 512, None)
    assert got.stats["data_format"] == ("standard" if fmt == "csv" else fmt)
    chosen, rejected = conversation_pair(raw.records[0], got.stats["data_format"])
    reference = build_pairs(load_split(str(write_messages(tmp_path / "ref", chosen, rejected)), "train"), tok,
                            "tulu", 512, None)
    assert reference.stats["data_format"] == "messages"
    for side in ("chosen", "rejected"):
        a, b = getattr(got, side)[0], getattr(reference, side)[0]
        assert np.array_equal(a.input_ids, b.input_ids) and a.response_start == b.response_start
    if fmt == "conversational":  # the system turn is there
        assert "<|system|>" in tok.decode(got.chosen[0].input_ids.tolist())


def write_messages(folder: Path, chosen: list, rejected: list) -> Path:
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(json.dumps({"chosen": chosen, "rejected": rejected}) + "\n")
    return folder


def _train(setup: Path, data: Path, run: Path, *extra: str, capsys) -> dict:
    out, err = run_main(["train", "--model", str(setup / "model"), "--dataset", str(data), "--output_dir",
                         str(run), "--report_to", "none", "--no-gradient_checkpointing", "--max_len", "128",
                         "--epochs", "1", "--batch_size", "3", "--seed", "0", "--eval_at_start", "false",
                         *extra], capsys, code=0)
    assert out.splitlines()[-1].startswith("done: 2 steps"), (out, err)
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("fmt", ["messages", "conversational", "standard", "csv"])
def test_each_readme_example_trains_ref_free_and_with_scored_columns(tiny_setup, tmp_path, capsys, fmt):
    data = write_format(tmp_path / "data", fmt)
    summary = _train(tiny_setup, data, tmp_path / "ref_free", "--ref_free", capsys=capsys)
    detected = "standard" if fmt == "csv" else fmt
    assert summary["data"]["train"]["data_format"] == detected and summary["data"]["train"]["pairs"] == 6

    suffix = ".csv" if fmt == "csv" else ".jsonl"
    scored_dir = tmp_path / "scored"
    scored_dir.mkdir()
    for split in ("train", "val"):
        scored(tiny_setup, scored_dir / f"{split}{suffix}", dataset=data, split=split, max_len=128)
    if fmt == "csv":  # the output keeps the input's format: CSV, with two numeric columns added
        with open(scored_dir / "train.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0])[:3] == ["prompt", "chosen", "rejected"] and float(rows[0]["chosen_logprob"]) < 0
    summary = _train(tiny_setup, scored_dir, tmp_path / "dpo", capsys=capsys)
    train_stats = summary["data"]["train"]
    assert train_stats["data_format"] == detected and train_stats["ref_columns"] == ["chosen_logprob",
                                                                                       "rejected_logprob"]
    # The reference is the starting policy, so the first validation loss is ln 2 (policy = reference).
    assert summary["last_val"]["val_loss"] == pytest.approx(np.log(2), abs=0.05)


def test_trl_column_names_are_read(tiny_setup, tmp_path, capsys):
    data = write_format(tmp_path / "data", "standard")
    for split in ("train", "val"):
        scored(tiny_setup, tmp_path / "s" / f"{split}.jsonl", dataset=data, split=split, max_len=128,
               columns="ref_chosen_logps,ref_rejected_logps")
    summary = _train(tiny_setup, tmp_path / "s", tmp_path / "run", capsys=capsys)
    assert summary["data"]["train"]["ref_columns"] == ["ref_chosen_logps", "ref_rejected_logps"]


def test_missing_columns_name_the_score_command(tiny_setup, tmp_path, capsys):
    data = write_format(tmp_path / "data", "standard")
    _, lines = run_main(["train", "--model", str(tiny_setup / "model"), "--dataset", str(data), "--output_dir",
                         str(tmp_path / "run"), "--max_len", "128"], capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{PREFIX}{data / 'train.jsonl'}: field 'chosen_logprob': no reference log-probs")
    assert f"refdpo score --model REFERENCE --dataset {data} --split train --template tulu --max_len 128" in lines[0]
    assert "--ref_free" in lines[0]


def test_an_unknown_shape_is_one_line_naming_the_formats(tiny_setup, tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"question": "Hi?", "answer": "Hello.", "score": 1}) + "\n")
    _, lines = run_main(["train", "--model", str(tiny_setup / "model"), "--dataset", str(folder),
                         "--output_dir", str(tmp_path / "run"), "--val_split", ""], capsys)
    assert len(lines) == 1, lines
    assert "row 0 has: answer, question, score" in lines[0]
    assert all(description in lines[0] for description in FORMATS.values())
    assert not (tmp_path / "run").exists()


def test_a_row_in_another_format_is_named(tok, tmp_path):
    from refdpo.errors import DataErrors

    standard = example_records("standard")[0]
    folder = write_messages(tmp_path / "d", *conversation_pair(standard, "standard"))
    with open(folder / "train.jsonl", "a") as f:
        f.write(json.dumps(standard) + "\n")
    with pytest.raises(DataErrors) as bad:
        build_pairs(load_split(str(folder), "train"), tok, "tulu", 128, None)
    assert "row 1" in str(bad.value) and "field 'chosen': must be a list of {role, content} messages, got str" \
        in str(bad.value)


def test_conversational_prompt_repeated_in_the_reply_is_not_doubled():
    record = copy.deepcopy(example_records("conversational")[0])
    record["chosen"] = record["prompt"] + record["chosen"]
    record["rejected"] = record["prompt"] + record["rejected"]
    chosen, _ = conversation_pair(record, record_format(record))
    assert [m["role"] for m in chosen] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record, field, message", [
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "must be a string, got int"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen[0].role", "the last message must be from "
                                                                             "the assistant"),
    ({"prompt": [{"role": "bot", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0].role", "must be one of"),
])
def test_format_errors_name_the_field_as_the_record_has_it(record, field, message):
    from refdpo.data.schema import _Bad

    fmt = "standard" if isinstance(record["chosen"], str) else "conversational"
    with pytest.raises(_Bad) as bad:
        conversation_pair(record, fmt)
    assert bad.value.field == field and message in bad.value.message
