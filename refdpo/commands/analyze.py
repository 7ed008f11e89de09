"""`refdpo analyze tokens`: the paper's token-level analysis (Liu et al. §4.3 and §5, Figs. 1-3).

For every response token of a split (chosen and rejected, teacher-forced), the per-position log-prob
difference of Eq. 8, log p_theta(y_i | x, y_<i) - log p_ref(y_i | x, y_<i), is averaged per vocabulary token.
  Fig. 1  token_histogram.png: the distribution of those per-token averages (fraction of token types per bin,
          log-scale y), one curve per policy;
  Fig. 2  top_tokens.png: the k most down-weighted tokens among those seen at least `min_count` times, ranked
          by their mean difference over the policies, one bar per policy;
  Fig. 3  eos.png: the end token (the last response token, EOS or end-of-turn; sequences cut by max_len are
          left out): "value", its mean log-prob under each policy, and "difference", the mean over pairs of
          its log-prob after the chosen minus after the rejected response.
Every number plotted is also written: tokens.csv, histogram.csv, top_tokens.csv, eos.csv and analysis.json.
The reference and the policies must share a tokenizer (the differences are per token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from refdpo.checkpoint import model_name, model_path
from refdpo.config import DataSpec, ModelSpec, check_all, option
from refdpo.core.logprobs import TokenLogprobs, token_logprobs
from refdpo.data import PairData, load_pairs
from refdpo.data.templates import check_template
from refdpo.errors import ConfigError
from refdpo.io import atomic_write_figure
from refdpo.modeling import default_device, load_frozen, pad_token_id
from refdpo.provenance import tokenizer_fingerprint
from refdpo.tables import write_tables
from refdpo.tokenization import load_tokenizer


@dataclass
class AnalyzeConfig(DataSpec, ModelSpec):
    REQUIRED: ClassVar = {"reference": "--reference is required"}

    reference: str = option("", "the reference (SFT) model the policies are compared with")
    split: str = option("val", "split name, or a path to its file")
    out: str = option("analysis", "folder for the plots and tables")
    min_count: int = option(100, "Fig. 2 ranks tokens seen at least this many times")
    top_k: int = option(10, "tokens in Fig. 2")
    bins: int = option(60, "histogram bins (Fig. 1)")
    max_pairs: int = option(0, "use only the first N pairs (0: all)")
    batch_size: int = option(8, "pairs per forward pass")

    def validate(self) -> AnalyzeConfig:
        check_all(self.spec_checks() + [
            (min(self.min_count, self.top_k, self.bins, self.batch_size) >= 1,
             "--min_count, --top_k, --bins and --batch_size must be >= 1"),
        ])
        return self






def per_token_means(diff: np.ndarray, targets: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean difference, count) per vocabulary token (NaN where a token never occurs)."""
    counts = np.bincount(targets, minlength=vocab)
    sums = np.bincount(targets, weights=diff, minlength=vocab)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def analyze_tokens(policies: dict[str, torch.nn.Module], reference: torch.nn.Module, data: PairData,
                   tokenizer, pad_id: int, min_count: int = 100, top_k: int = 10, bins: int = 60,
                   batch_size: int = 8) -> dict:
    """Figs. 1-3 as numbers (see the module docstring)."""
    ref = token_logprobs(reference, data, pad_id, batch_size, "reference")
    vocab = int(max(len(tokenizer), ref.targets.max() + 1))
    means, counts, eos = {}, None, []
    ref_end = ref.logprobs[ref.is_end]
    eos.append(_eos_row("reference", ref, ref_end))
    for name, model in policies.items():
        pol = token_logprobs(model, data, pad_id, batch_size, name)
        means[name], counts = per_token_means(pol.logprobs - ref.logprobs, ref.targets, vocab)
        eos.append(_eos_row(name, pol, pol.logprobs[pol.is_end]))
    seen = counts > 0
    stacked = np.stack([means[n] for n in policies])
    lo, hi = float(np.nanmin(stacked[:, seen])), float(np.nanmax(stacked[:, seen]))
    edges = np.linspace(min(lo, -1e-6), max(hi, 1e-6), bins + 1)
    histogram = {name: np.histogram(means[name][seen], bins=edges)[0] / seen.sum() for name in policies}
    frequent = np.nonzero(counts >= min_count)[0]
    order = frequent[np.argsort(stacked[:, frequent].mean(axis=0), kind="stable")][:top_k]
    names = {int(t): tokenizer.decode([int(t)]) for t in np.nonzero(seen)[0]}  # readable, specials kept
    return {"policies": list(policies), "means": means, "counts": counts, "token_names": names,
            "histogram": {"edges": edges, "fractions": histogram}, "top_tokens": [int(t) for t in order],
            "eos": eos, "end_tokens": int(ref.is_end.sum())}


def _eos_row(name: str, tl: TokenLogprobs, end_lp: np.ndarray) -> dict:
    """Fig. 3's two statistics from the end-token log-probs of one model."""
    end_pairs, end_side = tl.pair[tl.is_end], tl.side[tl.is_end]
    chosen = dict(zip(end_pairs[end_side == 0].tolist(), end_lp[end_side == 0]))
    rejected = dict(zip(end_pairs[end_side == 1].tolist(), end_lp[end_side == 1]))
    both = sorted(set(chosen) & set(rejected))
    return {"model": name, "eos_value": float(end_lp.mean()) if end_lp.size else float("nan"),
            "eos_difference": float(np.mean([chosen[p] - rejected[p] for p in both])) if both else float("nan"),
            "sequences": int(end_lp.size), "pairs": len(both)}


def write_analysis(result: dict, out: Path) -> None:
    """The CSV/JSON tables and the three PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    policies, means, counts, names = result["policies"], result["means"], result["counts"], result["token_names"]
    token_rows = [{"token_id": t, "token": names[t], "count": int(counts[t]),
                   **{f"mean_diff[{p}]": float(means[p][t]) for p in policies}} for t in sorted(names)]
    write_tables(token_rows, out, "tokens")
    edges = result["histogram"]["edges"]
    hist_rows = [{"bin_lo": float(edges[i]), "bin_hi": float(edges[i + 1]),
                  **{f"fraction[{p}]": float(result["histogram"]["fractions"][p][i]) for p in policies}}
                 for i in range(len(edges) - 1)]
    write_tables(hist_rows, out, "histogram")
    top_rows = [{"rank": k + 1, "token_id": t, "token": names[t], "count": int(counts[t]),
                 **{f"mean_diff[{p}]": float(means[p][t]) for p in policies}}
                for k, t in enumerate(result["top_tokens"])]
    write_tables(top_rows, out, "top_tokens")
    write_tables(result["eos"], out, "eos")
    _plot(result, token_rows, hist_rows, top_rows, out)


def _labels(names: list[str]) -> dict[str, str]:
    """Short legend labels: each model's run name (checkpoint.model_name), or as many trailing parts of its path
    as make the labels distinct."""
    short = {n: model_name(n) for n in names}
    for k in range(1, max(len(Path(n).parts) for n in names) + 1):
        if len(set(short.values())) == len(names):
            break
        short = {n: "/".join(Path(n).parts[-k:]) for n in names}
    return short


def _plot(result: dict, token_rows, hist_rows, top_rows, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = result["policies"]
    short = _labels([*policies, "reference"])
    fig, ax = plt.subplots(figsize=(9, 4))
    centers = [(r["bin_lo"] + r["bin_hi"]) / 2 for r in hist_rows]
    for p in policies:
        ax.step(centers, [r[f"fraction[{p}]"] for r in hist_rows], where="mid", label=short[p])
    ax.set(yscale="log", xlabel="log-probability difference (policy - reference), mean per token",
           ylabel="ratio of token types", title="Fig. 1: per-token log-prob differences")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    atomic_write_figure(fig, out / "token_histogram.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 0.4 * max(len(top_rows), 3) + 1.5))
    height = 0.8 / max(len(policies), 1)
    for j, p in enumerate(policies):
        ax.barh([k + j * height for k in range(len(top_rows))], [r[f"mean_diff[{p}]"] for r in top_rows],
                height=height, label=short[p])
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(top_rows))], [repr(r["token"]) for r in top_rows])
    ax.invert_yaxis()
    ax.set(xlabel="mean log-probability difference", title="Fig. 2: most down-weighted tokens")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # off the bars
    fig.tight_layout()
    atomic_write_figure(fig, out / "top_tokens.png", dpi=120)
    plt.close(fig)

    # The two statistics differ by orders of magnitude (values near -6, differences near 0.01): one axis each.
    rows = result["eos"]
    x = np.arange(len(rows))
    fig, (value, difference) = plt.subplots(1, 2, figsize=(10, 4))
    value.bar(x, [r["eos_value"] for r in rows], width=0.6, color="tab:blue")
    value.set(ylabel="mean log p(end token)", title="value")
    difference.bar(x, [r["eos_difference"] for r in rows], width=0.6, color="tab:orange")
    difference.axhline(0, color="black", linewidth=0.8)
    difference.set(ylabel="mean of chosen - rejected, per pair", title="difference (chosen - rejected)")
    for ax in (value, difference):
        ax.set_xticks(x, [short.get(r["model"], r["model"]) for r in rows], rotation=20, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Fig. 3: the end token's log-probability")
    fig.tight_layout()
    atomic_write_figure(fig, out / "eos.png", dpi=120)
    plt.close(fig)


def analyze(cfg: AnalyzeConfig) -> dict:
    """Load the reference and every policy in --model (comma-separated) and write the analysis to --out."""
    device = default_device()
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.reference, cfg.revision, cfg.trust_remote_code)
    check_template(cfg.template, tokenizer)
    data = load_pairs(cfg, cfg.split, tokenizer, None, cfg.max_pairs)
    names = [m.strip() for m in cfg.model.split(",") if m.strip()]
    for name in names:  # per-token differences need one vocabulary
        theirs = load_tokenizer(model_path(name), cfg.revision, cfg.trust_remote_code)
        if not cfg.tokenizer and tokenizer_fingerprint(theirs) != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"{name} has another tokenizer than the reference {cfg.reference}: token-level "
                              "differences need one vocabulary")
    reference = load_frozen(dataclasses.replace(cfg, model=model_path(cfg.reference)), device, torch.float32)
    policies = {name: load_frozen(dataclasses.replace(cfg, model=model_path(name)), device, torch.float32)
                for name in names}
    result = analyze_tokens(policies, reference, data, tokenizer, pad_token_id(tokenizer), cfg.min_count,
                            cfg.top_k, cfg.bins, cfg.batch_size)
    write_analysis(result, Path(cfg.out))
    return result
