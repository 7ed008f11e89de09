"""Fitting `refdpo advise`'s constants on the study's calibration phase, so they can be frozen before the held-out
phase is looked at (pre-registration: refdpo/advise/rules.py's FROZEN is set from what this prints).

Four steps, each a grid search on the calibration units only (every (candidate, seed) and every self run),
in this order, each ties broken toward the proposal's value (`rules.Constants()`):

1. B1's scale: κ_len and κ_flip times s, s in {1/8 ... 8}, minimising the mean |log10 β_self − log10 β_best|
   of the self runs (β_self snapped to the grid, as a user would pick a grid point).
2. The gate: gate_snr x gate_kappa, maximising verdict accuracy (use/mix ⟺ the candidate's best-vs-best gain
   over self is > 0).
3. use vs mix: use_lambda, maximising the accuracy of "use" ⟺ helps among the candidates the gate passes (a
   mixture is the hedge for a reference that passes but is not trusted whole; no calibration run trains one
   at λ*, so this is all the calibration can say about it).
4. B2: κ_b x M_min, minimising the mean |log10 β_ref − log10 β_best| of the candidates, β_ref with λ = 1 (the
   candidate used whole, whatever the verdict: the β a user who trains with it gets).

  python -m refdpo.testbed.calibrate --out runs/advise-study   # after `refdpo demo --study advise --phase calibrate`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from refdpo.advise.rules import Constants, advise, beta_reference, beta_self
from refdpo.advise.scores import margins
from refdpo.testbed.study_eval import snap

SCALES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
GATE_SNR = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5)
GATE_KAPPA = (-1.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
KAPPA_BUDGET = (0.25, 0.5, 1.0, 2.0, 4.0)
MIN_SLACK = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
USE_LAMBDA = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def log_error(beta: float, unit: dict) -> float:
    return abs(math.log10(snap(beta, unit["grid"])) - math.log10(unit["best_beta"]))


def _closeness(k: Constants) -> float:
    """How far k is from the proposal's constants (the tie-break: nearer wins)."""
    base = Constants()
    return sum(abs(math.log(getattr(k, f) / getattr(base, f))) if getattr(base, f) > 0 and getattr(k, f) > 0
               else abs(getattr(k, f) - getattr(base, f)) for f in ("kappa_len", "kappa_budget", "min_slack",
                                                                    "gate_snr", "gate_kappa"))


def fit(candidates: list[tuple[dict, object]], selves: list[tuple[dict, object]]) -> tuple[Constants, dict]:
    """The constants (steps 1-3 of the module docstring) and the calibration figures they reach.
    candidates/selves: (study unit, advise Columns of that unit's candidate; for self any candidate of the seed)."""
    base = Constants()

    def b1_error(k: Constants) -> float:
        return float(np.mean([log_error(beta_self(c, None, k)[0], u) for u, c in selves]))

    scaled = [dataclasses.replace(base, kappa_len=base.kappa_len * s, kappa_flip=base.kappa_flip * s)
              for s in SCALES]
    k = min(scaled, key=lambda k: (round(b1_error(k), 9), _closeness(k)))

    def accuracy(k: Constants) -> float:
        return float(np.mean([(advise(c, k).verdict != "dont") == (u["gain_bvb"] > 0) for u, c in candidates]))

    gates = [dataclasses.replace(k, gate_snr=s, gate_kappa=g) for s in GATE_SNR for g in GATE_KAPPA]
    k = min(gates, key=lambda k: (-round(accuracy(k), 9), _closeness(k)))

    def use_accuracy(k: Constants) -> float:
        advised = [(advise(c, k).verdict, u) for u, c in candidates]
        passed = [(v == "use") == (u["gain_bvb"] > 0) for v, u in advised if v != "dont"]
        return float(np.mean(passed)) if passed else 0.0

    k = min((dataclasses.replace(k, use_lambda=x) for x in USE_LAMBDA),
            key=lambda k: (-round(use_accuracy(k), 9), abs(k.use_lambda - base.use_lambda)))

    def b2_error(k: Constants) -> float:
        return float(np.mean([log_error(beta_reference(margins(c).advantage, 1.0, beta_self(c, None, k)[0], k), u)
                              for u, c in candidates]))

    budgets = [dataclasses.replace(k, kappa_budget=b, min_slack=m) for b in KAPPA_BUDGET for m in MIN_SLACK]
    k = min(budgets, key=lambda k: (round(b2_error(k), 9), _closeness(k)))
    figures = {"self_log10_error": b1_error(k), "verdict_accuracy": accuracy(k), "use_accuracy": use_accuracy(k),
               "beta_log10_error": b2_error(k),
               "proposal": {"self_log10_error": b1_error(base), "verdict_accuracy": accuracy(base),
                            "use_accuracy": use_accuracy(base), "beta_log10_error": b2_error(base)},
               "candidates": len(candidates), "self_runs": len(selves)}
    return k, figures


def calibration_units(out: str) -> tuple[list, list]:
    """(candidates, selves) of a finished calibration phase in study folder `out`."""
    from refdpo.io import read_jsonl
    from refdpo.testbed.demo import DemoConfig, seed_dir
    from refdpo.testbed.study import ADVISE_SPLIT, advise_columns, phase_references
    from refdpo.testbed.study_eval import load_phase

    cfg = DemoConfig(**json.loads(Path(out, "demo.json").read_text()), out=out)  # the study's own settings
    units = load_phase(cfg, "calibrate")
    if units is None:
        raise SystemExit(f"{out}: the calibration phase is not finished")
    refs = {r.name: r for r in phase_references(cfg, "calibrate")}
    candidates, selves, records = [], [], {}
    for u in units:
        if u["seed"] not in records:
            records[u["seed"]] = read_jsonl(seed_dir(cfg, u["seed"]) / "data" / f"{ADVISE_SPLIT}.jsonl")
        if u["kind"] == "self":
            selves.append((u, advise_columns(records[u["seed"]], next(iter(refs.values())))))
        else:
            candidates.append((u, advise_columns(records[u["seed"]], refs[u["reference"]])))
    return candidates, selves


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/advise-study", help="the study folder")
    args = p.parse_args(argv)
    constants, figures = fit(*calibration_units(args.out))
    result = {"constants": dataclasses.asdict(constants), "figures": figures}
    Path(args.out, "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("FROZEN = " + repr(constants))


if __name__ == "__main__":
    main()
