"""The advise study's numbers: per (reference, seed) the measured outcome next to what `advise` said, the means
per reference, and on held-out phases the evaluation of the frozen rules against three beta baselines.

Outcome of a candidate on a seed (paired with the self reference of the same seed):
  gain(beta)   = r*(candidate, beta) - r*(self, beta)
  best-vs-best = max_beta r*(candidate, beta) - max_beta r*(self, beta); "helps" when > 0
Beta: beta_rec is advise's beta snapped to the nearest grid value (in log10); the error is
|log10 beta_rec - log10 beta_best| and the regret r*(beta_best) - r*(beta_rec), per (reference, seed), for the
candidates (their beta) and for self (advise's beta_self). Intervals: 95% bootstrap over references (all seeds
of a resampled reference move together), 2,000 resamples from a fixed RNG.
"""

from __future__ import annotations

import json
import math

import numpy as np

from refdpo.io import read_jsonl
from refdpo.testbed.report import interval
from refdpo.testbed.study import (
    ADVISE_SPLIT,
    SELF,
    advise_one,
    phase_jobs,
    phase_references,
)

BASELINE_RULES = {"fixed 0.1": lambda is_self: 0.1, "fixed 0.01": lambda is_self: 0.01,
                  "paper (0.01 self, 1.0 other)": lambda is_self: 0.01 if is_self else 1.0}
RESAMPLES = 2000


def snap(beta: float, grid: list[float]) -> float:
    """The grid value nearest to beta in log10 (ties: the larger)."""
    return min(sorted(grid, reverse=True), key=lambda g: abs(math.log10(g) - math.log10(beta)))


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 1/2 P(tie) (Mann-Whitney); nan without both classes."""
    pos, neg = score[positive], score[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def partial_corr(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """corr(x, y | z): Pearson correlation of the residuals of x and y after least squares on [1, z]."""
    design = np.column_stack([np.ones_like(z), z])
    rx = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    ry = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    if np.std(rx) < 1e-12 or np.std(ry) < 1e-12:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def cluster_bootstrap(units: list[dict], stat, seed: int = 0) -> tuple[float, float, float]:
    """stat(units), and the 2.5/97.5 percentiles of stat over resamples of references (with replacement); of
    seeds when the units are all one reference (self)."""
    value = stat(units)
    key = "reference" if len({u["reference"] for u in units}) > 1 else "seed"
    refs = sorted({u[key] for u in units})
    by_ref = {r: [u for u in units if u[key] == r] for r in refs}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(RESAMPLES):
        sample = [u for r in rng.choice(refs, len(refs)) for u in by_ref[r]]
        v = stat(sample)
        if not math.isnan(v):
            draws.append(v)
    if not draws:
        return value, math.nan, math.nan
    return value, float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


# --- loading a phase ----------------------------------------------------------------------------------------

def load_phase(cfg, phase: str) -> list[dict] | None:
    """One unit per (candidate, seed) and one per (self, seed), with the outcome and advise's answer; None
    while a run of the phase is missing."""
    from refdpo.testbed.demo import run_dir, seed_dir

    units = []
    refs = {r.name: r for r in [SELF] + phase_references(cfg, phase)}
    for sub, seed, grid in phase_jobs(cfg, phase):
        folder = seed_dir(sub, seed)
        paths = {(f, b): run_dir(sub, seed, f, b) / "eval.json" for f, b in grid}
        if not (folder / "prepared.json").exists() or not all(p.exists() for p in paths.values()):
            return None
        prepared = json.loads((folder / "prepared.json").read_text())
        runs = {key: json.loads(p.read_text()) for key, p in paths.items()}
        records = read_jsonl(folder / "data" / f"{ADVISE_SPLIT}.jsonl")
        self_curve = {b: r["reward"] for (f, b), r in runs.items() if f == "self"}
        self_best = max(self_curve, key=self_curve.get)
        for name, ref in refs.items():
            curve = {b: r for (f, b), r in runs.items() if f == name}
            best = max(curve, key=lambda b: curve[b]["reward"])
            unit = {"phase": phase, "seed": seed, "reference": name, "kind": ref.kind, "a": ref.a,
                    "sigma": ref.sigma, "b": ref.b, "steps": ref.steps, "lam": ref.lam,
                    "strength": strength(ref, prepared), "grid": sorted(curve, reverse=True),
                    "reward": {b: curve[b]["reward"] for b in curve}, "kl": {b: curve[b].get("kl") for b in curve},
                    "length": {b: curve[b]["length"] for b in curve}, "best_beta": best,
                    "best_reward": curve[best]["reward"], "self_best_beta": self_best,
                    "gain_bvb": curve[best]["reward"] - self_curve[self_best],
                    "gain": {b: curve[b]["reward"] - self_curve[b] for b in curve if b in self_curve}}
            if ref.kind != "self":
                unit["advise"] = advise_one(records, ref)
            units.append(unit)
        beta_self = next((u["advise"]["beta_self"] for u in units if u["seed"] == seed and u.get("advise")), None)
        for u in units:
            if u["seed"] == seed and u["kind"] == "self" and beta_self is not None:
                u["advise"] = {"verdict": "self", "beta": beta_self, "beta_whole": beta_self, "lam": 1.0, "scores": {}, "reasons": []}
    return units


def strength(ref, prepared: dict) -> float:
    """The reference's own quality: mean r* of its own T=1 samples on the held-out prompts (a model), the
    signal a (F4), or lambda x its base's + (1 - lambda) x the SFT model's (a mixture, an interpolation)."""
    base = prepared["baselines"]
    if ref.kind == "f4":
        return ref.a
    if ref.kind == "self":
        return base["sft"]["reward"]
    if ref.kind == "mix":
        return ref.lam * base[f"{ref.base}_ref"]["reward"] + (1 - ref.lam) * base["sft"]["reward"]
    key = f"{ref.name}_ref"
    return base[key]["reward"] if key in base else math.nan


# --- evaluating the frozen rules -----------------------------------------------------------------------------

def beta_rows(units: list[dict]) -> list[dict]:
    """Per rule (advise and the baselines): mean |log10 beta_rec - log10 beta_best|, share within one grid step,
    mean regret, each with its bootstrap interval, on candidates (advise: its beta for the candidate used whole)
    and on self (advise: beta_self)."""
    rules = {"advise": lambda u: u["advise"]["beta_whole" if u["kind"] != "self" else "beta"]} | {
        name: (lambda u, f=f: f(u["kind"] == "self")) for name, f in BASELINE_RULES.items()}
    out = []
    for who, pick in (("candidates", lambda u: u["kind"] != "self"), ("self", lambda u: u["kind"] == "self")):
        chosen = [u for u in units if pick(u) and u.get("advise")]
        if not chosen:
            continue
        for rule, beta_of in rules.items():
            def per_unit(u, beta_of=beta_of):
                rec = snap(beta_of(u), u["grid"])
                return (abs(math.log10(rec) - math.log10(u["best_beta"])),
                        abs(u["grid"].index(rec) - u["grid"].index(u["best_beta"])) <= 1,
                        u["best_reward"] - u["reward"][rec])
            row = {"units": who, "rule": rule, "n": len(chosen)}
            for i, metric in enumerate(("log10_error", "within_one_step", "regret")):
                row[metric] = cluster_bootstrap(chosen, lambda us, i=i: float(np.mean([per_unit(u)[i] for u in us]))
                                                if us else math.nan)
            out.append(row)
    return out


def decision_rows(units: list[dict]) -> list[dict]:
    """The whole recommendation, trained: regret = max(best r* of the candidate, best r* of self) on the seed
    minus the r* of what the rule says to train. advise: the candidate at its beta ("use") or self at beta_self
    ("dont"); "mix" units are left out (no run trains the candidate at advise's lambda). The baselines train the
    candidate (the paper's stance on a stronger reference) or self, at their fixed beta; "self at advise's
    beta_self" is never-use with advise's beta (what the verdict adds over it)."""
    selves = {u["seed"]: u for u in units if u["kind"] == "self"}
    cands = [u for u in units if u["kind"] != "self" and u.get("advise") and u["advise"]["verdict"] != "mix"]

    def regret(u: dict, rule: str) -> float:
        me, base = u, selves[u["seed"]]
        best = max(me["best_reward"], base["best_reward"])
        if rule == "advise":
            run, beta = (me, u["advise"]["beta"]) if u["advise"]["verdict"] == "use" else (base, u["advise"]["beta_self"])
        elif rule == "self at advise's β_self":
            run, beta = base, u["advise"]["beta_self"]
        elif rule.startswith("self, "):
            run, beta = base, BASELINE_RULES[rule[len("self, "):]](True)
        else:
            run, beta = me, BASELINE_RULES[rule[len("candidate, "):]](False)
        return best - run["reward"][snap(beta, run["grid"])]

    rules = ["advise", *(f"candidate, {r}" for r in BASELINE_RULES), "self at advise's β_self", "self, fixed 0.1",
             "self, paper (0.01 self, 1.0 other)"]
    return [{"rule": rule, "n": len(cands), "left_out_mix": sum(1 for u in units if (u.get("advise") or {}).get(
        "verdict") == "mix"), "regret": cluster_bootstrap(cands, lambda us, rule=rule: float(np.mean(
            [regret(u, rule) for u in us])) if us else math.nan)} for rule in rules]


def verdict_rows(units: list[dict]) -> list[dict]:
    """Share of (candidate, seed) units where the verdict's side (use/mix: helps; dont: does not) matches the
    measured best-vs-best sign; against always-use (the paper's stance on stronger references) and never-use."""
    cands = [u for u in units if u["kind"] != "self" and u.get("advise")]
    rules = {"advise": lambda u: u["advise"]["verdict"] in ("use", "mix"), "always use": lambda u: True,
             "never use": lambda u: False}
    return [{"rule": name, "n": len(cands), "accuracy": cluster_bootstrap(
        cands, lambda us, f=f: float(np.mean([f(u) == (u["gain_bvb"] > 0) for u in us])) if us else math.nan)}
        for name, f in rules.items()]


def score_rows(units: list[dict]) -> list[dict]:
    """Per score: AUROC for "helps", Spearman-free Pearson with the gain, and the partial correlation with the
    gain given the reference's strength, separately for F4 (strength a) and for models (measured r*)."""
    cands = [u for u in units if u["kind"] != "self" and u.get("advise")]
    names = sorted({k for u in cands for k in u["advise"]["scores"]})
    out = []
    for name in names:
        have = [u for u in cands if math.isfinite(u["advise"]["scores"].get(name, math.nan))]

        def arr(us, key, name=name):
            return np.array([u["advise"]["scores"][name] if key == "score" else u[key] for u in us], dtype=float)

        row = {"score": name, "n": len(have),
               "auroc": cluster_bootstrap(have, lambda us: auroc(arr(us, "score"), arr(us, "gain_bvb") > 0))}
        for group, members in (("f4", lambda u: u["kind"] == "f4"), ("models", lambda u: u["kind"] != "f4")):
            sub = [u for u in have if members(u) and math.isfinite(u["strength"])]
            row[f"partial_{group}"] = cluster_bootstrap(
                sub, lambda us: partial_corr(arr(us, "score"), arr(us, "gain_bvb"), arr(us, "strength"))
                if len({u["reference"] for u in us}) >= 3 else math.nan) if sub else (math.nan,) * 3
        out.append(row)
    return out


def findings(units: list[dict]) -> list[dict]:
    """The two findings the demo could not reproduce, re-asked on this phase: reference-free needs a much larger
    beta (best beta at least 10x self's), and a stronger compatible reference prefers a larger beta (paired
    log10 best-beta difference over seeds)."""
    out = []
    by = {}
    for u in units:
        by.setdefault(u["reference"], {})[u["seed"]] = u
    if "self" not in by:
        return out
    seeds = sorted(by["self"])

    def mean_best(name):
        curve = {b: np.mean([by[name][s]["reward"][b] for s in seeds]) for b in by[name][seeds[0]]["grid"]}
        return max(curve, key=curve.get), curve

    self_best, _ = mean_best("self")
    for name, claim in (("ref_free", "reference-free training needs a much larger beta than DPO"),
                        ("compatible", "a stronger compatible reference prefers a larger beta than self")):
        if name not in by:
            continue
        best, curve = mean_best(name)
        diff = interval([math.log10(by[name][s]["best_beta"]) - math.log10(by["self"][s]["best_beta"]) for s in seeds])
        ratio = best / self_best
        verdict = ("reproduced" if ratio >= (10 if name == "ref_free" else 3) and diff[0] - diff[1] > 0 else
                   "partly reproduced" if ratio > 1 else "not reproduced")
        out.append({"claim": claim, "verdict": verdict,
                    "evidence": f"best beta (mean curve) {best:g} vs self {self_best:g}; per-seed log10 best-beta "
                                f"difference {diff[0]:+.2f} ± {diff[1]:.2f}; true reward over its grid: "
                                + ", ".join(f"{b:g}: {v:.2f}" for b, v in sorted(curve.items(), reverse=True))})
    return out


def reference_rows(units: list[dict]) -> list[dict]:
    """One row per reference: means over seeds of the outcome and of every advise score."""
    out = []
    for name in dict.fromkeys(u["reference"] for u in units):
        us = [u for u in units if u["reference"] == name]
        grid = us[0]["grid"]
        curve = {b: np.mean([u["reward"][b] for u in us]) for b in grid}
        best = max(curve, key=curve.get)
        row = {"reference": name, "kind": us[0]["kind"], "seeds": len(us),
               "strength": interval([u["strength"] for u in us])[0], "best_beta": best,
               "reward_at_best": curve[best], "gain_bvb": interval([u["gain_bvb"] for u in us]),
               "helps_share": float(np.mean([u["gain_bvb"] > 0 for u in us])),
               "kl_at_best": _mean([u["kl"][best] for u in us]), "length_at_best": _mean([u["length"][best] for u in us])}
        row.update({f"gain_at_{b:g}": _mean([u["gain"].get(b) for u in us]) for b in grid})
        advised = [u["advise"] for u in us if u.get("advise")]
        if advised:
            row["verdicts"] = "/".join(a["verdict"] for a in advised)
            row["beta_rec"] = float(np.median([a["beta"] for a in advised]))
            row["lam_rec"] = float(np.median([a["lam"] for a in advised]))
            for k in sorted({k for a in advised for k in a["scores"]}):
                row[f"score_{k}"] = _mean([a["scores"].get(k) for a in advised])
        out.append(row)
    return out


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None
