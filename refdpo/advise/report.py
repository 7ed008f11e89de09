"""`refdpo advise`'s report: bootstrap intervals over prompts, the table (printed, .md, .csv, .json) and plots.

Intervals are bootstrap 95% intervals: prompts are resampled with replacement (every pair of a drawn prompt
comes along) and `advise` is rerun on each resample, so β's spread comes from the same draws as the scores'.
Up to `size` prompts it is the percentile bootstrap. A larger split (60k pairs) draws `size` prompts at a time
(the m-out-of-n bootstrap, Bickel & Sakov 2008) and rescales: with d = θ*_m − θ̂, the interval is
θ̂ − sqrt(m/n)·[q97.5(d), q2.5(d)]; that keeps `advise` to seconds, and is valid for the scores here, which are
smooth functions of means, medians and ranks.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from refdpo.advise.rules import CALIBRATION, Advice, advise
from refdpo.advise.scores import Columns, Margins, margins
from refdpo.io import atomic_write_figure, atomic_write_json, atomic_write_text, json_safe
from refdpo.tables import csv_text, markdown

# (key, header, the scale it is on) of the scores the table shows; advise.json has every score.
SHOWN = (("ira", "IRA⊥", "nats"), ("snr", "SNR⊥", "nats"), ("signal", "signal share", "nats"), ("ira_byte", "IRA⊥/byte", "per byte"),
         ("snr_byte", "SNR⊥/byte", "per byte"), ("kappa", "κ_err", "sign"), ("rho", "ρ(δ0,δr)", "per byte"),
         ("kl_proxy", "K̂ (nats)", "nats"), ("nuisance", "ν", "nats"), ("length_coupling", "LC /100B", "nats"),
         ("hard_targets", "U(τ)", "per byte"), ("pessimistic", "P(Δr<0)", "nats"))


class Resampler:
    """Bootstrap draws of pair indices: `size` prompts with replacement, each with all its pairs."""

    def __init__(self, prompt_ids: np.ndarray | None, n: int, seed: int):
        groups = np.arange(n) if prompt_ids is None else prompt_ids
        self.order = np.argsort(groups, kind="stable")
        self.counts = np.bincount(groups)
        self.starts = np.r_[0, np.cumsum(self.counts)[:-1]]
        self.prompts = len(self.counts)
        self.rng = np.random.default_rng(seed)

    def draw(self, size: int) -> np.ndarray:
        drawn = self.rng.integers(0, self.prompts, size)
        if self.counts.max() == 1:
            return self.order[drawn]
        sizes = self.counts[drawn]
        offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return self.order[np.repeat(self.starts[drawn], sizes) + offsets]


def assess(c: Columns, resamples: int, seed: int, size: int = 2000, progress: bool = False) -> dict:
    """`advise` on the split and on `resamples` bootstrap draws (of `size` prompts when there are more: the
    module docstring): the advice, 95% intervals of every score and of β, and, for a full-size bootstrap, the
    share of draws that give the same verdict."""
    from refdpo.console import progress_bar

    point = advise(c)
    sampler = Resampler(c.prompt_ids, len(c), seed)
    prompts = sampler.prompts
    m = min(size, prompts)
    draws: list[Advice] = []
    for _ in progress_bar(range(resamples), desc="bootstrap", leave=False, disable=not progress or not resamples):
        draws.append(advise(c.take(sampler.draw(m))))
    scale = math.sqrt(m / prompts)
    intervals = {}
    if draws:
        for key in point.scores:
            intervals[key] = _interval(point.scores[key], np.array([d.scores[key] for d in draws]), scale)
        intervals["beta"] = _interval(point.beta, np.array([d.beta for d in draws]), scale)
    stable = float(np.mean([d.verdict == point.verdict for d in draws])) if draws and m == prompts else None
    return {"advice": point, "intervals": intervals, "verdict_agreement": stable, "bootstrap_prompts": m}


def _interval(estimate: float, values: np.ndarray, scale: float) -> tuple[float, float]:
    """Percentile interval (scale 1), else the rescaled m-out-of-n interval of the module docstring."""
    finite = values[np.isfinite(values)]
    if not len(finite) or not math.isfinite(estimate):
        return (float("nan"), float("nan"))
    low, high = np.percentile(finite, [2.5, 97.5])
    if scale == 1:
        return (float(low), float(high))
    return (float(estimate - scale * (high - estimate)), float(estimate - scale * (low - estimate)))


def _with_interval(value: float, interval: tuple[float, float] | None) -> str:
    text = f"{value:.3g}"
    return f"{text} [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else text


def rows_of(results: dict) -> list[dict]:
    """One row per reference: the recommendation, then the scores with their intervals."""
    rows = []
    for name, r in results.items():
        a, ci = r["advice"], r["intervals"]
        row = {"reference": name, "verdict": a.verdict if a.verdict != "mix" else f"mix λ {a.lam:.2f}",
               "beta": _with_interval(a.beta, ci.get("beta")),
               "beta_rules": f"[{a.beta_interval[0]:.3g}, {a.beta_interval[1]:.3g}]",
               "saturated": f"{a.saturated:.2f}",
               "verdict_agreement": "" if r["verdict_agreement"] is None else f"{r['verdict_agreement']:.2f}"}
        row.update({header: _with_interval(a.scores[key], ci.get(key)) for key, header, _ in SHOWN})
        rows.append(row)
    return rows


def write_report(results: dict, columns: dict[str, Columns], info: dict, grid: list[float], out: Path,
                 config: dict, run_jobs=None) -> dict:
    """advise.md/.csv/.json and three plots in `out`; returns the report (with `text`, what is printed).
    `run_jobs`: runs a list of (function, arguments) and returns their results in order (default: one by
    one; `refdpo advise` passes its process pool)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"reference": row["reference"], "pairs": len(columns[row["reference"]]), **row}
            for row in rows_of(results)]
    first = next(iter(results.values()))["advice"]
    lines = [f"# refdpo advise: {info['source']} ({info['pairs']} pairs, {info['prompts']} prompts)", "",
             f"Self reference: columns {','.join(info['self_columns'])}. β_self {first.beta_self:.3g} (length rule "
             + (f"{first.beta_self_len:.3g}" if first.beta_self_len else "skipped: no --tokenizer or --policy")
             + f", flip rule {first.beta_self_flip:.3g}). Constants: {CALIBRATION}.", "",
             markdown(rows), "", "Why:"]
    for name, r in results.items():
        lines += [f"- **{name}**: " + "; ".join(r["advice"].reasons)]
    lines += ["", "Brackets: bootstrap 95% intervals over prompts; verdict_agreement: the share of bootstrap draws "
              "with the same verdict; saturated: the share of pairs with β·|λA| ≥ 2 at the recommended β "
              "(the hinge regime)."]
    text = "\n".join(lines)
    atomic_write_text(out / "advise.md", text + "\n")
    atomic_write_text(out / "advise.csv", csv_text(rows))
    report = {"data": info, "config": config, "calibration": CALIBRATION,
              "references": {name: {"verdict": r["advice"].verdict, "beta": r["advice"].beta,
                                    "lam": r["advice"].lam, "beta_rules": list(r["advice"].beta_interval),
                                    "beta_self": r["advice"].beta_self, "beta_self_len": r["advice"].beta_self_len,
                                    "beta_self_flip": r["advice"].beta_self_flip,
                                    "saturated": r["advice"].saturated, "reasons": r["advice"].reasons,
                                    "scores": r["advice"].scores, "intervals": r["intervals"],
                                    "verdict_agreement": r["verdict_agreement"]}
                             for name, r in results.items()}}
    atomic_write_json(out / "advise.json", json_safe(report))
    jobs = plot_jobs(results, columns, grid, out)
    report["plots"] = run_jobs(jobs) if run_jobs else [function(*args) for function, args in jobs]
    report["text"] = text
    return report


PLOTTED = 20_000  # pairs drawn in the scatter plots (hexbins look the same; 60k take seconds)


def _subsample(m: Margins, n: int) -> Margins:
    if len(m.advantage) <= n:
        return m
    pick = np.random.default_rng(0).choice(len(m.advantage), n, replace=False)
    return Margins(*(getattr(m, f.name)[pick] for f in dataclasses.fields(Margins)))


def _save(fig, path: Path) -> str:
    """Write a figure (atomically) and close it; returns the file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=110)
    plt.close(fig)
    return path.name


def _figure(columns: int, width: float = 4.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(min(width * columns, 16), 3.8), squeeze=False)


def plot_margins(results: dict, columns: dict[str, Columns], out: Path) -> str:
    """advise_margins.png: per reference, its margin against the policy's (A = 0 on the diagonal)."""
    fig, axes = _figure(len(results))
    for ax, name in zip(axes[0], results):
        m = _subsample(margins(columns[name]), PLOTTED)
        ax.hexbin(m.delta_self, m.delta_ref, gridsize=40, bins="log", cmap="viridis", mincnt=1)
        low, high = np.percentile(np.r_[m.delta_self, m.delta_ref], [0.5, 99.5])
        ax.plot([low, high], [low, high], color="red", lw=1, label="Δr = Δ0 (A = 0)")
        ax.set(title=f"{name}: {results[name]['advice'].verdict}", xlabel="policy margin Δ0 (nats)",
               ylabel="reference margin Δr (nats)", xlim=(low, high), ylim=(low, high))
        ax.legend(loc="upper left", fontsize=7)
    return _save(fig, out / "advise_margins.png")


def plot_advantage_length(results: dict, columns: dict[str, Columns], out: Path) -> str:
    """advise_advantage_length.png: per reference, A against the length difference, with its OLS line."""
    fig, axes = _figure(len(results))
    for ax, name in zip(axes[0], results):
        m = _subsample(margins(columns[name]), PLOTTED)
        ax.hexbin(m.length_diff, m.advantage, gridsize=40, bins="log", cmap="magma", mincnt=1)
        slope = results[name]["advice"].scores["length_coupling"] / 100
        xs = np.percentile(m.length_diff, [1, 99])
        ax.plot(xs, np.mean(m.advantage) + slope * (xs - np.mean(m.length_diff)), color="cyan", lw=1.2,
                label=f"OLS slope {slope * 100:+.2f} nats/100 B")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=name, xlabel="length difference B_w − B_l (bytes)", ylabel="reference advantage A (nats)")
        ax.legend(loc="upper left", fontsize=7)
    return _save(fig, out / "advise_advantage_length.png")


def plot_beta(results: dict, columns: dict[str, Columns], grid: list[float], out: Path) -> str:
    """advise_beta.png: the saturated share S(β) over the grid per reference (at its λ; a "don't" at λ = 1, what
    using it would do), the recommendation dashed and the rules' interval shaded."""
    fig, axes = _figure(1, width=6.4)
    ax = axes[0][0]
    betas = np.geomspace(grid[0], grid[-1], 60)
    for name in results:
        a = results[name]["advice"]
        advantage = margins(columns[name]).advantage * (a.lam if a.verdict != "dont" else 1.0)
        curve = [float(np.mean(b * np.abs(advantage) >= 2)) for b in betas]
        line, = ax.plot(betas, curve, label=f"{name}: {a.verdict}, β {a.beta:.3g}")
        ax.axvline(a.beta, color=line.get_color(), ls="--", lw=1)
        ax.axvspan(*a.beta_interval, color=line.get_color(), alpha=0.08)
    for b in grid:
        ax.axvline(b, color="grey", lw=0.4, alpha=0.5)
    ax.set(xscale="log", xlabel="β (grid lines grey; recommendation dashed, rule interval shaded)",
           ylabel="saturated pairs S(β) = P(β|λA| ≥ 2)", ylim=(-0.02, 1.02),
           title="where each reference's targets saturate")
    ax.legend(fontsize=7)
    return _save(fig, out / "advise_beta.png")


def plot_jobs(results: dict, columns: dict[str, Columns], grid: list[float], out: Path) -> list[tuple]:
    """The three plots as independent (function, arguments) jobs: a caller may draw them in parallel."""
    return [(plot_margins, (results, columns, out)), (plot_advantage_length, (results, columns, out)),
            (plot_beta, (results, columns, grid, out))]
