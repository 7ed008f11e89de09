"""`refdpo check`: stored log-prob statistics without a model; with one, a recomputed sample and the cause
of a disagreement named (template, truncation, BOS, tokenizer)."""


from __future__ import annotations

import copy
import json

import pytest
from helpers import (
    KEY,
    run_cli,
    run_main,
    scored,
    write_split,
)

from refdpo.commands.check import CheckConfig, check

# --- recomputing with the model -----------------------------------------------------------------------------


def test_check_flags_tulu_data_trained_with_zephyr(tiny_setup, tmp_path):
    report = check(CheckConfig(dataset=str(tiny_setup / "data"), split="val", model=str(tiny_setup / "model"),
                               template="zephyr", max_len=512, sample=16).validate())
    assert any("template 'tulu'" in w and "'zephyr'" in w for w in report["warnings"])  # from the provenance
    recompute = report["columns"]["chosen_logprob,rejected_logprob"]["recompute"]
    assert recompute["max_abs_diff"] > 1e-3
    assert any("template" in c and "'tulu'" in c for c in recompute["causes"])  # found by recomputing
    assert report["errors"]
    # Without the sidecar, the recomputation alone finds the cause.
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "val.jsonl").write_bytes((tiny_setup / "data" / "val.jsonl").read_bytes())
    bare = check(CheckConfig(dataset=str(tmp_path / "bare"), split="val", model=str(tiny_setup / "model"),
                             template="zephyr", max_len=512, sample=16).validate())
    assert any("template: the stored values match template 'tulu'" in c
               for c in bare["columns"]["chosen_logprob,rejected_logprob"]["recompute"]["causes"])
    # The matching settings pass.
    good = check(CheckConfig(dataset=str(tiny_setup / "data"), split="val", model=str(tiny_setup / "model"),
                             template="tulu", max_len=512, sample=16).validate())
    assert not good["errors"] and not good["warnings"]
    assert good["columns"]["chosen_logprob,rejected_logprob"]["recompute"]["max_abs_diff"] < 1e-4


def test_check_flags_truncated_responses(tiny_setup, tmp_path):
    scored(tiny_setup, tmp_path / "short.jsonl", split="val", max_len=44)
    report = check(CheckConfig(dataset=str(tmp_path / "short.jsonl"), model=str(tiny_setup / "model"),
                               template="tulu", max_len=512, sample=64).validate())
    assert any("max_len 44" in w for w in report["warnings"])
    causes = report["columns"]["chosen_logprob,rejected_logprob"]["recompute"]["causes"]
    assert any(c.startswith("truncation") for c in causes), causes
    cli = run_cli(["check", "--dataset", str(tmp_path / "short.jsonl"), "--model", str(tiny_setup / "model"),
                   "--max_len", "512"])
    assert cli.returncode == 1 and "truncation" in cli.stdout


def test_check_recomputes_a_prior_reference_with_its_own_rendering(tiny_setup, tmp_path):
    scored(tiny_setup, tmp_path / "prior.jsonl", split="val", mode="prior", prior_prefix="assistant")
    # The policy trains with zephyr; the prior reference was rendered with tulu's assistant header: not an error.
    report = check(CheckConfig(dataset=str(tmp_path / "prior.jsonl"), model=str(tiny_setup / "model"),
                               template="zephyr", max_len=512, sample=16).validate())
    recompute = report["columns"]["chosen_logprob,rejected_logprob"]["recompute"]
    assert not report["errors"] and recompute["max_abs_diff"] < 1e-4 and recompute["template"] == "tulu"

# --- without a model ----------------------------------------------------------------------------------------


def test_check_warns_on_exact_zeros(val_records, tmp_path):
    records = copy.deepcopy(val_records)
    records[3]["chosen_logprob"] = 0.0
    records[10]["rejected_logprob"] = 0.0
    report = check(CheckConfig(dataset=str(write_split(tmp_path / "d", records))).validate())
    assert report["errors"] == []
    zeros = [w for w in report["warnings"] if "exactly 0.0" in w]
    assert len(zeros) == 2 and all("truncated" in w for w in zeros)
    stats = report["columns"][KEY]["stats"]
    assert stats["chosen"]["zeros"] == stats["rejected"]["zeros"] == 1


def _nan(r):
    r["chosen_logprob"] = float("nan")  # written as NaN, which JSON lines readers accept


def _positive(r):
    r["rejected_logprob"] = 0.5


def _missing(r):
    del r["chosen_logprob"]


def _text(r):
    r["rejected_logprob"] = "-3.5"


@pytest.mark.parametrize("spoil,message", [
    (_nan, "chosen_logprob: 1 values are NaN"),
    (_positive, "rejected_logprob: 1 values are positive"),
    (_missing, "chosen_logprob: 1 values are missing or not numbers"),
    (_text, "rejected_logprob: 1 values are missing or not numbers"),
])
def test_check_errors_exit_1(spoil, message, val_records, tmp_path, capsys):
    records = copy.deepcopy(val_records)
    spoil(records[5])
    data = write_split(tmp_path / "d", records)
    report = check(CheckConfig(dataset=str(data)).validate())
    assert [e for e in report["errors"] if e.startswith(message)] == report["errors"] and report["errors"]
    out, err = run_main(["check", "--dataset", str(data)], capsys, code=1)
    assert err == [] and f"ERROR: {message}" in out and "1 problem(s) found" in out  # the report goes to stdout


def test_check_missing_columns_exit_1(val_records, tmp_path, capsys):
    records = [{("a" if k == "chosen_logprob" else "b" if k == "rejected_logprob" else k): v for k, v in r.items()}
               for r in val_records]
    data = write_split(tmp_path / "d", records)
    report = check(CheckConfig(dataset=str(data)).validate())
    assert report["errors"] == [f"columns {KEY} not found in {data / 'train.jsonl'}"]
    out, err = run_main(["check", "--dataset", str(data)], capsys, code=1)
    assert err == [] and "1 problem(s) found" in out
    report = check(CheckConfig(dataset=str(data), ref_columns="a,b").validate())  # the renamed pair is fine
    assert report["errors"] == []


def test_check_warns_on_per_token_means(val_records, val_data, tiny_setup, tmp_path):
    records = copy.deepcopy(val_records)
    for i, r in enumerate(records):
        r["chosen_logprob"] /= val_data.chosen[i].response_tokens
        r["rejected_logprob"] /= val_data.rejected[i].response_tokens
    report = check(CheckConfig(dataset=str(write_split(tmp_path / "d", records))).validate())
    assert report["errors"] == []
    assert any("averaged per token" in w for w in report["warnings"]), report["warnings"]
    summed = check(CheckConfig(dataset=str(tiny_setup / "data"), split="val").validate())
    assert summed["errors"] == summed["warnings"] == []
    assert summed["columns"][KEY]["stats"]["length_correlation"] < -0.5


def test_check_writes_its_report(tiny_setup, tmp_path, capsys):
    path = tmp_path / "reports" / "check.json"
    argv = ["check", "--dataset", str(tiny_setup / "data"), "--split", "val", "--report", str(path)]
    out, err = run_main(argv, capsys, code=0)
    assert err == [] and out.rstrip().endswith("OK")
    report = json.loads(path.read_text())
    assert report == check(CheckConfig(dataset=str(tiny_setup / "data"), split="val").validate())
    assert report["columns"][KEY]["provenance"]["rows_out"] == 64
