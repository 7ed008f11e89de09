"""The pair forward shared by training and evaluation, and a validation pass over a split.

`forward_pairs` turns one [chosen; rejected] batch into per-pair losses, rewards and log-probs: the policy's
summed response log-probs (core/logprobs.py) against the stored reference's, through the objective
(core/objectives.py). `evaluate_pairs` averages it over every pair of a split, each counted once across
processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from refdpo.core.logprobs import sequence_logprobs
from refdpo.core.metrics import PairStats
from refdpo.core.objectives import Objective
from refdpo.data import PairData, collate_pairs, eval_batches, to_device


def forward_pairs(model, batch: dict, objective: Objective, fused: bool = True) -> dict[str, torch.Tensor]:
    """One forward over the [chosen; rejected] batch -> per-pair losses, rewards, log-probs and lengths [B].

    Everything after the token log-probs is float64: sequence log-probs are sums of up to thousands of nats,
    and the loss depends on small differences between them and the stored reference's."""
    logps, lengths = sequence_logprobs(model, batch, fused=fused)
    n = batch["weights"].shape[0]
    policy_chosen, policy_rejected = logps[:n], logps[n:]
    chosen_length, rejected_length = lengths[:n], lengths[n:]
    losses, chosen_rewards, rejected_rewards = objective(policy_chosen, policy_rejected, batch["ref_chosen"],
                                                         batch["ref_rejected"], chosen_length, rejected_length)
    return {"losses": losses, "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards,
            "policy_chosen": policy_chosen.detach(), "policy_rejected": policy_rejected.detach(),
            "chosen_length": chosen_length, "rejected_length": rejected_length}


@torch.no_grad()
def evaluate_pairs(model, data: PairData, objective: Objective, accelerator, batch_size: int, pad_id: int,
                   fused: bool = True, prefix: str = "val_", collate: Callable = collate_pairs) -> dict[str, float]:
    """Mean metrics over every pair of `data`, sharded across processes (each pair counted exactly once), in
    batches of similar lengths, laid out by `collate` (core.verify.choose_collate)."""
    was_training = model.training
    model.eval()
    stats = PairStats(accelerator.device, objective.beta)
    for indices, weights in eval_batches(len(data), batch_size, accelerator.num_processes,
                                         accelerator.process_index, data.token_counts()):
        batch = to_device(collate(data, indices, weights, pad_id), accelerator.device)
        stats.add(forward_pairs(model, batch, objective, fused), batch["weights"], batch["num_tokens"])
    model.train(was_training)
    return stats.reduce(accelerator, prefix=prefix)
