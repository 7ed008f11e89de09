"""Reference log-probs for preference pairs: the summed log-prob of each chosen and rejected response under a
reference model, with the reference's own tokenizer and template (only a scalar per response crosses over to
the policy, so any vocabulary works).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from refdpo.data import PairData, collate_pairs, to_device
from refdpo.logprobs import sequence_logprobs


@torch.no_grad()
def score_pairs(model: torch.nn.Module, data: PairData, pad_id: int, batch_size: int = 8,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed response log-probs, float64 [N], in the order of `data`."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chosen, rejected = np.empty(len(data)), np.empty(len(data))
    for lo in tqdm(range(0, len(data), batch_size), desc="score", disable=not progress):
        indices = np.arange(lo, min(lo + batch_size, len(data)))
        batch = to_device(collate_pairs(data, indices, np.ones(len(indices)), pad_id), device)
        logps = sequence_logprobs(model, batch)[0].cpu().numpy()
        chosen[indices], rejected[indices] = logps[:len(indices)], logps[len(indices):]
    model.train(was_training)
    return chosen, rejected
