"""`refdpo advise`: the report it writes, the self columns it scores with --policy, its one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_main, write_split

from refdpo.commands.advise import AdviseConfig, advise_split


@pytest.fixture(scope="module")
def candidates(val_records, tmp_path_factory):
    """The tiny val split with two synthetic references: `aligned` lowers every rejected reply by 3 nats (its
    advantage is +3 on every pair), `noise` tilts both replies at random (an advantage of pure noise)."""
    rng = np.random.default_rng(0)
    records = []
    for r in val_records:
        tilt = rng.normal(0, 4, 2)
        top = max(tilt.max(), 0.0)
        records.append({**r, "aligned_c": r["chosen_logprob"], "aligned_r": r["rejected_logprob"] - 3.0,
                        "noise_c": r["chosen_logprob"] + tilt[0] - top, "noise_r": r["rejected_logprob"] + tilt[1] - top})
    return write_split(tmp_path_factory.mktemp("advise"), records, "val")


def test_report_tables_plots_and_verdicts(candidates, tiny_setup, tmp_path):
    report = advise_split(AdviseConfig(dataset=str(candidates), split="val", tokenizer=str(tiny_setup / "model"),
                                       references="aligned=aligned_c,aligned_r noise=noise_c,noise_r free=none",
                                       bootstrap=50, out=str(tmp_path), progress=False))
    refs = report["references"]
    assert refs["aligned"]["verdict"] == "use" and refs["aligned"]["lam"] == 1.0
    assert refs["noise"]["verdict"] == "dont" and refs["noise"]["beta"] == refs["noise"]["beta_self"]
    assert refs["aligned"]["scores"]["ira"] == 1.0  # A⊥ = 3 − 0·ΔB > 0 on every pair
    low, high = refs["noise"]["intervals"]["kl_proxy"]
    assert low <= refs["noise"]["scores"]["kl_proxy"] <= high
    written = json.loads((tmp_path / "advise.json").read_text())
    assert set(written["references"]) == {"aligned", "noise", "free"}
    assert written["data"]["tokens_per_byte"] > 0  # the length rule ran
    for name in ("advise.md", "advise.csv", *report["plots"]):
        assert (tmp_path / name).stat().st_size > 0
    assert "aligned" in (tmp_path / "advise.md").read_text()


def test_policy_scores_the_missing_self_columns(candidates, tiny_setup, tmp_path, val_records):
    stripped = [{k: v for k, v in r.items() if k not in ("chosen_logprob", "rejected_logprob")}
                for r in json.loads("[" + ",".join((candidates / "val.jsonl").read_text().splitlines()) + "]")]
    folder = write_split(tmp_path / "data", stripped, "val")
    report = advise_split(AdviseConfig(dataset=str(folder), split="val", policy=str(tiny_setup / "model"),
                                       template="tulu", max_len=512, references="aligned=aligned_c,aligned_r",
                                       bootstrap=0, out=str(tmp_path / "out"), progress=False))
    scored = tmp_path / "out" / "val.self.jsonl"
    rescored = [json.loads(line) for line in scored.read_text().splitlines()]
    np.testing.assert_allclose([r["chosen_logprob"] for r in rescored],
                               [r["chosen_logprob"] for r in val_records], atol=1e-3)
    assert report["references"]["aligned"]["verdict"] == "use"
    written = scored.stat().st_mtime_ns
    again = advise_split(AdviseConfig(dataset=str(folder), split="val", policy=str(tiny_setup / "model"),
                                      template="tulu", max_len=512, references="aligned=aligned_c,aligned_r",
                                      bootstrap=0, out=str(tmp_path / "out"), progress=False))
    assert scored.stat().st_mtime_ns == written  # the same policy and settings: scored once
    assert json.dumps(again["references"], sort_keys=True) == json.dumps(report["references"], sort_keys=True)


@pytest.mark.parametrize("args, message", [
    (["--references", "bad"], "--references: expected NAME=CHOSEN,REJECTED"),
    (["--references", "x=absent_c,absent_r"], "no column(s) absent_c, absent_r for --references"),
    (["--references", "x=noise_c,noise_r", "--self_columns", "p_c,p_r"], "refdpo advise --policy MODEL"),
    (["--references", "x=a,b", "x=c,d"], "'x' is named twice"),
])
def test_one_line_refusals(candidates, tmp_path, capsys, args, message):
    _, err = run_main(["advise", "--dataset", str(candidates), "--split", "val", "--out", str(tmp_path), *args],
                      capsys)
    assert len(err) == 1 and message in err[0], err


def test_a_bad_value_is_named_by_row_and_field(candidates, tmp_path, capsys):
    records = [json.loads(line) for line in (candidates / "val.jsonl").read_text().splitlines()]
    records[5]["noise_r"] = "n/a"
    folder = write_split(tmp_path / "data", records, "val")
    _, err = run_main(["advise", "--dataset", str(folder), "--split", "val", "--references", "x=noise_c,noise_r",
                       "--out", str(tmp_path / "out")], capsys)
    assert len(err) == 1 and "row 5" in err[0] and "noise_r" in err[0] and "must be a number" in err[0], err


def test_a_reference_in_another_split_is_matched_by_the_conversations(candidates, tmp_path):
    """RefDPO keeps each reference in its own config: the rows are matched by their text, in any order, and a
    pair the other split lacks is left out of that reference's scores only."""
    records = [json.loads(line) for line in (candidates / "val.jsonl").read_text().splitlines()]
    other = [{k: v for k, v in r.items() if k not in ("noise_c", "noise_r")} for r in records[1:]][::-1]
    write_split(tmp_path / "other", other, "val")
    common = dict(dataset=str(candidates), split="val", bootstrap=0, progress=False)
    inside = advise_split(AdviseConfig(**common, references="aligned=aligned_c,aligned_r", out=str(tmp_path / "a")))
    outside = advise_split(AdviseConfig(**common, references=f"aligned=aligned_c,aligned_r@{tmp_path / 'other'}",
                                        out=str(tmp_path / "b")))
    assert outside["data"]["references"]["aligned"]["pairs"] == len(records) - 1
    assert outside["references"]["aligned"]["verdict"] == inside["references"]["aligned"]["verdict"] == "use"
    assert outside["references"]["aligned"]["scores"]["kl_proxy"] == pytest.approx(9 / 4)  # A = 3 on every pair


def test_the_numbers_do_not_depend_on_the_number_of_processes(candidates, tmp_path):
    common = dict(dataset=str(candidates), split="val", references="aligned=aligned_c,aligned_r noise=noise_c,noise_r",
                  bootstrap=30, progress=False)
    one = advise_split(AdviseConfig(**common, workers=1, out=str(tmp_path / "one")))
    two = advise_split(AdviseConfig(**common, workers=2, out=str(tmp_path / "two")))
    assert (tmp_path / "one" / "advise.csv").read_text() == (tmp_path / "two" / "advise.csv").read_text()
    assert json.dumps(one["references"], sort_keys=True) == json.dumps(two["references"], sort_keys=True)  # NaN too
