"""The β rules (B1–B3) and the verdict, from the scores of `scores.py`
(`shared/docs/reference-compatibility.md` §4–§5).

B1 (self reference: 1/β is the per-pair margin movement at which DPO stops pushing):
    β_self^len = κ_len / T̄ (T̄: mean reply length in policy tokens), β_self^flip = κ_flip / median{c_i > 0}
    with c = −Δ0 (the margin a mis-ranked pair must gain), β_self = their geometric mean.
B2 (a non-self reference sets a per-pair target A; keep the total movement of self-reference DPO):
    M* = κ_b / β_self, T_λ = mean(max(λA, 0)), β_ref = clip(1 / max(M* − T_λ, M_min), β_self, β_max).
B3 (trust in the reference, separate from the budget): the geometric mixture λ·ref + (1 − λ)·self has
    advantage λA; λ* = the signal share of A⊥ (scores.c1_reference_advantage's `signal`; 0 when SNR⊥ ≤ 0).
    The proposal's SNR⊥² / (1 + SNR⊥²) was refuted on the testbed's calibration references: SNR is scale-free,
    so a noiseless label-aligned reference (A = a·Δr*) got λ* ≈ 0.5 whatever a, its true gaps' spread
    counted as noise.
Saturation: S(β) = P(β·|λA| ≥ 2), the share of pairs in the hinge regime.

Verdict: a reference passes the gate when its length-controlled advantage is label-aligned (SNR⊥ ≥ gate_snr)
and it agrees enough with the policy (κ_err ≥ gate_kappa); it is then used whole when λ* ≥ use_lambda and mixed
with λ* below; a reference that fails the gate is not used (train with the self reference at β_self).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from refdpo.advise.scores import Columns, Margins, margins, scores


@dataclass(frozen=True)
class Constants:
    """Every constant of the rules. The defaults are the proposal's; the calibration chose `FROZEN`, the set in
    use (how well it does on held-out references: README, "Before training", and
    benchmarks/results/advise_study/)."""

    kappa_len: float = 5.0  # B1a: Tulu 3's length-normalised β 5 = κ_len (a summed-log-prob β is β_norm / T)
    kappa_flip: float = 1.0  # B1b: flipping the median mis-ranked pair needs a loss ≤ −log σ(1)
    kappa_budget: float = 1.0  # B2: M* = κ_b / β_self nats of movement per pair
    min_slack: float = 1.0  # B2: M_min, nats
    beta_max: float = 10.0  # B2: the largest β recommended
    gate_snr: float = 0.1  # the gate: SNR⊥ at least this
    gate_kappa: float = -1.0  # the gate: error consistency at least this (-1: no agreement demanded)
    use_lambda: float = 0.5  # λ* at least this: use the reference whole; below: mix it
    tau: float = 0.1  # C5: nats per byte
    warn_nuisance: float = 0.9  # warn: ν above this
    warn_hard: float = 0.3  # warn: U(τ) above this
    warn_length: float = 1.0  # warn: |LC| above this (nats per 100 bytes)


SATURATION = 2.0  # β·|λA| at or above this: the pair is in the hinge regime
# FROZEN on 2026-11-30 from `python -m refdpo.testbed.calibrate` on the calibration phase of
# `refdpo demo --study advise` (seeds 0-2; F4 a ∈ {0, 1, 4} x σ ∈ {0, 3, 10}, b = 0, and F1 at 25 and 400
# steps), before the held-out phase was looked at: the gate moved 0.1 -> 0.3 (calibration verdict accuracy
# 0.57 -> 0.73) and κ_b 1 -> 0.5 (β error 0.74 -> 0.63 decades); B1's scale, M_min and use_lambda stayed. The
# same calibration refuted B3's SNR²/(1 + SNR²) (module docstring); its replacement was checked on it too.
FROZEN = Constants(kappa_budget=0.5, gate_snr=0.3)
CALIBRATION = ("frozen on the testbed's calibration references and seeds (refdpo/testbed/calibrate.py); "
               "held out: other references, other seeds, the long-reply variant")


@dataclass
class Advice:
    """What `advise` says about one reference."""

    verdict: str  # "use" | "mix" | "dont"
    reasons: list[str]
    beta: float  # recommended β (with λ when mixed)
    beta_interval: tuple[float, float]  # what the rules give with either B1 estimate
    lam: float  # mixture weight of the reference: 1 use, λ* mix, 0 don't
    beta_self: float
    beta_self_len: float | None
    beta_self_flip: float
    saturated: float  # S(β) at the recommended β and λ
    scores: dict[str, float] = field(default_factory=dict)


def beta_self_length(c: Columns, k: Constants = FROZEN) -> float | None:
    """B1a: κ_len / T̄, T̄ the mean reply length in policy tokens (None without token counts)."""
    if c.tokens_chosen is None or c.tokens_rejected is None:
        return None
    return k.kappa_len / float(np.mean((c.tokens_chosen + c.tokens_rejected) / 2))


def beta_self_flip(delta_self: np.ndarray, k: Constants = FROZEN) -> float:
    """B1b: κ_flip / median of c = −Δ0 over the pairs the policy mis-ranks (Chen et al. 2024's flip difficulty)."""
    hard = -delta_self[delta_self < 0]
    return k.kappa_flip / float(np.median(hard)) if len(hard) else k.beta_max


def beta_self(c: Columns, m: Margins | None = None, k: Constants = FROZEN) -> tuple[float, float | None, float]:
    """B1: (β_self, β_self^len, β_self^flip): the geometric mean of the two estimates (B1b alone without token
    counts). `m`: the margins of `c`, when computed already."""
    by_length, by_flip = beta_self_length(c, k), beta_self_flip((m or margins(c)).delta_self, k)
    return (math.sqrt(by_length * by_flip) if by_length else by_flip), by_length, by_flip


def beta_reference(advantage: np.ndarray, lam: float, self_beta: float, k: Constants = FROZEN) -> float:
    """B2: clip(1 / max(κ_b/β_self − mean(max(λA, 0)), M_min), β_self, β_max)."""
    target = float(np.mean(np.maximum(lam * advantage, 0)))
    slack = max(k.kappa_budget / self_beta - target, k.min_slack)
    return float(np.clip(1 / slack, self_beta, k.beta_max))


def mixture_weight(scores: dict[str, float]) -> float:
    """B3: λ*, the signal share of the length-controlled advantage; 0 for a reference against the labels."""
    return scores["signal"] if scores["snr"] > 0 else 0.0


def saturated(advantage: np.ndarray, lam: float, beta: float) -> float:
    """S(β) = P(β·|λA| ≥ 2)."""
    return float(np.mean(beta * np.abs(lam * advantage) >= SATURATION))


def advise(c: Columns, k: Constants = FROZEN) -> Advice:
    """The verdict, β and λ for one reference (`c.ref_*` None: the uniform reference, i.e. reference-free)."""
    m = margins(c)
    s, advantage = scores(c, k.tau, m), m.advantage
    self_beta, by_length, by_flip = beta_self(c, m, k)
    estimates = [b for b in (by_length, by_flip) if b]
    reasons = []
    lam = mixture_weight(s)
    gate_snr, gate_kappa = s["snr"] >= k.gate_snr and lam > 0, s["kappa"] >= k.gate_kappa
    if s["snr"] < k.gate_snr:
        reasons.append(f"its advantage over the policy is not label-aligned beyond length (SNR⊥ {s['snr']:.2f} < "
                       f"{k.gate_snr:g}, IRA⊥ {s['ira']:.3f})")
    elif not gate_snr:
        reasons.append("its advantage's pairs against the labels carry as much of its second moment as noise "
                       "would: signal share 0")
    if not gate_kappa:
        reasons.append(f"it disagrees with the policy beyond chance agreement (κ_err {s['kappa']:.2f} < "
                       f"{k.gate_kappa:g})")
    if gate_snr and gate_kappa:
        verdict = "use" if lam >= k.use_lambda else "mix"
        reasons.append(f"its advantage is label-aligned beyond length (SNR⊥ {s['snr']:.2f}, IRA⊥ {s['ira']:.3f}); "
                       + (f"signal fraction λ* {lam:.2f} ≥ {k.use_lambda:g}: use it whole" if verdict == "use" else
                          f"signal fraction λ* {lam:.2f} < {k.use_lambda:g}: mix it with the self reference"))
        lam = 1.0 if verdict == "use" else lam
        beta = beta_reference(advantage, lam, self_beta, k)
        interval = sorted(beta_reference(advantage, lam, b, k) for b in estimates)
        mean_target = float(np.mean(np.maximum(lam * advantage, 0)))
        reasons.append(f"its targets cover {mean_target:.2f} of the {k.kappa_budget / self_beta:.2f} nats a "
                       f"self-reference run moves per pair: β {beta:.3g}")
    else:
        verdict, lam, beta = "dont", 0.0, self_beta
        interval = sorted(estimates)
        reasons.append(f"train with the self reference at β_self {self_beta:.3g}")
    if verdict != "dont":
        if s["nuisance"] > k.warn_nuisance:
            reasons.append(f"warning: {s['nuisance']:.0%} of its advantage's second moment is spread, not shift")
        if s["hard_targets"] > k.warn_hard:
            reasons.append(f"warning: {s['hard_targets']:.0%} of pairs get a per-byte target above {k.tau:g} "
                           "nats/byte")
        if abs(s["length_coupling"]) > k.warn_length:
            reasons.append(f"warning: its margin grows with length {s['length_coupling']:+.2f} nats/100 bytes "
                           "faster than the policy's: it may teach length")
    return Advice(verdict=verdict, reasons=reasons, beta=beta, beta_interval=(interval[0], interval[-1]), lam=lam,
                  beta_self=self_beta, beta_self_len=by_length, beta_self_flip=by_flip,
                  saturated=saturated(advantage, lam, beta), scores=s)
