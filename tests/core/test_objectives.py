"""Objectives against values computed by hand from their equations (float64, tolerance 1e-12)."""

from __future__ import annotations

import math

import pytest
import torch

from refdpo.core.objectives import Objective, dpo_loss, hinge_loss, ipo_loss, simpo_loss

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
TOL = 1e-12


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# One pair: policy chosen -10, rejected -12; reference -11 for both -> h = (1) - (-1) = 2.
PC, PR, RC, RR = T(-10.0), T(-12.0), T(-11.0), T(-11.0)


def test_dpo_hand_value():
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx(softplus(-0.2), abs=TOL)  # -log sigma(0.1 * 2)
    assert cr.item() == pytest.approx(0.1, abs=TOL) and rr.item() == pytest.approx(-0.1, abs=TOL)


def test_cdpo_label_smoothing_hand_value():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9 * softplus(-0.2) + 0.1 * softplus(0.2), abs=TOL)


def test_ipo_hand_value():
    losses, _, _ = ipo_loss(PC, PR, RC, RR, beta=0.1)
    assert losses.item() == pytest.approx((2 - 1 / 0.2) ** 2, abs=TOL)  # (h - 1/(2 beta))^2 = 9


def test_hinge_hand_values():
    assert hinge_loss(PC, PR, RC, RR, beta=0.1)[0].item() == pytest.approx(0.8, abs=TOL)  # 1 - 0.2
    assert hinge_loss(PC, PR, RC, RR, beta=1.0)[0].item() == 0.0  # margin 2 > 1: no loss


def test_simpo_hand_value():
    # beta/|y_w| log pi_w - beta/|y_l| log pi_l - gamma = 2*(-10/5) - 2*(-12/4) - 0.5 = 1.5
    losses, cr, rr = simpo_loss(PC, PR, T(5.0), T(4.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(softplus(-1.5), abs=TOL)
    assert cr.item() == pytest.approx(-4.0, abs=TOL) and rr.item() == pytest.approx(-6.0, abs=TOL)


def test_dpo_gradient_matches_closed_form():
    # d/d log pi(y_w) of -log sigma(beta h) = -beta * sigma(-beta h)
    pc = PC.clone().requires_grad_()
    dpo_loss(pc, PR, RC, RR, beta=0.1)[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.2)), abs=TOL)


def test_reference_equal_to_policy_gives_ln2_and_zero_rewards():
    pc, pr = T(-3.0, -150.5, -7.25), T(-4.0, -149.0, -7.25)
    losses, cr, rr = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.01)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=TOL, rtol=0)
    assert cr.abs().max().item() == 0.0 and rr.abs().max().item() == 0.0


def test_ref_free_ignores_the_reference():
    free = Objective("dpo", beta=0.5, ref_free=True)
    losses, cr, _ = free(PC, PR, T(-99.0), T(-1.0), T(5.0), T(4.0))
    expected = softplus(-0.5 * 2.0)  # h = log pi_w - log pi_l = 2 with a uniform reference
    assert losses.item() == pytest.approx(expected, abs=TOL)
    assert cr.item() == pytest.approx(0.5 * -10.0, abs=TOL)  # reward beta * log pi(y|x), Eq. 9
    assert not free.uses_reference and Objective("simpo").uses_reference is False


def test_objective_dispatch_and_dpo_weight():
    for name, fn in (("dpo", lambda: dpo_loss(PC, PR, RC, RR, 0.1)), ("ipo", lambda: ipo_loss(PC, PR, RC, RR, 0.1)),
                     ("hinge", lambda: hinge_loss(PC, PR, RC, RR, 0.1))):
        losses = Objective(name, beta=0.1, weight=2.5)(PC, PR, RC, RR, T(5.0), T(4.0))[0]
        assert losses.item() == pytest.approx(2.5 * fn()[0].item(), abs=TOL)
    cdpo = Objective("cdpo", beta=0.1, label_smoothing=0.1)(PC, PR, RC, RR, T(5.0), T(4.0))[0]
    assert cdpo.item() == pytest.approx(dpo_loss(PC, PR, RC, RR, 0.1, 0.1)[0].item(), abs=TOL)
    with pytest.raises(ValueError, match="unknown objective"):
        Objective("nope")(PC, PR, RC, RR, T(5.0), T(4.0))


def test_batched_shapes():
    pc, pr = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    for out in (dpo_loss(pc, pr, pc * 0, pr * 0, 0.1), simpo_loss(pc, pr, T(*[3.0] * 7), T(*[2.0] * 7), 2.0, 0.5)):
        assert all(t.shape == (7,) for t in out)
