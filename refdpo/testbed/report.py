"""The demo's report: per-seed measurements -> means with 95% intervals over seeds, the paper's findings
checked one by one (reproduced or not, with paired intervals), a table, CSV/JSON and plots.

Intervals are Student-t over seeds: mean +- t(0.975, n-1) x sd / sqrt(n). Comparisons between two settings
are paired by seed (they share the seed's SFT model, data and sampling seed), which removes the seed-to-seed
variation of the SFT model from the difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from refdpo.io import atomic_write_figure, atomic_write_json, atomic_write_text, read_jsonl
from refdpo.tables import csv_text
from refdpo.testbed.task import FAMILIES, REFERENCES

# t(0.975, df) for df = 1..30; beyond, the normal quantile is within 2%.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
        2.042)
METRICS = {  # key -> (table header, decimals, shown with its interval)
    "reward": ("true reward", 2, True),
    "reward_greedy": ("greedy reward", 2, False),
    "win_rate": ("win rate vs SFT", 2, True),
    "kl": ("KL to SFT", 2, True),
    "length": ("length", 1, True),
    "length_greedy": ("greedy length", 1, False),
    "unended": ("no EOS", 3, False),
    "eos_chosen": ("log p(EOS | y_w)", 2, False),
    "eos_gap": ("EOS gap y_w - y_l", 2, False),
    "reward_accuracy": ("reward acc.", 3, False),
    "policy_accuracy": ("policy acc.", 3, False),
}
BASELINES = {"sft": "SFT model (the self reference)", "compatible_ref": "compatible reference, alone",
             "incompatible_ref": "incompatible reference, alone"}


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); the half-width is nan for a single value."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return float(values.mean()), math.nan
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return float(values.mean()), float(t * values.std(ddof=1) / math.sqrt(n))


def _fmt(mean: float | None, half: float | None = None, decimals: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    text = f"{mean:.{decimals}f}"
    return text if half is None or math.isnan(half) else f"{text} ± {half:.{decimals}f}"


class Results:
    """Per-seed values of every metric of every setting: `value[(family, beta)][metric] = {seed: x}`."""

    def __init__(self, prepared: dict, runs: list[dict]):
        self.value: dict[tuple, dict[str, dict[int, float]]] = {}
        for seed, info in prepared.items():
            for name, metrics in info["baselines"].items():
                self._add((name, None), int(seed), metrics)
        for run in runs:
            self._add((run["family"], run["beta"]), run["seed"], run)

    def _add(self, key: tuple, seed: int, metrics: dict) -> None:
        slot = self.value.setdefault(key, {})
        for metric in METRICS:
            if metrics.get(metric) is not None:
                slot.setdefault(metric, {})[seed] = float(metrics[metric])

    def mean(self, key: tuple, metric: str = "reward") -> float:
        return interval(list(self.value[key][metric].values()))[0]

    def betas(self, family: str) -> list[float]:
        return sorted((b for f, b in self.value if f == family), reverse=True)

    def best(self, family: str) -> float:
        """The beta with the highest mean true reward (ties: the larger beta)."""
        return max(self.betas(family), key=lambda b: self.mean((family, b)))

    def paired(self, a: tuple, b: tuple, metric: str = "reward") -> tuple[float, float]:
        """Mean and 95% interval of a - b over the seeds both have."""
        x, y = self.value[a][metric], self.value[b][metric]
        return interval([x[s] - y[s] for s in sorted(set(x) & set(y))])


def _diff(d: tuple[float, float]) -> str:
    return f"{d[0]:+.2f} ± {d[1]:.2f}"


def _significant(d: tuple[float, float]) -> int:
    """+1 / -1 when the interval excludes 0 on that side, else 0."""
    mean, half = d
    return 0 if math.isnan(half) or abs(mean) <= half else (1 if mean > 0 else -1)


def findings(res: Results) -> list[dict]:
    """The paper's claims, each checked on these runs: {question, claim, verdict, evidence}."""
    sft, out = ("sft", None), []
    dpo = [("dpo", b) for b in res.betas("dpo")]
    best = ("dpo", res.best("dpo"))

    gains = {b: res.paired(("dpo", b), sft) for _, b in dpo}
    significant = [f"{b:g}" for b, d in gains.items() if _significant(d) > 0]
    out.append({"question": "RQ1", "claim": "DPO improves on the SFT model at some beta",
                "verdict": "reproduced" if _significant(gains[best[1]]) > 0 else "not reproduced",
                "evidence": f"best beta {best[1]:g}: true reward {_fmt(*interval(list(res.value[best]['reward'].values())))}"
                            f" vs SFT {_fmt(*interval(list(res.value[sft]['reward'].values())))}, paired gain "
                            f"{_diff(gains[best[1]])}; significant gains at beta in {{{', '.join(significant) or 'none'}}}"})

    small, large = dpo[-1], dpo[0]
    drop = res.paired(small, best)
    interior = best not in (small, large)
    more = {m: res.mean(small, m) - res.mean(best, m) for m in ("kl", "length", "length_greedy")}
    ok = interior and _significant(drop) < 0 and more["kl"] > 0 and more["length"] > 0
    out.append({"question": "RQ1", "claim": "true reward is non-monotone in beta: too small a beta raises KL and "
                                            "length and loses reward",
                "verdict": "reproduced" if ok else ("partly reproduced" if _significant(drop) < 0 else "not reproduced"),
                "evidence": f"optimum at beta {best[1]:g} ({'interior' if interior else 'an end'} of the grid); at "
                            f"beta {small[1]:g} true reward {_diff(drop)} vs the optimum, KL {more['kl']:+.2f} nats, "
                            f"length {more['length']:+.1f} (greedy {more['length_greedy']:+.1f}) words; at beta "
                            f"{large[1]:g}: {_diff(res.paired(large, best))}"})

    accuracy_best = max(res.betas("dpo"), key=lambda b: res.mean(("dpo", b), "reward_accuracy"))
    out.append({"question": "RQ1", "claim": "ranking accuracy is not generation quality (observation)",
                "verdict": "observed" if accuracy_best != best[1] else "not observed",
                "evidence": f"reward accuracy peaks at beta {accuracy_best:g} "
                            f"({res.mean(('dpo', accuracy_best), 'reward_accuracy'):.3f}), true reward at beta "
                            f"{best[1]:g}; policy accuracy {res.mean(large, 'policy_accuracy'):.3f} at beta "
                            f"{large[1]:g} -> {res.mean(small, 'policy_accuracy'):.3f} at beta {small[1]:g}"})

    eos = res.paired(small, large, "eos_chosen")
    out.append({"question": "RQ1", "claim": "a smaller beta pushes the end-of-sequence token down more",
                "verdict": "reproduced" if _significant(eos) < 0 else "not reproduced",
                "evidence": f"log p(EOS) after held-out chosen replies {res.mean(large, 'eos_chosen'):.2f} at beta "
                            f"{large[1]:g} -> {res.mean(small, 'eos_chosen'):.2f} at beta {small[1]:g} (paired "
                            f"{_diff(eos)}); EOS gap chosen - rejected {res.mean(large, 'eos_gap'):+.2f} -> "
                            f"{res.mean(small, 'eos_gap'):+.2f}"})

    bests = {f: (f, res.best(f)) for f in ("dpo", "ref_free", "prior")}
    order = sorted(bests, key=lambda f: -res.mean(bests[f]))
    behind = {f: res.paired(bests[f], best) for f in ("ref_free", "prior")}
    over_sft = {f: res.paired(bests[f], sft) for f in bests}
    names = {"dpo": "DPO", "ref_free": "reference-free", "prior": "prior-as-reference"}
    verdict = ("reproduced" if all(_significant(d) < 0 for d in behind.values()) else
               "partly reproduced" if order[0] == "dpo" else "not reproduced")
    out.append({"question": "RQ2", "claim": "DPO with the SFT reference beats reference-free and prior-as-reference "
                                            "training, each at its best beta",
                "verdict": verdict,
                "evidence": " > ".join(f"{names[f]} (beta {bests[f][1]:g}) {res.mean(bests[f]):.2f}" for f in order)
                            + "; vs DPO: " + ", ".join(f"{names[f]} {_diff(d)}" for f, d in behind.items())
                            + "; vs SFT: " + ", ".join(f"{names[f]} {_diff(d)}" for f, d in over_sft.items())
                            + "; length at the best beta: " + ", ".join(f"{names[f]} {res.mean(bests[f], 'length'):.1f}"
                                                                        for f in order)})

    free = bests["ref_free"][1]
    evidence = (f"best beta: reference-free {free:g}, DPO {best[1]:g}; reference-free true reward over its grid: "
                + ", ".join(f"{b:g}: {res.mean(('ref_free', b)):.2f}" for b in res.betas("ref_free")))
    common = set(res.betas("dpo")) & set(res.betas("ref_free")) & set(res.betas("prior"))
    if common:  # where beta x h is small, sigma(-beta h) ~ 1/2 for every pair and Adam removes beta's scale
        tiny = min(common)
        evidence += (f"; at beta {tiny:g}, where sigma(-beta h) ~ 1/2 for every pair and the reference barely "
                     "enters the update: " + ", ".join(f"{names[f]} {res.mean((f, tiny)):.2f}" for f in bests))
    out.append({"question": "RQ2", "claim": "reference-free training needs a larger beta than DPO",
                "verdict": "reproduced" if free > best[1] else "not reproduced", "evidence": evidence})

    ref_betas = res.betas("compatible")
    at_beta = {b: res.paired(("compatible", b), ("dpo", b)) for b in ref_betas}
    compat = ("compatible", res.best("compatible"))
    best_vs_best = res.paired(compat, best)
    wins = [f"{b:g}" for b, d in at_beta.items() if _significant(d) > 0]
    out.append({"question": "RQ3", "claim": "a stronger compatible reference beats self-reference (the paper: at a "
                                            "larger beta)",
                "verdict": "reproduced" if _significant(best_vs_best) > 0 else
                           ("partly reproduced" if wins or best_vs_best[0] > 0 else "not reproduced"),
                "evidence": f"best vs best: compatible (beta {compat[1]:g}) {res.mean(compat):.2f} vs self (beta "
                            f"{best[1]:g}) {res.mean(best):.2f}, {_diff(best_vs_best)}; at equal beta: "
                            + ", ".join(f"{b:g}: {_diff(d)}" for b, d in at_beta.items())
                            + f"; significantly better at beta in {{{', '.join(wins) or 'none'}}}"})

    other = ("incompatible", res.best("incompatible"))
    vs_self, vs_sft = res.paired(other, best), res.paired(other, sft)
    alone = res.paired(("incompatible_ref", None), sft)
    out.append({"question": "RQ3", "claim": "a stronger but incompatible reference does not help (the paper: "
                                            "tulu-2-7b with mistral-v0.2 stayed below its SFT model)",
                "verdict": "reproduced" if _significant(vs_self) < 0 else
                           ("not reproduced" if _significant(vs_self) > 0 else "inconclusive"),
                "evidence": f"the reference alone beats SFT by {_diff(alone)}; DPO with it at its best beta "
                            f"{other[1]:g}: {res.mean(other):.2f}, vs self-reference {_diff(vs_self)}, vs SFT "
                            f"{_diff(vs_sft)}"})
    return out


def _label(key: tuple) -> str:
    family, beta = key
    return BASELINES[family] if beta is None else FAMILIES[family][0]


def rows(res: Results) -> list[dict]:
    """One row per setting: baselines first, then each family by decreasing beta; mean and interval of each metric."""
    keys = [(b, None) for b in BASELINES] + [(f, b) for f in FAMILIES for b in res.betas(f)]
    out = []
    for key in keys:
        row = {"setting": _label(key), "family": key[0], "beta": key[1]}
        for metric in METRICS:
            values = res.value[key].get(metric)
            mean, half = interval(list(values.values())) if values else (None, None)
            row[metric], row[f"{metric}_ci95"] = mean, half
        row["seeds"] = len(res.value[key]["reward"])
        out.append(row)
    return out


def table(table_rows: list[dict]) -> str:
    headers = ["setting", "beta"] + [h for h, _, _ in METRICS.values()]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in table_rows:
        cells = [row["setting"], "—" if row["beta"] is None else f"{row['beta']:g}"]
        cells += [_fmt(row[m], row[f"{m}_ci95"] if shown else None, d) for m, (_, d, shown) in METRICS.items()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def references_table(prepared: dict) -> str:
    columns = {"ranking_accuracy": ("ranks held-out pairs like the labels", 3),
               "agrees_with_true_reward": ("agrees with r* on held-out pairs", 3),
               "mean_abs_margin": ("mean \\|margin\\| on training pairs, nats", 1),
               "start_margin_length_corr": ("corr(h at step 0, chosen length - rejected length)", 2)}
    lines = ["| reference | " + " | ".join(h for h, _ in columns.values()) + " |", "|---|" + "---|" * len(columns)]
    for name in REFERENCES:
        cells = []
        for key, (_, decimals) in columns.items():
            values = [info["references"][name][key] for info in prepared.values()]
            cells.append("—" if None in values else _fmt(*interval(values), decimals))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Families at one beta sit side by side, not on top of each other: each is shifted by a few percent of a decade.
_DODGE = 10 ** np.linspace(-0.04, 0.04, len(FAMILIES))
_NON_NEGATIVE = ("length",)  # metrics whose interval is cut at 0 (a length is never negative)


def plot(res: Results, folder: Path) -> list[str]:
    """reward_vs_beta.png, reward_vs_kl.png, length_vs_beta.png, eos_vs_beta.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def errorbars(ax, family_stats: dict, floor: float | None = None) -> None:
        for dodge, (family, stats) in zip(_DODGE, family_stats.items()):
            means = np.array([m for m, _ in stats])
            half = np.array([0 if math.isnan(h) else h for _, h in stats])
            lower = half if floor is None else np.minimum(half, means - floor)
            ax.errorbar(np.array(res.betas(family)) * dodge, means, yerr=[lower, half], marker="o", capsize=3,
                        label=FAMILIES[family][0])

    def by_beta(ax, metric: str, ylabel: str) -> None:
        errorbars(ax, {family: [interval(list(res.value[(family, b)][metric].values())) for b in res.betas(family)]
                       for family in FAMILIES}, 0.0 if metric in _NON_NEGATIVE else None)
        sft_mean, sft_half = interval(list(res.value[("sft", None)][metric].values()))
        ax.axhline(sft_mean, color="black", linestyle="--", label="SFT model")
        if not math.isnan(sft_half):
            ax.axhspan(sft_mean - sft_half, sft_mean + sft_half, color="black", alpha=0.08,
                       label="SFT model, 95% CI")
        ax.set_xscale("log")
        ax.set_xlabel("beta (KL strength; families shifted apart at each beta)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)

    def save(fig, ax, name: str, title: str, entries=None) -> str:
        """`entries`: the axes whose legend entries to show (default `ax`'s), beside `ax`, off the data."""
        handles, labels = (entries or ax).get_legend_handles_labels()
        ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        atomic_write_figure(fig, folder / f"{name}.png", dpi=120)
        plt.close(fig)
        return f"{name}.png"

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8))
    by_beta(left, "reward", "true reward r* (T=1 samples, 95% CI over seeds)")
    left.set_title("true reward", fontsize=10)
    # The same, paired with the seed's SFT model: a tighter interval.
    errorbars(right, {family: [res.paired((family, b), ("sft", None)) for b in res.betas(family)]
                      for family in FAMILIES})
    right.axhline(0, color="black", linestyle="--", label="SFT model")
    right.set(xscale="log", xlabel="beta (KL strength; families shifted apart at each beta)",
              ylabel="true reward minus the SFT model's (paired by seed)")
    right.set_title("gain over the SFT model, paired by seed", fontsize=10)
    right.grid(alpha=0.3)
    written = [save(fig, right, "reward_vs_beta", "True reward against beta, by reference (mean and 95% CI over "
                                                  "seeds)", entries=left)]
    for name, metric, ylabel, title in (
            ("length_vs_beta", "length", "mean reply length, words (T=1)", "Reply length against beta"),
            ("eos_vs_beta", "eos_chosen", "log p(EOS) after held-out chosen replies",
             "Probability of ending after a chosen reply, against beta")):
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        by_beta(ax, metric, ylabel)
        written.append(save(fig, ax, name, title))

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for family, (label, _) in FAMILIES.items():
        betas = res.betas(family)
        kl = [res.mean((family, b), "kl") for b in betas]
        reward = [res.mean((family, b)) for b in betas]
        ax.plot(kl, reward, marker="o", label=label)
        for x, y, b in zip(kl, reward, betas):
            ax.annotate(f"{b:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(res.mean(("sft", None)), color="black", linestyle="--", label="SFT model (KL 0)")
    ax.set_xlabel("KL(policy || SFT), sampled estimate, nats")
    ax.set_ylabel("true reward r*")
    ax.grid(alpha=0.3)
    return written + [save(fig, ax, "reward_vs_kl", "True reward against KL to the SFT model (labels: beta)")]


def markdown_report(cfg, table_rows: list[dict], found: list[dict], prepared: dict) -> str:
    lines = [f"# refdpo demo: {cfg.seeds} seeds{' (quick)' if cfg.quick else ''}", "",
             "Means over seeds ± 95% t-interval. True reward r* is measured on replies sampled at T=1 from each "
             "policy on held-out prompts; win rate is against the SFT model's reply to the same prompt (ties "
             "0.5); KL is the sampled sequence-level estimate; lengths are in words; log p(EOS) is after held-out "
             "chosen replies; accuracies are on held-out pairs (ties 0.5).", "", table(table_rows), "",
             "## Findings (the paper's claims, checked on these runs)", ""]
    for f in found:
        lines.append(f"- **{f['question']}: {f['claim']}**: {f['verdict']}. {f['evidence']}.")
    lines += ["", "## References on the held-out pairs", "", references_table(prepared), ""]
    return "\n".join(lines)


def write_report(cfg, prepared: dict, runs: list[dict], seconds: float, workers: int) -> dict:
    """results.md/.csv/.json and the plots in the demo folder; returns the report (rows, findings, text)."""
    folder = Path(cfg.out)
    runs = sorted(runs, key=lambda r: (r["seed"], r["family"], -r["beta"]))
    res = Results(prepared, runs)
    table_rows, found = rows(res), findings(res)
    from refdpo.testbed.study_report import demo_advise_lines

    text = "\n".join([markdown_report(cfg, table_rows, found, prepared), *demo_advise_lines(cfg, res)])
    atomic_write_text(folder / "results.csv", csv_text(table_rows))
    atomic_write_text(folder / "results.md", text + "\n")
    plots = plot(res, folder)
    report = {"config": cfg.fingerprint(), "rows": table_rows, "findings": found, "plots": plots,
              "per_seed": {"prepared": {str(s): {k: v for k, v in info.items() if k != "sft_rewards"}
                                        for s, info in sorted(prepared.items())}, "runs": runs},
              "timing": {"seconds": round(seconds, 1), "workers": workers}}
    atomic_write_json(folder / "results.json", report)
    return {**report, "text": text}


# --- how each reference sees the pairs (written by the demo's preparation of a seed) -------------------

def _margins(records: list[dict], columns: str) -> np.ndarray:
    chosen, rejected = columns.split(",")
    return np.array([r[chosen] - r[rejected] for r in records])


def reference_agreement(data: Path, references: dict = REFERENCES) -> dict:
    """How each reference sees the pairs. On the held-out pairs: how often it gives the chosen reply more
    probability (its ranking accuracy against the labels) and how often its margin's sign agrees with r*. On the
    training pairs: its mean |margin|, and how the DPO margin h at the first step (the SFT model's margin minus
    the reference's) correlates with how much longer the chosen reply is. The loss weights a pair by
    sigma(-beta h), so a positive correlation means training learns mostly from pairs whose chosen reply is the
    shorter one."""
    val = read_jsonl(data / "val.jsonl")
    train = read_jsonl(data / "train.jsonl")
    truth = np.sign([r["chosen_true_reward"] - r["rejected_true_reward"] for r in val])
    longer = np.array([len(r["chosen"][-1]["content"].split()) - len(r["rejected"][-1]["content"].split())
                       for r in train])
    self_margin = _margins(train, REFERENCES["self"][1])
    out = {}
    for name, (_, columns, _) in references.items():
        margin, train_margin = _margins(val, columns), _margins(train, columns)
        start = self_margin - train_margin
        out[name] = {"ranking_accuracy": float(np.mean(margin > 0) + 0.5 * np.mean(margin == 0)),
                     "agrees_with_true_reward": float(np.mean(np.sign(margin)[truth != 0] == truth[truth != 0])),
                     "mean_abs_margin": float(np.abs(train_margin).mean()),
                     "start_margin_length_corr": None if name == "self" else float(np.corrcoef(start, longer)[0, 1])}
    return out
