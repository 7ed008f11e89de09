"""Preference objectives: small pure functions of summed sequence log-probs.

Inputs are per-pair tensors of shape [B]: the policy's summed log-probs of the chosen (y_w) and rejected (y_l)
responses, the reference's (stored, precomputed), and, where an objective normalises by length, the response
token counts. Each returns (losses [B], chosen_rewards [B], rejected_rewards [B]); rewards are detached and are
the implicit rewards whose difference the loss acts on.

Reference-free training ("posterior probability" reward, Liu et al. 2024 Eq. 9-10) is `dpo` with the reference
terms set to zero, i.e. a uniform reference. "Likelihood" (prior as reference, Eq. 13-16) is `dpo` on prior
log-probs log p_LM(y): a choice of data, not of loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("dpo", "cdpo", "ipo", "hinge", "simpo")
LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # losses [B], chosen_rewards [B], rejected_rewards [B]


def _logratios(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor) -> torch.Tensor:
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def _rewards(beta: float, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7; Liu et al. 2024 Eq. 5), with conservative label smoothing (cDPO).

        h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]
        loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    eps = label_smoothing = 0 is plain DPO; eps > 0 treats each label as flipped with probability eps
    (Mitchell 2023, "A note on DPO with noisy preferences"). Rewards: beta * (log pi - log ref).
    """
    h = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17), on summed log-probs as in the original DPO code:

        loss = (h - 1 / (2 * beta))^2,   h as in DPO (beta plays the role of IPO's tau).
    """
    h = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (h - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def hinge_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, beta: float) -> LossOutput:
    """Hinge loss on the DPO margin (SLiC, Zhao et al. 2023; RSO, Liu et al. 2023, Eq. 8):

        loss = max(0, 1 - beta * h)
    """
    h = _logratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * h)
    return (losses, *_rewards(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected))


def simpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_length: torch.Tensor,
               rejected_length: torch.Tensor, beta: float, gamma: float) -> LossOutput:
    """SimPO (Meng et al. 2024, Eq. 6): reference-free, length-normalised, with a target margin gamma.

        loss = -log sigma(beta / |y_w| * log pi(y_w|x) - beta / |y_l| * log pi(y_l|x) - gamma)

    |y| is the number of response tokens. Rewards: beta * log pi(y|x) / |y|.
    """
    chosen_rewards = beta * policy_chosen / chosen_length.clamp(min=1)
    rejected_rewards = beta * policy_rejected / rejected_length.clamp(min=1)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


@dataclass(frozen=True)
class Objective:
    """What the loss is: the objective's name, beta, its extra parameters and whether a reference is used."""

    name: str = "dpo"
    beta: float = 0.1
    ref_free: bool = False
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    weight: float = 1.0  # RefDPO's dpo_weight: a constant factor on the loss

    @property
    def uses_reference(self) -> bool:
        return not self.ref_free and self.name != "simpo"

    def __call__(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, chosen_length: torch.Tensor, rejected_length: torch.Tensor
                 ) -> LossOutput:
        """Per-pair (losses, chosen_rewards, rejected_rewards), with the reference zeroed when not used."""
        if not self.uses_reference:
            ref_chosen, ref_rejected = torch.zeros_like(policy_chosen), torch.zeros_like(policy_rejected)
        if self.name in ("dpo", "cdpo"):
            out = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta,
                           self.label_smoothing)
        elif self.name == "ipo":
            out = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        elif self.name == "hinge":
            out = hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta)
        elif self.name == "simpo":
            out = simpo_loss(policy_chosen, policy_rejected, chosen_length, rejected_length, self.beta,
                             self.simpo_gamma)
        else:
            raise ValueError(f"unknown objective {self.name!r}; choose one of {', '.join(OBJECTIVES)}")
        losses, chosen_rewards, rejected_rewards = out
        return self.weight * losses, chosen_rewards, rejected_rewards
