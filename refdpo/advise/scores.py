"""Pre-training compatibility scores of a candidate reference for a policy, from stored sequence log-probs.

Notation (`shared/docs/reference-compatibility.md` §1, §3): per pair i, the initial policy's margin
Δ0 = ℓ0_w − ℓ0_l, the reference's Δr = ℓr_w − ℓr_l, and the **reference advantage** A = Δr − Δ0. With
m = Δθ − Δ0 the policy's margin movement, DPO against the reference is −log σ(β(m − A)): a non-self reference is
a per-pair target offset A for the self-reference problem. Per-byte versions divide each log-prob by its reply's
UTF-8 bytes, its end counted as one more (δ0 = ℓ0_w/B_w − ℓ0_l/B_l; a = δr − δ0; an empty reply is one byte):
comparable across tokenizers, unlike per-token ones.

Every function here is pure numpy on float64 [N] arrays; `scores` computes them all for one reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAD_TO_SD = 1.4826  # a normal's sd / its median absolute deviation


@dataclass(frozen=True)
class Columns:
    """One (policy, reference) comparison's per-pair inputs, float64 [N] each.

    `ref_*` None: the uniform reference (reference-free DPO), whose margin is 0. `tokens_*` (policy tokens per
    reply, EOS included) may be None: the length-scaled β rule then says it cannot be computed. `prompt_ids`
    (int, 0 .. prompts−1) groups pairs by prompt for the bootstrap and the cross-fitting (None: every pair its
    own prompt)."""

    self_chosen: np.ndarray
    self_rejected: np.ndarray
    ref_chosen: np.ndarray | None
    ref_rejected: np.ndarray | None
    bytes_chosen: np.ndarray  # UTF-8 bytes of each reply's text (`margins` adds one for its end)
    bytes_rejected: np.ndarray
    tokens_chosen: np.ndarray | None = None
    tokens_rejected: np.ndarray | None = None
    prompt_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.self_chosen)

    def take(self, index: np.ndarray) -> Columns:
        """The pairs at `index` (a bootstrap resample)."""
        pick = {name: (None if value is None else value[index]) for name, value in vars(self).items()}
        return Columns(**pick)


@dataclass(frozen=True)
class Margins:
    """What every score is a function of (float64 [N])."""

    delta_self: np.ndarray  # Δ0 (nats)
    delta_ref: np.ndarray  # Δr
    advantage: np.ndarray  # A = Δr − Δ0
    byte_self: np.ndarray  # δ0 (nats / byte)
    byte_ref: np.ndarray  # δr
    byte_advantage: np.ndarray  # a = δr − δ0
    length_diff: np.ndarray  # ΔB = B_w − B_l (bytes)


def margins(c: Columns) -> Margins:
    zeros = np.zeros(len(c))
    ref_w = c.ref_chosen if c.ref_chosen is not None else zeros
    ref_l = c.ref_rejected if c.ref_rejected is not None else zeros
    d0, dr = c.self_chosen - c.self_rejected, ref_w - ref_l
    bytes_w, bytes_l = c.bytes_chosen + 1.0, c.bytes_rejected + 1.0  # the end of the reply counts as a byte
    b0 = c.self_chosen / bytes_w - c.self_rejected / bytes_l
    br = ref_w / bytes_w - ref_l / bytes_l
    return Margins(d0, dr, dr - d0, b0, br, br - b0, bytes_w - bytes_l)


# --- plain statistics --------------------------------------------------------------------------------------

def ols(y: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line y ~ 1 + x (slope 0 when x is constant)."""
    mx, my = x.mean(), y.mean()
    sxx = np.dot(x - mx, x - mx)
    slope = float(np.dot(x - mx, y - my) / sxx) if sxx > 0 else 0.0
    return float(my - slope * mx), slope


def r_squared(y: np.ndarray, *xs: np.ndarray) -> float:
    """R² of the OLS fit y ~ 1 + xs (0 when y is constant)."""
    design = np.column_stack([np.ones_like(y), *xs])
    residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    total = np.sum((y - y.mean()) ** 2)
    return float(1 - np.sum(residual ** 2) / total) if total > 0 else 0.0


def length_controlled(y: np.ndarray, x: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """y − ŝ·x, with ŝ the OLS slope of y ~ 1 + x fitted on the other half (folds: 0/1 per pair), so that a
    pair's correction never uses the pair itself. Only the part x predicts is removed: the intercept (what the
    reference adds at equal length) stays. A fold too small to fit uses every pair."""
    out = np.empty_like(y)
    for k in (0, 1):
        fit, apply = folds != k, folds == k
        if fit.sum() < 3:
            fit = np.ones_like(fit)
        slope = ols(y[fit], x[fit])[1]
        out[apply] = y[apply] - slope * x[apply]
    return out


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N with ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r (nan when either is constant)."""
    sx, sy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(sx * sx) * np.sum(sy * sy))
    return float(np.sum(sx * sy) / denominator) if denominator > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return correlation(rank(x), rank(y))


def accuracy(margin: np.ndarray) -> float:
    """P(margin > 0), ties counted 1/2."""
    return float(np.mean(margin > 0) + 0.5 * np.mean(margin == 0))


def robust_snr(values: np.ndarray) -> float:
    """median / (1.4826 · MAD): a location-to-spread ratio that a few extreme pairs cannot move."""
    median = np.median(values)
    spread = MAD_TO_SD * np.median(np.abs(values - median))
    if spread == 0:
        return 0.0 if median == 0 else float(np.sign(median) * np.inf)
    return float(median / spread)


# --- the five scores -----------------------------------------------------------------------------------------

def c1_reference_advantage(m: Margins, residual: np.ndarray, per_byte: np.ndarray) -> dict[str, float]:
    """C1: is the reference's extra preference label-aligned, beyond length? `residual` is A⊥ = A − ŝ·ΔB, ŝ the
    cross-fitted OLS slope of A on ΔB (the part of A that length predicts goes; what it adds at equal length
    stays); `per_byte` is a⊥, the same of a (`length_controlled`).

    IRA = P(A⊥ > 0) (ties 1/2): the step-0 implicit-reward accuracy of the reference read as a trained version
    of the policy. SNR = median(A⊥) / (1.4826 MAD(A⊥)). *_byte: the same of a⊥ (comparable across tokenizers);
    *_raw: of A itself, without length control. acc_*: the ranking accuracies P(Δ > 0), raw and per byte;
    gain_byte = acc_ref_byte − acc_self_byte.

    signal = max(0, 1 − 2·E[A⊥²·1(A⊥ < 0)] / E[A⊥²]): the share of A⊥'s second moment that symmetric noise
    cannot explain. If A⊥ = s + n with a label-aligned offset s ≥ 0 and noise n symmetric about 0, the negative
    side holds at most half of E[n²], so this is a lower bound on the signal share (pure noise: 0; a noiseless
    label-aligned reference: 1 but for the pairs whose label it contradicts). Unlike mean²/E[A²] it does not
    count the spread of a clean reference's true gaps as noise."""
    acc_self_byte, acc_ref_byte = accuracy(m.byte_self), accuracy(m.byte_ref)
    second = float(np.mean(residual ** 2))
    signal = max(0.0, 1 - 2 * float(np.mean(residual ** 2 * (residual < 0))) / second) if second > 0 else 0.0
    return {"ira": accuracy(residual), "snr": robust_snr(residual), "signal": signal, "ira_byte": accuracy(per_byte),
            "snr_byte": robust_snr(per_byte), "ira_raw": accuracy(m.advantage),
            "snr_raw": robust_snr(m.advantage), "acc_self": accuracy(m.delta_self), "acc_ref": accuracy(m.delta_ref),
            "acc_self_byte": acc_self_byte, "acc_ref_byte": acc_ref_byte, "gain_byte": acc_ref_byte - acc_self_byte}


def c2_agreement(m: Margins) -> dict[str, float]:
    """C2: label-free agreement of the two margins. ρ = Spearman(δ0, δr); R² of Δr ~ 1 + Δ0 + ΔB; error
    consistency κ = (p_obs − p_exp) / (1 − p_exp) with p_obs = P(sign Δ0 = sign Δr) and
    p_exp = acc0·acc_r + (1 − acc0)(1 − acc_r) (the binary form of CAPA, Goel et al. 2025)."""
    acc_self, acc_ref = accuracy(m.delta_self), accuracy(m.delta_ref)
    observed = float(np.mean(np.sign(m.delta_self) == np.sign(m.delta_ref)))
    expected = acc_self * acc_ref + (1 - acc_self) * (1 - acc_ref)
    kappa = (observed - expected) / (1 - expected) if expected < 1 else 0.0
    return {"rho": spearman(m.byte_self, m.byte_ref), "r2": r_squared(m.delta_ref, m.delta_self, m.length_diff),
            "kappa": kappa}


def c3_kl_proxy(m: Margins) -> dict[str, float]:
    """C3: pairwise KL proxy K = E[A²]/4 (nats; ≈ ½ Var within a prompt of log π0 − log p_r, restricted to what
    DPO sees), its per-byte version E[a²]/4, and the nuisance fraction ν = Var(A) / (mean(A)² + Var(A))."""
    mean, var = float(np.mean(m.advantage)), float(np.var(m.advantage))
    total = mean ** 2 + var
    return {"kl_proxy": total / 4, "kl_proxy_byte": float(np.mean(m.byte_advantage ** 2)) / 4,
            "nuisance": var / total if total > 0 else 0.0}


def c4_length_coupling(m: Margins) -> dict[str, float]:
    """C4: will the reference teach length? s = OLS slope of a margin on ΔB/100 bytes; LC = s_ref − s_self (the
    slope of A); r_AB = corr(A, ΔB)."""
    x = m.length_diff / 100
    slope_self, slope_ref = ols(m.delta_self, x)[1], ols(m.delta_ref, x)[1]
    return {"length_slope_self": float(slope_self), "length_slope_ref": float(slope_ref),
            "length_coupling": float(slope_ref - slope_self), "length_corr": correlation(m.advantage, m.length_diff)}


def c5_hard_targets(m: Margins, per_byte: np.ndarray, tau: float) -> dict[str, float]:
    """C5: U(τ) = P(a⊥ > τ) (`per_byte`: a⊥), the share of pairs whose length-controlled per-byte target
    exceeds τ nats/byte;
    HyPO's pessimistic fraction P(Δr < 0) and pessimism mass E[(−Δr)+]."""
    return {"hard_targets": float(np.mean(per_byte > tau)), "pessimistic": float(np.mean(m.delta_ref < 0)),
            "pessimism_mass": float(np.mean(np.maximum(-m.delta_ref, 0)))}


def folds_of(c: Columns) -> np.ndarray:
    """The cross-fitting halves: by prompt (every pair of a prompt on one side: prompt ids even or odd)."""
    return (np.arange(len(c)) if c.prompt_ids is None else c.prompt_ids) % 2


def scores(c: Columns, tau: float, m: Margins | None = None) -> dict[str, float]:
    """C1–C5 of one reference (keys as the c*_ functions name them); `m`: its margins, when computed already."""
    m, folds = m or margins(c), folds_of(c)
    residual = length_controlled(m.advantage, m.length_diff, folds)  # A⊥
    per_byte = length_controlled(m.byte_advantage, m.length_diff, folds)  # a⊥
    return {**c1_reference_advantage(m, residual, per_byte), **c2_agreement(m), **c3_kl_proxy(m),
            **c4_length_coupling(m), **c5_hard_targets(m, per_byte, tau)}
