"""The advise study's report, from the numbers of study_eval.py: results.md/.csv/.json, one CSV per phase and the
plots (study.py), for every phase whose runs are all done; and the default demo's "advise vs measured" table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from refdpo.advise.rules import CALIBRATION
from refdpo.io import atomic_write_json, atomic_write_text, json_safe, read_jsonl
from refdpo.tables import csv_text
from refdpo.testbed.study import ADVISE_SPLIT, advise_one
from refdpo.testbed.study_eval import (
    beta_rows,
    decision_rows,
    findings,
    load_phase,
    reference_rows,
    score_rows,
    snap,
    verdict_rows,
)


def unit_rows(units: list[dict]) -> list[dict]:
    """Flat rows for results.csv: one per (reference, seed)."""
    rows = []
    for u in units:
        row = {k: u[k] for k in ("phase", "seed", "reference", "kind", "a", "sigma", "b", "steps", "lam", "strength",
                                 "best_beta", "best_reward", "self_best_beta", "gain_bvb")}
        row["kl_at_best"], row["length_at_best"] = u["kl"][u["best_beta"]], u["length"][u["best_beta"]]
        row.update({f"gain_at_{b:g}": u["gain"].get(b) for b in u["grid"]})
        a = u.get("advise")
        if a:
            row.update(verdict=a["verdict"], beta_rec=a["beta"], beta_rec_snapped=snap(a["beta"], u["grid"]),
                       lam_rec=a["lam"])
            row.update({f"score_{k}": v for k, v in sorted(a["scores"].items())})
        rows.append(row)
    return rows


def write_study_report(cfg, seconds: float, workers: int, phases: list[str], trained: int = 0) -> dict:
    """results.md/.csv/.json, one CSV per phase, and the plots, for every phase whose runs are all done."""
    from refdpo.testbed.study import plot

    folder = Path(cfg.out)
    loaded = {p: load_phase(cfg, p) for p in ("calibrate", "heldout", "long")}
    loaded = {p: u for p, u in loaded.items() if u is not None}
    summary = {}
    for phase, units in loaded.items():
        summary[phase] = {"references": reference_rows(units), "findings": findings(units)}
        if phase != "calibrate":
            summary[phase].update(verdicts=verdict_rows(units), beta=beta_rows(units), decision=decision_rows(units),
                                  scores=score_rows(units))
        atomic_write_text(folder / f"{phase}.csv", csv_text(unit_rows(units)))
    all_rows = [r for units in loaded.values() for r in unit_rows(units)]
    atomic_write_text(folder / "results.csv", csv_text(all_rows) if all_rows else "")
    plots = plot(loaded, folder)
    text = markdown(cfg, summary, seconds, workers)
    atomic_write_text(folder / "results.md", text + "\n")
    timing_path = folder / "timing.json"  # every invocation that trained something, appended
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else []
    if trained:
        timing.append({"phases": phases, "seconds": round(seconds, 1), "workers": workers, "runs_trained": trained})
        atomic_write_json(timing_path, timing)
    report = {"config": cfg.fingerprint(), "advise_constants": CALIBRATION, "summary": summary, "plots": plots,
              "timing": {"seconds": round(seconds, 1), "workers": workers}, "timings": timing,
              "units": {p: [{k: v for k, v in u.items()} for u in units] for p, units in loaded.items()}}
    atomic_write_json(folder / "results.json", json_safe(report))
    return {**report, "text": text}


# --- the text ---------------------------------------------------------------------------------------------------

def _ci(v, decimals: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, tuple) and len(v) == 2:
        return "—" if math.isnan(v[0]) else (f"{v[0]:+.{decimals}f}" if math.isnan(v[1]) else
                                              f"{v[0]:+.{decimals}f} ± {v[1]:.{decimals}f}")
    if isinstance(v, tuple):
        return "—" if math.isnan(v[0]) else f"{v[0]:.{decimals}f} [{v[1]:.{decimals}f}, {v[2]:.{decimals}f}]"
    return f"{v:.{decimals}f}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + ["| " + " | ".join(r) + " |" for r in rows]


TITLES = {"calibrate": "Calibration (references and seeds the thresholds are fixed on)",
          "heldout": "Held-out references and seeds (frozen rules)",
          "long": "Held-out task variant: long replies (frozen rules)"}


def markdown(cfg, summary: dict, seconds: float, workers: int) -> str:
    lines = [f"# refdpo demo --study advise{' (quick)' if cfg.quick else ''}", "",
             f"Seeds per phase: {cfg.seeds}. Beta grid {cfg.betas_dpo} for every reference, the self reference "
             f"included; {cfg.train_prompts} training prompts, {cfg.epochs} epochs, batch {cfg.batch_size}, lr "
             f"{cfg.max_lr:g}; true reward on {cfg.heldout_prompts} held-out prompts (T=1). Gains are paired with "
             "the self reference of the same seed; best-vs-best compares each one's best beta on that seed. "
             f"advise reads the {ADVISE_SPLIT} split's stored columns only.", ""]
    lines.append(f"advise's constants: {CALIBRATION} (refdpo/advise/rules.py).")
    lines.append(f"This invocation: {seconds:.0f} s with {workers} workers.")
    for phase, s in summary.items():
        lines += ["", f"## {TITLES[phase]}", ""]
        refs = s["references"]
        grid = [k[len("gain_at_"):] for k in refs[0] if k.startswith("gain_at_")]
        scores = sorted({k for r in refs for k in r if k.startswith("score_")})
        headers = ["reference", "strength", "best β", "r* at best", "best-vs-best gain", "helps (seeds)",
                   "KL at best", "length at best"] + [f"gain β={b}" for b in grid]
        headers += ["verdicts", "β_rec", "λ_rec"] + [k[len("score_"):] for k in scores]
        rows = []
        for r in refs:
            row = [r["reference"], _ci(r["strength"]), f"{r['best_beta']:g}", _ci(r["reward_at_best"]),
                   _ci(r["gain_bvb"]) if r["kind"] != "self" else "—", f"{r['helps_share']:.2f}",
                   _ci(r["kl_at_best"]), _ci(r["length_at_best"], 1)]
            row += [_ci(r.get(f"gain_at_{b}")) for b in grid]
            row += [r.get("verdicts", "—"), _ci(r.get("beta_rec"), 3), _ci(r.get("lam_rec"))]
            row += [_ci(r.get(k), 3) for k in scores]
            rows.append(row)
        lines += _table(headers, rows)
        if "verdicts" in s:
            lines += ["", "**Verdicts** (use/mix = predicts helps; helps = best-vs-best gain > 0 on that seed; "
                          "95% bootstrap interval over references):", ""]
            lines += _table(["rule", "units", "accuracy"],
                            [[v["rule"], str(v["n"]), _ci(v["accuracy"])] for v in s["verdicts"]])
            lines += ["", "**β** (recommendation snapped to the grid; fixed 0.01 is off the grid and snapped to "
                          f"{snap(0.01, _grid(cfg)):g}, as is the paper's 0.01 for self):", ""]
            lines += _table(["units", "rule", "n", "|log10 β_rec − log10 β_best|", "within one grid step", "regret in r*"],
                            [[b["units"], b["rule"], str(b["n"]), _ci(b["log10_error"]), _ci(b["within_one_step"]),
                              _ci(b["regret"])] for b in s["beta"]])
            lines += ["", "**The whole recommendation, trained**: regret in r* against the best of the candidate "
                          "and self on the seed. advise trains the candidate at its β (use) or self at β_self "
                          "(dont); the baselines train the candidate (as the paper did with a stronger reference) or self, at a "
                          "fixed β. Mix verdicts left out: "
                          f"{s['decision'][0]['left_out_mix']}.", ""]
            lines += _table(["rule", "n", "regret in r*"], [[d["rule"], str(d["n"]), _ci(d["regret"])]
                                                            for d in s["decision"]])
            lines += ["", "**Scores**: AUROC for helps; partial correlation with the best-vs-best gain given the "
                          "reference's strength (F4: a; models: mean r* of its own samples, a mixture interpolated):", ""]
            lines += _table(["score", "n", "AUROC", "partial corr (F4 | a)", "partial corr (models | strength)"],
                            [[r["score"], str(r["n"]), _ci(r["auroc"]), _ci(r["partial_f4"]), _ci(r["partial_models"])]
                             for r in s["scores"]])
        for f in s["findings"]:
            lines += ["", f"- **{f['claim']}**: {f['verdict']}. {f['evidence']}."]
    return "\n".join(lines)


def _grid(cfg) -> list[float]:
    from refdpo.testbed.demo import _betas

    return _betas(cfg.betas_dpo, "dpo")


def demo_advise_lines(cfg, res) -> list[str]:
    """The default demo's "advise vs measured" table: for its own references, advise's verdicts and beta (per
    seed, from the training split's columns) next to the measured best beta and best-vs-best gain over self
    (`res`: report.Results of the demo's runs)."""
    from refdpo.testbed.demo import seed_dir
    from refdpo.testbed.study import MODELS

    seeds = sorted(res.value[("sft", None)]["reward"])
    records = {s: read_jsonl(seed_dir(cfg, s) / "data" / f"{ADVISE_SPLIT}.jsonl") for s in seeds}
    rows = []
    answers = {name: [advise_one(records[s], MODELS[name]) for s in seeds] for name in ("compatible", "incompatible",
                                                                                         "prior")}
    self_best = ("dpo", res.best("dpo"))
    beta_self = [a["beta_self"] for a in answers["compatible"]]
    rows.append(["self", "—", f"{np.median(beta_self):.3g}", "—", f"{self_best[1]:g}", "—"])
    for name, advised in answers.items():
        best = (name, res.best(name))
        gain = res.paired(best, self_best)
        rows.append([name, "/".join(a["verdict"] for a in advised), f"{np.median([a['beta'] for a in advised]):.3g}",
                     f"{np.median([a['beta_whole'] for a in advised]):.3g}", f"{best[1]:g}", _ci(gain)])
    return ["", "## advise vs measured", "",
            f"`refdpo advise` on each seed's {ADVISE_SPLIT} columns, before any training, next to what the runs "
            "measured "
            "(best β: highest mean true reward on the grid; gain: best-vs-best over the self reference, paired "
            "by seed, 95% t-interval). Verdicts per seed; β: median over seeds, unsnapped (advise's β is β_self when "
            "it says don't; \"used whole\" is its rule's β for the reference at λ = 1).", ""] + _table(
        ["reference", "advise's verdicts", "advise's β", "advise's β, used whole", "measured best β",
         "measured best-vs-best gain"], rows)
