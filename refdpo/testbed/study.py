"""`refdpo demo --study advise`: does `refdpo advise` tell, before training, whether a reference helps and which
beta to use? Checked against the testbed's true reward r*, pre-registered (README.md, "The advise study").

References of controlled quality, every one a column pair of the seed's data/train.jsonl and val.jsonl:
- graded (F1): the SFT model trained further on good demonstrations for k steps (one trajectory, snapshots),
  scored by `refdpo score` like the demo's compatible reference;
- synthesised (F4): Delta_ref = Delta_0 + a (r*_w - r*_l) + sigma eps + b (words_w - words_l), written as
  two columns l_ref(y) = l_0(y) + g(y) - c with g(y) = a r*(y) + sigma eps_y + b words(y), eps_y ~ N(0, 1/2)
  (so the margin's noise has sd sigma) and c = max(g_w, g_l, 0) per pair, so that l_ref <= l_0 <= 0. The
  tilt pi_0 e^g is a legitimate reference, and a per-prompt constant cancels in DPO;
- the demo's compatible, incompatible and prior references, and mixtures (F5): the geometric mixture
  lambda log p_ref + (1 - lambda) log p_self, trained with `--ref_mix lambda`.

Phases, on disjoint references and seeds: *calibrate* (seeds SEED..SEED+n-1) gives the table the thresholds
of `advise` are fixed on; *heldout* (the next n seeds) and *long* (the long-reply variant, in OUT/long) test
the frozen rules. Every reference is trained on the same beta grid as the self reference, same budget.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refdpo.testbed.task import REFERENCES

# The study's sizes where they differ from the demo's (full, --quick): see README.md for why.
STUDY_SIZES = {"train_prompts": (3000, 600), "heldout_prompts": (300, 150),
               "betas_dpo": ("10,3,1,0.3,0.1,0.03", "3,0.3,0.03"), "betas_ref_free": ("100,30,10,1,0.1", "10,1")}
SELF_COLUMNS = REFERENCES["self"][1]
ADVISE_SPLIT = "val"  # what advise reads, as a user runs it: `refdpo advise --split val` (held-out pairs)


@dataclass(frozen=True)
class Ref:
    """A candidate reference. kind: self | graded (F1, `steps` of further SFT) | model (compatible,
    incompatible, prior) | f4 (synthesised: a, sigma, b) | mix (F5: `base` mixed with self at `lam`) |
    ref_free (no reference; trained only as a finding of the long variant)."""

    name: str
    kind: str
    a: float = 0.0
    sigma: float = 0.0
    b: float = 0.0
    steps: int = 0
    base: str = ""
    lam: float = 1.0


def f4(a: float, sigma: float, b: float) -> Ref:
    return Ref(f"f4_a{a:g}_s{sigma:g}_b{b:g}".replace(".", "p").replace("-", "m"), "f4", a=a, sigma=sigma, b=b)


def graded(cfg, fraction: float) -> Ref:
    """F1 at `fraction` of the compatible reference's step count (25/75/400 of 200 at full size)."""
    steps = max(1, round(fraction * cfg.compatible_steps))
    return Ref(f"graded_{steps}", "graded", steps=steps)


def mix(base: str, lam: float) -> Ref:
    return Ref(f"mix_{base}_{lam:g}".replace(".", "p"), "mix", base=base, lam=lam)


SELF = Ref("self", "self")
MODELS = {name: Ref(name, "model") for name in ("compatible", "incompatible", "prior")}


def phase_references(cfg, phase: str) -> list[Ref]:
    """The candidates of `phase` (all_candidates), only those named by --candidates when it is set."""
    refs = all_candidates(cfg, phase)
    wanted = {c.strip() for c in cfg.candidates.split(",") if c.strip()}
    return [r for r in refs if r.name in wanted] if wanted else refs


def all_candidates(cfg, phase: str) -> list[Ref]:
    """The candidates of each phase (self, the baseline, is trained in every phase too). Calibration: F4 on an
    (a, sigma) grid with b = 0, and F1 at 1/8 and 2x the compatible steps. Held-out: other (a, sigma, b)
    including b != 0, F1 at 3/8, the demo's three references and mixtures of the incompatible one. Long: a
    smaller set on the long-reply variant, with reference-free training for the findings."""
    if phase == "calibrate":
        return [f4(a, s, 0.0) for a in (0.0, 1.0, 4.0) for s in (0.0, 3.0, 10.0) if (a, s) != (0.0, 0.0)] + [
            graded(cfg, 1 / 8), graded(cfg, 2.0)]
    if phase == "heldout":
        return [f4(1.0, 1.0, 0.0), f4(4.0, 6.0, 0.0), f4(0.5, 0.0, 0.3), f4(1.0, 1.0, -0.3), f4(0.0, 2.0, 0.5),
                graded(cfg, 3 / 8), MODELS["compatible"], MODELS["incompatible"], MODELS["prior"],
                *(mix("incompatible", lam) for lam in (0.25, 0.5, 0.75))]
    if phase == "long":
        return [MODELS["compatible"], MODELS["prior"], f4(1.0, 1.0, 0.0), f4(0.0, 6.0, 0.0),
                Ref("ref_free", "ref_free")]
    raise ValueError(phase)


def phase_of(cfg, seed: int) -> str:
    """Calibration seeds SEED..SEED+n-1, held-out seeds the next n; the long variant is held out as a whole."""
    if cfg.variant == "long":
        return "long"
    return "calibrate" if seed < cfg.seed + cfg.seeds else "heldout"


def phase_seeds(cfg, phase: str) -> list[int]:
    """Calibration: SEED..SEED+n-1; held-out and long (another task, never calibrated on): the next n."""
    first = cfg.seed + (0 if phase == "calibrate" else cfg.seeds)
    return list(range(first, first + cfg.seeds))


def columns_of(ref: Ref) -> str:
    """The column pair holding `ref`'s log-probs (for a mixture: its base's)."""
    if ref.kind == "self":
        return SELF_COLUMNS
    if ref.kind == "model":
        return REFERENCES[ref.name][1]
    if ref.kind == "mix":
        return columns_of(MODELS.get(ref.base) or Ref(ref.base, "graded"))
    return f"{ref.name}_chosen_logprob,{ref.name}_rejected_logprob"


def training_fields(ref: Ref) -> dict:
    """The `refdpo train` fields that make `ref` the reference."""
    if ref.kind == "ref_free":
        return {"ref_free": True}
    if ref.kind == "mix":
        return {"ref_columns": f"{columns_of(ref)},{SELF_COLUMNS}", "ref_mix": ref.lam}
    return {"ref_columns": columns_of(ref)}


def all_references(cfg) -> list[Ref]:
    phases = ("long",) if cfg.variant == "long" else ("calibrate", "heldout")
    return [SELF] + [r for p in phases for r in phase_references(cfg, p)]


def families(cfg) -> dict[str, dict]:
    return {ref.name: training_fields(ref) for ref in all_references(cfg)}


def phase_grid(cfg, phase: str) -> list[tuple[str, float]]:
    """Every run of one seed of `phase`: (reference, beta), the self reference included."""
    from refdpo.testbed.demo import _betas

    grid = _betas(cfg.betas_dpo, "dpo")
    free = _betas(cfg.betas_ref_free, "ref_free")
    return [(ref.name, b) for ref in [SELF] + phase_references(cfg, phase)
            for b in (free if ref.kind == "ref_free" else grid)]


def seed_plan(cfg, seed: int):
    """What `prepare` builds for a seed of this study: the scored references its phase needs, the F1
    snapshots, and the F4 columns."""
    from refdpo.testbed.demo import SeedPlan

    refs = phase_references(cfg, phase_of(cfg, seed))
    bases = {r.base for r in refs if r.kind == "mix"}
    models = {r.name for r in refs if r.kind == "model"} | bases
    scored = {"self": REFERENCES["self"]}
    snapshots = {cfg.compatible_steps: "compatible"}
    for ref in refs:
        if ref.kind == "graded":
            snapshots[ref.steps] = ref.name
            scored[ref.name] = (ref.name, columns_of(ref), "conditional")
    scored.update({name: REFERENCES[name] for name in ("compatible", "incompatible", "prior") if name in models})
    synthetic = [r for r in refs if r.kind == "f4"]
    alone = tuple(sorted(set(snapshots.values()))) + (("incompatible",) if "incompatible" in models else ())
    return SeedPlan(references=scored, snapshots=snapshots, incompatible="incompatible" in models, alone=alone,
                    synthesise=lambda s, split, records: synthesise(records, synthetic, s, split),
                    prior_strength=True)


# --- F4: column-synthesised references --------------------------------------------------------------------

def f4_columns(l0_w: np.ndarray, l0_l: np.ndarray, r_w: np.ndarray, r_l: np.ndarray, words_w: np.ndarray,
               words_l: np.ndarray, eps_w: np.ndarray, eps_l: np.ndarray, a: float, sigma: float,
               b: float) -> tuple[np.ndarray, np.ndarray]:
    """l_ref(y) = l_0(y) + g(y) - c, g(y) = a r*(y) + sigma eps_y + b words(y), c = max(g_w, g_l, 0) per pair:
    the margin is Delta_0 + a (r*_w - r*_l) + sigma (eps_w - eps_l) + b (words_w - words_l), and both columns
    stay <= l_0 <= 0 (log-probs)."""
    g_w = a * r_w + sigma * eps_w + b * words_w
    g_l = a * r_l + sigma * eps_l + b * words_l
    c = np.maximum(np.maximum(g_w, g_l), 0.0)
    return l0_w + g_w - c, l0_l + g_l - c


def f4_noise(seed: int, name: str, split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """eps for the chosen and the rejected replies, N(0, 1/2) each, from an RNG of (seed, reference, split)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), zlib.crc32(split.encode())])
    eps = rng.normal(0.0, np.sqrt(0.5), size=(2, n))
    return eps[0], eps[1]


def _words(records: list[dict], side: str) -> np.ndarray:
    return np.array([len(r[side][-1]["content"].split()) for r in records], dtype=np.float64)


def synthesise(records: list[dict], refs: list[Ref], seed: int, split: str) -> list[dict]:
    """The records with each F4 reference's two columns added (the same construction on every split)."""
    chosen, rejected = SELF_COLUMNS.split(",")
    base = (np.array([r[chosen] for r in records]), np.array([r[rejected] for r in records]),
            np.array([r["chosen_true_reward"] for r in records]), np.array([r["rejected_true_reward"] for r in records]),
            _words(records, "chosen"), _words(records, "rejected"))
    for ref in refs:
        cw, cl = f4_columns(*base, *f4_noise(seed, ref.name, split, len(records)), ref.a, ref.sigma, ref.b)
        names = columns_of(ref).split(",")
        for record, x, y in zip(records, cw, cl):
            record[names[0]], record[names[1]] = float(x), float(y)
    return records


# --- what advise sees --------------------------------------------------------------------------------------

def advise_columns(records: list[dict], ref: Ref):
    """`refdpo.advise.Columns` of a candidate on a split: the self and the candidate's summed log-probs (a
    mixture: lambda ref + (1 - lambda) self, exactly what `--ref_mix` trains against), reply sizes in UTF-8
    bytes and in policy tokens (one word-level token per word, plus EOS), and prompt ids."""
    from refdpo.advise import Columns

    def column(name: str) -> np.ndarray:
        return np.array([r[name] for r in records], dtype=np.float64)

    sc, sr = (column(c) for c in SELF_COLUMNS.split(","))
    rc, rr = (None, None) if ref.kind == "ref_free" else (column(c) for c in columns_of(ref).split(","))
    if ref.kind == "mix":
        rc, rr = ref.lam * rc + (1 - ref.lam) * sc, ref.lam * rr + (1 - ref.lam) * sr
    size = {side: np.array([len(r[side][-1]["content"].encode()) for r in records]) for side in ("chosen", "rejected")}
    words = {side: _words(records, side).astype(np.int64) + 1 for side in ("chosen", "rejected")}
    prompt_ids = np.array([int(r["prompt_id"].rsplit("-", 1)[1]) for r in records], dtype=np.int64)
    return Columns(sc, sr, rc, rr, size["chosen"], size["rejected"], words["chosen"], words["rejected"], prompt_ids)


def advise_one(records: list[dict], ref: Ref) -> dict:
    """advise's verdict, beta, lambda, beta_self, scores and reasons for one candidate."""
    from refdpo.advise import advise

    columns = advise_columns(records, ref)
    a = advise(columns)
    return {"verdict": a.verdict, "beta": float(a.beta), "lam": float(a.lam), "beta_self": float(a.beta_self),
            "beta_whole": beta_whole(columns, a), "scores": {k: float(v) for k, v in a.scores.items()},
            "reasons": list(a.reasons)}


def beta_whole(columns, a) -> float:
    """The beta advise's rules give for the candidate used whole (B2 at lambda = 1), whatever the verdict: what
    the beta evaluation compares with the candidate's own best beta (a "dont" verdict's beta is self's)."""
    from refdpo.advise.rules import beta_reference
    from refdpo.advise.scores import margins

    return float(beta_reference(margins(columns).advantage, 1.0, a.beta_self))


# --- the whole study ----------------------------------------------------------------------------------------

def long_config(cfg):
    """The long-reply variant's configuration: the same sizes, in OUT/long, the variant's generation cap."""
    from refdpo.testbed.task import VARIANTS

    return dataclasses.replace(cfg, variant="long", out=str(Path(cfg.out) / "long"),
                               max_reply_tokens=VARIANTS["long"].max_reply_tokens)


def phase_jobs(cfg, phase: str) -> list[tuple]:
    """(config, seed, grid) of every seed of `phase`."""
    sub = long_config(cfg) if phase == "long" else cfg
    return [(sub, seed, phase_grid(sub, phase)) for seed in phase_seeds(cfg, phase)]


def run_study(cfg) -> dict:
    """Prepare, train and measure the phases asked for (--phase), then write the report of every phase whose
    runs are all done; returns the report."""
    from refdpo.testbed.demo import _claim, execute, pool_size, run_dir
    from refdpo.testbed.study_report import write_study_report

    if cfg.variant != "base":
        from refdpo.errors import ConfigError

        raise ConfigError("--study advise runs both variants itself (its long phase): leave --variant base")
    _claim(cfg)
    phases = ["calibrate", "heldout", "long"] if cfg.phase == "all" else [cfg.phase]
    jobs = [job for phase in phases for job in phase_jobs(cfg, phase)]
    workers = pool_size(cfg, sum(len(g) for _, _, g in jobs))
    markers = [run_dir(sub, seed, f, b) / "eval.json" for sub, seed, grid in jobs for f, b in grid]
    before = sum(m.exists() for m in markers)
    start = time.perf_counter()
    execute(jobs, workers, cfg.progress, f"advise study ({', '.join(phases)})")
    return write_study_report(cfg, seconds=time.perf_counter() - start, workers=workers, phases=phases,
                              trained=sum(m.exists() for m in markers) - before)


# --- plots (the report's: study_report.py) ------------------------------------------------------------------

def plot(loaded: dict, folder: Path) -> list[str]:
    """gain_vs_beta_{phase}.png (mean paired gain over self per reference), and with advise's answers
    beta_rec_vs_best.png (per reference and seed) and score_vs_gain_{phase}.png (one panel per score)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from refdpo.io import atomic_write_figure

    written = []

    def save(fig, name: str, title: str) -> None:
        fig.suptitle(title, fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        atomic_write_figure(fig, folder / f"{name}.png", dpi=110)
        plt.close(fig)
        written.append(f"{name}.png")

    for phase, units in loaded.items():
        refs = [r for r in dict.fromkeys(u["reference"] for u in units) if r != "self"]
        fig, ax = plt.subplots(figsize=(10, 5))
        cmap = plt.get_cmap("tab20")
        for i, name in enumerate(refs):
            us = [u for u in units if u["reference"] == name]
            betas = [b for b in us[0]["grid"] if b in us[0]["gain"]]
            mean = [np.mean([u["gain"][b] for u in us]) for b in betas]
            ax.plot(betas, mean, marker="o", color=cmap(i % 20), label=name, linestyle="-" if i < 10 else "--")
        ax.axhline(0, color="black", linewidth=1)
        ax.set(xscale="log", xlabel="beta", ylabel="true reward minus self reference's at the same beta")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, f"gain_vs_beta_{phase}", f"{phase}: gain over the self reference at equal beta (mean over seeds)")

    advised = {p: [u for u in us if u.get("advise")] for p, us in loaded.items()}
    if not any(advised.values()):
        return written
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    rng = np.random.default_rng(0)
    for phase, us in advised.items():
        best = np.log10([u["best_beta"] for u in us])
        rec = np.log10([u["advise"]["beta_whole"] for u in us])
        ax.scatter(best + rng.uniform(-0.08, 0.08, len(us)), rec, s=18, alpha=0.7, label=phase)
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="β_rec = β_best")
    ax.set(xlabel="log10 best beta on the grid (measured, jittered)",
           ylabel="log10 advise's beta (self: beta_self; candidates: used whole)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "beta_rec_vs_best", "advise's beta against the measured best, per reference and seed")
    for phase, us in advised.items():
        us = [u for u in us if u["kind"] != "self"]
        names = sorted({k for u in us for k in u["advise"]["scores"]})
        if not names:
            continue
        cols = min(4, len(names))
        fig, axes = plt.subplots((len(names) + cols - 1) // cols, cols, figsize=(3.6 * cols, 3.0 * ((len(names) + cols - 1) // cols)),
                                 squeeze=False)
        kinds = sorted({u["kind"] for u in us})
        for ax, name in zip(axes.flat, names):
            for kind in kinds:
                pts = [(u["advise"]["scores"].get(name, np.nan), u["gain_bvb"]) for u in us if u["kind"] == kind]
                ax.scatter(*zip(*pts), s=14, alpha=0.7, label=kind)
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("score", fontsize=8)
            ax.set_ylabel("best-vs-best gain", fontsize=8)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        save(fig, f"score_vs_gain_{phase}", f"{phase}: each advise score against the measured gain")
    return written
