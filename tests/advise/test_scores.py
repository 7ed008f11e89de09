"""The compatibility scores and β rules of `refdpo advise`, each against a hand computation in plain Python
floats (tolerance 1e-9)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from refdpo.advise import rules
from refdpo.advise.scores import Columns, margins, scores

TOL = 1e-9
# Eight pairs over four prompts (two pairs each): policy and reference log-probs, reply bytes (the end of a reply
# counts as one more) and tokens.
SELF_W = [-12.0, -30.5, -8.25, -20.0, -15.5, -9.0, -40.0, -22.0]
SELF_L = [-10.0, -35.0, -9.5, -18.0, -25.0, -7.5, -33.0, -30.0]
REF_W = [-11.0, -28.0, -9.0, -16.0, -14.0, -10.5, -35.0, -21.0]
REF_L = [-13.5, -36.0, -8.0, -19.0, -27.0, -8.0, -34.0, -29.5]
BYTES_W = [40.0, 120.0, 30.0, 80.0, 60.0, 35.0, 150.0, 90.0]
BYTES_L = [35.0, 140.0, 32.0, 70.0, 95.0, 25.0, 120.0, 110.0]
TOKENS_W = [10.0, 30.0, 8.0, 20.0, 15.0, 9.0, 38.0, 23.0]
TOKENS_L = [9.0, 35.0, 8.0, 18.0, 24.0, 7.0, 30.0, 28.0]
PROMPTS = [0, 0, 1, 1, 2, 2, 3, 3]


def columns() -> Columns:
    arrays = [np.array(v) for v in (SELF_W, SELF_L, REF_W, REF_L, BYTES_W, BYTES_L, TOKENS_W, TOKENS_L)]
    return Columns(*arrays, prompt_ids=np.array(PROMPTS))


def by_hand() -> dict:
    """Every quantity, from the definitions, in plain Python."""
    n = len(SELF_W)
    d0 = [w - lo for w, lo in zip(SELF_W, SELF_L)]
    dr = [w - lo for w, lo in zip(REF_W, REF_L)]
    adv = [r - s for r, s in zip(dr, d0)]
    b0 = [w / (bw + 1) - lo / (bl + 1) for w, lo, bw, bl in zip(SELF_W, SELF_L, BYTES_W, BYTES_L)]
    br = [w / (bw + 1) - lo / (bl + 1) for w, lo, bw, bl in zip(REF_W, REF_L, BYTES_W, BYTES_L)]
    badv = [r - s for r, s in zip(br, b0)]
    db = [w - lo for w, lo in zip(BYTES_W, BYTES_L)]
    folds = [p % 2 for p in PROMPTS]

    def slope(ys, xs):
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    def controlled(ys):
        out = []
        for i in range(n):
            other = [j for j in range(n) if folds[j] != folds[i]]
            out.append(ys[i] - slope([ys[j] for j in other], [db[j] for j in other]) * db[i])
        return out

    def acc(xs):
        return sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in xs) / len(xs)

    def snr(xs):
        med = statistics.median(xs)
        return med / (1.4826 * statistics.median([abs(x - med) for x in xs]))

    def ranks(xs):
        s = sorted(xs)
        return [s.index(x) + 1 + (s.count(x) - 1) / 2 for x in xs]

    def pearson(xs, ys):
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
        return sxy / math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))

    a_perp, a_perp_byte = controlled(adv), controlled(badv)
    acc0, accr = acc(d0), acc(dr)
    p_obs = sum(1 for x, y in zip(d0, dr) if (x > 0) == (y > 0)) / n
    p_exp = acc0 * accr + (1 - acc0) * (1 - accr)
    # R² of Δr ~ 1 + Δ0 + ΔB via the normal equations, solved by Cramer's rule.
    xs = [[1.0, x, z] for x, z in zip(d0, db)]
    xtx = [[sum(r[i] * r[j] for r in xs) for j in range(3)] for i in range(3)]
    xty = [sum(r[i] * y for r, y in zip(xs, dr)) for i in range(3)]

    def det(m):
        return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))

    coef = [det([[xty[r] if c == k else xtx[r][c] for c in range(3)] for r in range(3)]) / det(xtx) for k in range(3)]
    fitted = [sum(c * v for c, v in zip(coef, r)) for r in xs]
    mean_dr = sum(dr) / n
    r2 = 1 - sum((y - f) ** 2 for y, f in zip(dr, fitted)) / sum((y - mean_dr) ** 2 for y in dr)
    mean_a = sum(adv) / n
    var_a = sum((a - mean_a) ** 2 for a in adv) / n
    second = sum(a * a for a in a_perp) / n
    negative = sum(a * a for a in a_perp if a < 0) / n
    return {
        "ira": acc(a_perp), "snr": snr(a_perp), "signal": max(0.0, 1 - 2 * negative / second), "ira_byte": acc(a_perp_byte), "snr_byte": snr(a_perp_byte),
        "ira_raw": acc(adv), "snr_raw": snr(adv), "acc_self": acc0, "acc_ref": accr,
        "acc_self_byte": acc(b0), "acc_ref_byte": acc(br), "gain_byte": acc(br) - acc(b0),
        "rho": pearson(ranks(b0), ranks(br)), "r2": r2, "kappa": (p_obs - p_exp) / (1 - p_exp),
        "kl_proxy": sum(a * a for a in adv) / (4 * n), "kl_proxy_byte": sum(a * a for a in badv) / (4 * n),
        "nuisance": var_a / (mean_a ** 2 + var_a),
        "length_slope_self": slope(d0, [x / 100 for x in db]), "length_slope_ref": slope(dr, [x / 100 for x in db]),
        "length_coupling": slope(adv, [x / 100 for x in db]), "length_corr": pearson(adv, db),
        "hard_targets": sum(1 for a in a_perp_byte if a > 0.1) / n,
        "pessimistic": sum(1 for d in dr if d < 0) / n, "pessimism_mass": sum(max(-d, 0) for d in dr) / n,
        "_adv": adv, "_d0": d0,
    }


def test_every_score_equals_the_hand_computation():
    computed, expected = scores(columns(), tau=0.1), by_hand()
    assert set(computed) == {k for k in expected if not k.startswith("_")}
    for key, value in computed.items():
        assert value == pytest.approx(expected[key], abs=TOL, rel=TOL), key


def test_the_beta_rules_equal_the_hand_computation():
    expected, c = by_hand(), columns()
    mean_tokens = sum((w + lo) / 2 for w, lo in zip(TOKENS_W, TOKENS_L)) / len(TOKENS_W)
    by_length = rules.FROZEN.kappa_len / mean_tokens
    mis_ranked = sorted(-d for d in expected["_d0"] if d < 0)
    by_flip = rules.FROZEN.kappa_flip / statistics.median(mis_ranked)
    self_beta, length_rule, flip_rule = rules.beta_self(c)
    assert (length_rule, flip_rule, self_beta) == pytest.approx(
        (by_length, by_flip, math.sqrt(by_length * by_flip)), abs=TOL)
    for lam in (1.0, 0.4):
        target = sum(max(lam * a, 0.0) for a in expected["_adv"]) / len(expected["_adv"])
        slack = max(rules.FROZEN.kappa_budget / self_beta - target, rules.FROZEN.min_slack)
        beta = min(max(1 / slack, self_beta), rules.FROZEN.beta_max)
        assert rules.beta_reference(margins(c).advantage, lam, self_beta) == pytest.approx(beta, abs=TOL)
        share = sum(1 for a in expected["_adv"] if beta * abs(lam * a) >= 2) / len(expected["_adv"])
        assert rules.saturated(margins(c).advantage, lam, beta) == pytest.approx(share, abs=TOL)
    assert rules.mixture_weight({"snr": 0.5, "signal": 0.7}) == 0.7
    assert rules.mixture_weight({"snr": -0.3, "signal": 0.7}) == 0.0


def test_the_uniform_reference_is_a_zero_margin():
    c = columns()
    free = Columns(c.self_chosen, c.self_rejected, None, None, c.bytes_chosen, c.bytes_rejected)
    m = margins(free)
    np.testing.assert_array_equal(m.delta_ref, 0.0)
    np.testing.assert_allclose(m.advantage, -m.delta_self, atol=TOL)
    assert scores(free, 0.1)["acc_ref"] == 0.5  # every margin a tie


def _synthetic(a: float, sigma: float, seed: int = 0, n: int = 3000) -> Columns:
    """Policy margins that rank the true reward at 60%, and a reference tilted by a·Δr* + σ·ε."""
    rng = np.random.default_rng(seed)
    reward_gap = np.abs(rng.normal(1.0, 1.0, n))  # r*_w − r*_l, mostly positive
    length_w, length_l = rng.integers(20, 200, n).astype(float), rng.integers(20, 200, n).astype(float)
    self_w = -0.1 * length_w + rng.normal(0, 2, n)
    self_l = -0.1 * length_l + rng.normal(0, 2, n)
    tilt = a * reward_gap + sigma * rng.normal(size=n)
    return Columns(self_w, self_l, self_w + np.minimum(tilt, 0), self_l - np.maximum(tilt, 0), length_w,
                   length_l, length_w / 4, length_l / 4, np.arange(n))


def test_a_label_aligned_reference_is_used_and_pure_noise_is_not():
    assert rules.advise(_synthetic(a=3.0, sigma=0.0)).verdict == "use"
    noise = rules.advise(_synthetic(a=0.0, sigma=5.0))
    assert noise.verdict == "dont" and noise.lam == 0.0 and noise.beta == noise.beta_self
