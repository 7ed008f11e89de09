"""`refdpo demo`: the task's reward and tokenizers, the statistics, the models' log-probs against float64, and the
whole pipeline at toy size (--quick): files, findings, resuming, and the same table from a fresh run."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from refdpo.errors import ConfigError
from refdpo.testbed import task
from refdpo.testbed.demo import DemoConfig, run_demo
from refdpo.testbed.report import METRICS, interval

KW = ("apple", "river", "stone")


def test_reward_by_hand():
    r = task.Reward()
    # 2 keywords, 1 distinct filler (+0.3), one stray keyword (-0.5), one repeat (-0.5)
    assert r(KW, ["apple", "very", "river", "very", "tiger"], True) == pytest.approx(1.3)
    # everything asked, 10 distinct fillers (capped at 6: +1.8), 13 words: one past the budget (-0.3)
    words = list(KW) + list(task.FILLERS[:10])
    assert r(KW, words, True) == pytest.approx(3 + 1.8 - 0.3)
    assert r(KW, words, False) == pytest.approx(3 + 1.8 - 0.3 - 2.0)
    assert r(KW, [], True) == 0.0
    assert r(KW, ["zebra"], True) == -0.5  # unknown words count as off-topic


def test_demonstrations_and_prompts():
    rng = random.Random(0)
    train, heldout = task.prompts(200, 50, rng)
    assert {frozenset(k) for k in train}.isdisjoint(frozenset(k) for k in heldout)
    r = task.Reward()
    good = [r(KW, task.demonstration(KW, rng, "good"), True) for _ in range(300)]
    mediocre = [r(KW, task.demonstration(KW, rng, "mediocre"), True) for _ in range(300)]
    assert min(good) >= 3.9 and max(mediocre) <= min(good) and np.mean(good) > np.mean(mediocre) + 1.5
    dialect = task.demonstration(KW, rng, "good", dialect=True)
    assert dialect[-3:] == list(KW) and set(dialect[:-3]) <= set(task.FILLERS[:16])


def test_bradley_terry_labels():
    rng = random.Random(0)
    samples = [(["apple", "river", "stone"], True, ["tiger"], True), (["apple"], True, ["apple"], True)]
    records, stats = task.preference_records([KW, KW], samples, task.Reward(), 1e-3, rng, "t")
    assert stats["pairs"] == 1 and stats["dropped_identical"] == 1  # identical replies carry no preference
    assert records[0]["chosen"][-1]["content"] == "apple river stone" and records[0]["chosen_true_reward"] == 3.0
    # At temperature 0.5 a gap of 1 is preferred with probability sigmoid(2)
    wins = sum(task.bradley_terry(1.0, 0.0, 0.5, rng) for _ in range(20000)) / 20000
    assert abs(wins - 1 / (1 + math.exp(-2))) < 0.01


def test_tokenizers_render_the_task():
    from refdpo.data.templates import render, tokenize_rendered

    conversation = task.conversation(KW, ["very", "river"])
    word = task.word_tokenizer()
    prompt, full = render(conversation, "model", word)
    (enc,), merges = tokenize_rendered([prompt], [full], word, "model", 64)
    tokens = word.convert_ids_to_tokens(enc.input_ids.tolist())
    assert tokens == ["<s>", *KW, "<sep>", "very", "river", "</s>"] and enc.response_start == 5 and merges == 0
    sub = task.subword_tokenizer()
    ids = sub("lantern apple very", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6 and sub.decode(ids) == "lantern apple very"
    assert not set(sub.get_vocab()) >= {"lantern", "apple"}  # another action space than the policy's


def test_interval_against_float64():
    values = [2.1, 2.5, 1.9, 2.4]
    mean, half = interval(values)
    x = np.array(values, dtype=np.float64)
    assert mean == pytest.approx(x.mean(), abs=1e-12)
    assert half == pytest.approx(3.182 * x.std(ddof=1) / 2, abs=1e-12)  # t(0.975, 3) = 3.182
    assert math.isnan(interval([1.0])[1])


def test_sequence_logprobs_match_float64():
    """The KL estimate's log-probs (left-padded prompts of varying length, as sampled) against a plain float64
    forward of the same sequences, one at a time; tolerance 1e-4 nats."""
    from refdpo.testbed.models import new_model, sample, sequence_logprob_sums

    tok = task.subword_tokenizer()  # prompts of different lengths: generation pads them on the left
    model = new_model(tok, seed=3).eval()
    keywords = [KW, ("lantern", "quartz", "turtle"), ("cloud", "piano", "comet")]
    s = sample(model, tok, keywords, greedy=False, max_tokens=12, seed=0)
    again = sample(model, tok, keywords, greedy=False, max_tokens=12, seed=0)
    assert s.words == again.words and torch.equal(s.batch["input_ids"], again.batch["input_ids"])
    assert all(len(w) <= 12 for w in s.words)
    got = sequence_logprob_sums(model, s.batch)
    model64 = new_model(tok, seed=3).double().eval()
    for row in range(len(keywords)):
        n, start = int(s.batch["lengths"][row]), int(s.batch["response_start"][row])
        ids = s.batch["input_ids"][row, :n][None]
        with torch.no_grad():
            logp = torch.log_softmax(model64(input_ids=ids).logits[0, :-1].double(), dim=-1)
        want = logp[torch.arange(start - 1, n - 1), ids[0, start:]].sum().item()
        assert abs(got[row] - want) < 1e-4


def test_config_checks():
    quick = DemoConfig(quick=True, seeds=3).validate()
    assert quick.train_prompts == 600 and quick.seeds == 3  # a size given explicitly beats the preset
    assert DemoConfig().validate().train_prompts == 4000
    with pytest.raises(ConfigError, match="betas_references"):
        DemoConfig(betas_references="10,5").validate()
    with pytest.raises(ConfigError, match="betas_dpo"):
        DemoConfig(betas_dpo="1,x").validate()
    with pytest.raises(ConfigError, match="seeds"):
        DemoConfig(seeds=1).validate()


def _quick(out, workers: int) -> DemoConfig:
    return DemoConfig(quick=True, out=str(out), workers=workers, progress=False).validate()


def test_quick_demo_end_to_end(tmp_path):
    report = run_demo(_quick(tmp_path / "a", workers=2))
    a = tmp_path / "a"
    for name in ("results.md", "results.csv", "results.json", "reward_vs_beta.png", "reward_vs_kl.png",
                 "length_vs_beta.png", "eos_vs_beta.png"):
        assert (a / name).stat().st_size > 0, name
    cfg = _quick(a, 2)
    rows = {(r["family"], r["beta"]): r for r in report["rows"]}
    assert set(rows) == {("sft", None), ("compatible_ref", None), ("incompatible_ref", None)} | set(cfg.grid())
    for (_, beta), row in rows.items():
        assert row["seeds"] == 2
        assert 0 <= row["win_rate"] <= 1 and row["length"] > 0
        assert all(row[m] is None or math.isfinite(row[m]) for m in METRICS)
        if beta is not None:
            assert 0 <= row["reward_accuracy"] <= 1 and row["kl"] is not None
    assert rows[("sft", None)]["kl"] == 0 and rows[("sft", None)]["win_rate"] == 0.5
    assert rows[("incompatible_ref", None)]["kl"] is None  # another tokenizer: no token-level KL
    questions = [f["question"] for f in report["findings"]]
    assert questions.count("RQ1") == 4 and questions.count("RQ2") == 2 and questions.count("RQ3") == 2
    assert all(f["verdict"] in ("reproduced", "partly reproduced", "not reproduced", "inconclusive", "observed",
                                "not observed") for f in report["findings"])
    text = (a / "results.md").read_text()
    assert "## Findings" in text and text.count("\n| ") >= len(rows) + 1
    # The data went through `refdpo score` under all four references, with provenance.
    sidecar = json.loads((a / "seed-0" / "data" / "train.jsonl.provenance.json").read_text())["references"]
    assert len(sidecar) == 4 and {e["mode"] for e in sidecar.values()} == {"conditional", "prior"}
    assert sidecar["incompatible_chosen_logprob,incompatible_rejected_logprob"]["tokenizer"].endswith("incompatible")

    # Started again: nothing is redone, the same report comes out.
    evals = sorted(a.glob("seed-*/runs/*/eval.json"))
    stamps = [p.stat().st_mtime_ns for p in evals]
    again = run_demo(_quick(a, workers=2))
    assert [p.stat().st_mtime_ns for p in evals] == stamps
    assert again["text"] == report["text"]

    # Another number of workers, other completion orders: the same table, byte for byte. (One seed's training
    # runs are redone, with its preparation kept: redoing everything costs a minute more of CI.)
    shutil.copytree(a, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "seed-1" / "runs")
    for name in ("results.md", "results.csv", "results.json"):
        (tmp_path / "b" / name).unlink()
    run_demo(_quick(tmp_path / "b", workers=1))
    assert len(list((tmp_path / "b").glob("seed-1/runs/*/eval.json"))) == len(cfg.grid())
    for name in ("results.md", "results.csv"):
        assert (tmp_path / "b" / name).read_text() == (a / name).read_text()

    # Another configuration in the same folder is refused, not mixed in.
    with pytest.raises(ConfigError, match="other settings"):
        run_demo(DemoConfig(quick=True, out=str(a), max_lr=1e-3, progress=False).validate())


