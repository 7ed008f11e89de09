"""`refdpo demo --study advise`: the synthesised references equal their formula, the phases are disjoint, a tiny
study runs and resumes, and `advise` on the real columns of a prepared seed tells a pure-noise reference (a = 0,
large sigma: "dont") from a pure-signal one (large a, sigma = 0: "use")."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from refdpo.io import read_jsonl
from refdpo.testbed import study
from refdpo.testbed.demo import DemoConfig, run_demo
from refdpo.testbed.study_eval import auroc, partial_corr, snap

# Smaller than --quick: a seed prepares in a few seconds. One candidate, two betas, two seeds.
TINY = dict(study="advise", phase="calibrate", quick=True, seeds=2, train_prompts=300, heldout_prompts=60,
            demonstrations=1500, sft_steps=100, compatible_steps=16, betas_dpo="3,0.3,0.1",
            candidates="f4_a1_s0_b0", workers=2, progress=False)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "advise"
    cfg = DemoConfig(out=str(out), **TINY).validate()
    report = run_demo(cfg)
    return cfg, out, report


def test_f4_columns_equal_the_formula(tiny_study):
    cfg, out, _ = tiny_study
    ref = study.f4(1.0, 0.0, 0.0)
    for split in ("train", "val"):
        records = read_jsonl(out / "seed-0" / "data" / f"{split}.jsonl")
        chosen, rejected = study.columns_of(ref).split(",")
        eps_w, eps_l = study.f4_noise(0, ref.name, split, len(records))
        for i in (0, len(records) // 2, len(records) - 1):
            r = records[i]
            words_w, words_l = (len(r[s][-1]["content"].split()) for s in ("chosen", "rejected"))
            g_w = ref.a * r["chosen_true_reward"] + ref.sigma * eps_w[i] + ref.b * words_w
            g_l = ref.a * r["rejected_true_reward"] + ref.sigma * eps_l[i] + ref.b * words_l
            c = max(g_w, g_l, 0.0)
            assert r[chosen] == pytest.approx(r["chosen_logprob"] + g_w - c, abs=1e-9)
            assert r[rejected] == pytest.approx(r["rejected_logprob"] + g_l - c, abs=1e-9)
            assert r[chosen] <= r["chosen_logprob"] + 1e-12 and r[rejected] <= r["rejected_logprob"] + 1e-12
    # noise of sd sigma on the margin, from an RNG of (seed, reference, split): reproducible, split-specific
    w, lo = study.f4_noise(3, "x", "train", 20000)
    assert np.std(w - lo) == pytest.approx(1.0, abs=0.03)
    assert np.array_equal(study.f4_noise(3, "x", "train", 5)[0], w[:5])
    assert not np.array_equal(study.f4_noise(3, "x", "val", 5)[0], w[:5])
    # b: the margin moves by b per extra word of the chosen reply
    z = np.zeros(1)
    cw, cl = study.f4_columns(z - 5, z - 5, z, z, z + 4, z + 1, z, z, 0.0, 0.0, 0.5)
    assert (cw - cl)[0] == pytest.approx(1.5)


def test_phases_are_disjoint():
    cfg = DemoConfig(study="advise").validate()
    names = {p: {r.name for r in study.phase_references(cfg, p)} for p in ("calibrate", "heldout", "long")}
    assert names["calibrate"].isdisjoint(names["heldout"]) and names["calibrate"].isdisjoint(names["long"])
    assert set(study.phase_seeds(cfg, "calibrate")).isdisjoint(study.phase_seeds(cfg, "heldout"))
    assert len(study.phase_seeds(cfg, "heldout")) >= 3
    calibrate = study.phase_references(cfg, "calibrate")
    assert all(r.b == 0 for r in calibrate if r.kind == "f4")  # b != 0 only in held-out
    assert any(r.b != 0 for r in study.phase_references(cfg, "heldout"))
    for phase in ("calibrate", "heldout"):  # every seed of a phase prepares exactly its phase's references
        plan = study.seed_plan(cfg, study.phase_seeds(cfg, phase)[0])
        graded = {r.name for r in study.phase_references(cfg, phase) if r.kind == "graded"}
        assert graded <= set(plan.references) and set(plan.references) - {"self", "compatible", "incompatible",
                                                                           "prior"} == graded


def test_tiny_study_runs_and_resumes(tiny_study):
    cfg, out, report = tiny_study
    runs = sorted(out.glob("seed-*/runs/*/eval.json"))
    assert len(runs) == 2 * 2 * 3  # seeds x (self, candidate) x betas
    assert (out / "results.md").exists() and (out / "calibrate.csv").exists()
    assert "gain_vs_beta_calibrate.png" in report["plots"]
    units = report["units"]["calibrate"]
    assert {u["reference"] for u in units} == {"self", "f4_a1_s0_b0"}
    for u in units:
        assert u["best_reward"] == max(u["reward"].values())
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    text = (out / "results.md").read_text()
    again = run_demo(DemoConfig(out=str(out), **TINY).validate())  # resumes: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    assert again["text"].split("This invocation")[0] == text.split("This invocation")[0]
    assert json.loads((out / "demo.json").read_text())["study"] == "advise"


def test_advise_tells_noise_from_signal(tiny_study):
    _, out, _ = tiny_study
    records = read_jsonl(out / "seed-0" / "data" / "train.jsonl")
    noise, signal = study.f4(0.0, 20.0, 0.0), study.f4(5.0, 0.0, 0.0)
    records = study.synthesise(records, [noise, signal], 0, "train")
    assert study.advise_one(records, noise)["verdict"] == "dont"
    assert study.advise_one(records, signal)["verdict"] == "use"


def test_statistics_by_hand():
    assert snap(0.01, [10, 3, 1, 0.3, 0.1, 0.03]) == 0.03 and snap(2.0, [10, 3, 1]) == 3  # log10 2 is nearer 3
    assert auroc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([True, False])) == 0.5
    rng = np.random.default_rng(0)
    z = rng.normal(size=500)
    x, y = z + rng.normal(size=500), z + rng.normal(size=500)  # related only through z
    assert abs(partial_corr(x, y, z)) < 0.1 and np.corrcoef(x, y)[0, 1] > 0.4
    assert math.isnan(partial_corr(z, z, z))


def _unit(reference: str, kind: str, rewards: dict, advise: dict | None) -> dict:
    best = max(rewards, key=rewards.get)
    return {"reference": reference, "kind": kind, "seed": 0, "grid": sorted(rewards, reverse=True), "reward": rewards,
            "best_beta": best, "best_reward": rewards[best], "advise": advise}


def test_regrets_by_hand():
    from refdpo.testbed.study_eval import beta_rows, decision_rows, verdict_rows

    grid = {10.0: 0.0, 1.0: 0.0, 0.1: 0.0, 0.03: 0.0}
    selfu = _unit("self", "self", {**grid, 1.0: 2.0, 0.1: 2.5}, {"verdict": "self", "beta": 0.12, "beta_whole": 0.12})
    good = _unit("good", "f4", {**grid, 1.0: 2.8, 0.1: 2.2}, {"verdict": "use", "beta": 0.9, "beta_self": 0.12,
                                                             "beta_whole": 0.9})
    bad = _unit("bad", "f4", {**grid, 1.0: 1.0, 0.1: 2.0}, {"verdict": "dont", "beta": 0.12, "beta_self": 0.12,
                                                          "beta_whole": 3.0})
    for u in (good, bad):
        u["gain_bvb"] = u["best_reward"] - selfu["best_reward"]
    units = [selfu, good, bad]
    decision = {d["rule"]: d["regret"][0] for d in decision_rows(units)}
    # advise: good at beta 1 (2.8, the best of 2.8 and 2.5): 0; bad -> self at 0.1 (2.5 of 2.5): 0
    assert decision["advise"] == pytest.approx(0.0)
    # the candidate at 0.1: good 2.8 - 2.2, bad 2.5 - 2.0
    assert decision["candidate, fixed 0.1"] == pytest.approx((0.6 + 0.5) / 2)
    beta = {(b["units"], b["rule"]): b for b in beta_rows(units)}
    # candidates: good 0.9 -> 1 (its best); bad's beta used whole 3 -> 1 (log10-nearer than 10): 2.0 - 1.0
    assert beta[("candidates", "advise")]["regret"][0] == pytest.approx((0.0 + 1.0) / 2)
    assert beta[("self", "advise")]["within_one_step"][0] == 1.0  # 0.12 -> 0.1, self's best
    assert {v["rule"]: v["accuracy"][0] for v in verdict_rows(units)} == {"advise": 1.0, "always use": 0.5,
                                                                          "never use": 0.5}
