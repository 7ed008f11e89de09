"""`refdpo evaluate`: accuracies equal a hand computation from stored and recomputed log-probs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from helpers import run_cli, train_config

from refdpo.commands.evaluate import EvalConfig, evaluate, format_table
from refdpo.commands.score import score_data
from refdpo.commands.train import train
from refdpo.data import build_pairs, load_split
from refdpo.modeling import pad_token_id
from refdpo.tokenization import load_tokenizer


def _wins(a: np.ndarray, b: np.ndarray, tie: float) -> np.ndarray:
    return np.where(np.abs(a - b) <= tie, 0.5, (a > b).astype(float))


def test_evaluate_matches_accuracies_computed_by_hand(tiny_setup, tmp_path):
    summary = train(train_config(tiny_setup, tmp_path / "run", max_train_pairs=64, epochs=1, max_lr=2e-3))
    beta = 0.1
    rows = evaluate(EvalConfig(model=f"{tiny_setup / 'model'},{tmp_path / 'run'}", dataset=str(tiny_setup / "data"),
                               max_len=512, beta=beta, out=str(tmp_path / "eval")).validate())
    initial, trained = rows
    assert trained["checkpoint"] == summary["best"]  # a run folder stands for its best checkpoint
    assert initial["loss"] == pytest.approx(math.log(2), abs=1e-5) and initial["reward_accuracy"] == 0.5
    assert trained["loss"] == pytest.approx(summary["best_val_loss"], abs=1e-6)

    # By hand: the checkpoint's log-probs recomputed by another code path (refdpo score's shared-prompt
    # batches), the stored reference log-probs read from the file, ties within 1e-4 nats counted 0.5.
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(summary["best"])
    data = build_pairs(load_split(str(tiny_setup / "data"), "val"), tokenizer, "tulu", 512,
                       ("chosen_logprob", "rejected_logprob"))
    for row, path in ((initial, tiny_setup / "model"), (trained, summary["best"])):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        pc, pr = score_data(model, data, pad_token_id(tokenizer))
        rc, rr = beta * (pc - data.ref_chosen), beta * (pr - data.ref_rejected)
        assert row["pairs"] == len(data) == 64
        assert row["policy_accuracy"] == pytest.approx(_wins(pc, pr, 1e-4).mean(), abs=1e-12)
        assert row["reward_accuracy"] == pytest.approx(_wins(rc, rr, beta * 1e-4).mean(), abs=1e-12)
        assert row["margin"] == pytest.approx(np.mean(rc - rr), abs=1e-5)
        assert row["logp_chosen"] == pytest.approx(pc.mean(), abs=1e-4)
    assert trained["reward_accuracy"] > 0.6  # it learned something the hand computation agrees with

    table = list(csv.DictReader((tmp_path / "eval" / "evaluate.csv").open()))
    assert [r["model"] for r in table] == [str(tiny_setup / "model"), str(tmp_path / "run")]
    assert json.loads((tmp_path / "eval" / "evaluate.json").read_text())["rows"] == rows
    assert "| reward_accuracy |" in (tmp_path / "eval" / "evaluate.md").read_text()

    # Packed rows with shared prompts (the default) and padded rows give the same table.
    padded = evaluate(EvalConfig(model=f"{tiny_setup / 'model'},{tmp_path / 'run'}",
                                 dataset=str(tiny_setup / "data"), max_len=512, beta=beta, packing=False).validate())
    for packed_row, padded_row in zip(rows, padded):
        for key in ("loss", "margin", "logp_chosen", "logp_rejected", "reward_chosen", "reward_rejected"):
            assert packed_row[key] == pytest.approx(padded_row[key], abs=1e-5), key
        for key in ("pairs", "reward_accuracy", "policy_accuracy", "length_chosen", "length_rejected"):
            assert packed_row[key] == padded_row[key], key


def test_evaluate_cli_prints_one_table_and_refuses_a_missing_model(tiny_setup, tmp_path):
    ok = run_cli(["evaluate", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"),
                  "--max_len", "512", "--max_pairs", "16", "--ref_free", "--beta", "2.0"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.count(str(tiny_setup / "model")) == 1 and "| policy_accuracy |" in ok.stdout
    row = next(line for line in ok.stdout.splitlines() if line.startswith(f"| {tiny_setup / 'model'} |"))
    assert float(row.split("|")[3]) > 1.0  # reference-free at beta 2: long chosen replies make the loss large
    bad = run_cli(["evaluate", "--model", str(tmp_path / "nothing"), "--dataset", str(tiny_setup / "data")])
    assert bad.returncode == 2 and "refdpo evaluate: error:" in bad.stderr


def test_a_run_is_evaluated_with_its_own_objective_and_every_row_says_which(tiny_setup, tmp_path):
    run = tmp_path / "ipo"
    summary = train(train_config(tiny_setup, run, loss="ipo", beta=0.5, max_train_pairs=32, eval_interval=2,
                                 eval_at_start=False, batch_size=4))
    rows = evaluate(EvalConfig(model=f"{run},{tiny_setup / 'model'},{run / 'best'}", max_len=512,
                               dataset=str(tiny_setup / "data")).validate())  # dpo, 0.1 (defaults) for the others
    assert rows[0]["loss"] == pytest.approx(summary["best_val_loss"], abs=1e-6)
    assert rows[2]["loss"] == rows[0]["loss"] and rows[2]["objective"] == "ipo"  # its best, by its link
    assert (rows[0]["objective"], rows[0]["beta"]) == ("ipo", 0.5)
    assert (rows[1]["objective"], rows[1]["beta"]) == ("dpo", 0.1)
    assert rows[0]["ref_columns"] == rows[1]["ref_columns"] == "chosen_logprob,rejected_logprob"
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert "| objective | beta | ref_columns |" in format_table(rows)


def test_a_run_best_at_step_0_names_the_initial_model_and_evaluate_loads_it(tiny_setup, tmp_path):
    run = tmp_path / "worse"  # a learning rate that only makes validation worse
    summary = train(train_config(tiny_setup, run, max_train_pairs=8, max_val_pairs=16, max_lr=5.0))
    assert summary["best_step"] == 0 and summary["best"] == str((tiny_setup / "model").resolve())
    (row,) = evaluate(EvalConfig(model=str(run), dataset=str(tiny_setup / "data"), max_len=512,
                                 max_pairs=16).validate())
    assert row["checkpoint"] == summary["best"]
    assert row["loss"] == pytest.approx(summary["best_val_loss"], abs=1e-6)
