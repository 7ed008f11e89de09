"""Pairs -> one padded batch: the B chosen sequences, then the B rejected ones, in a single [2B, T] forward.

Sequences are right-padded, so each keeps its own positions 0..L-1 and its log-prob does not depend on what
it is batched with (the original left-then-right padding with no position ids did). Position ids are passed
explicitly all the same: they are what a packed (padding-free) batch resets per sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from refdpo.data.pairs import PairData


def collate_pairs(data: PairData, indices: np.ndarray, weights: np.ndarray, pad_id: int,
                  pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Build the model inputs and the per-pair tensors for `indices` (with `weights`, 0 for padding pairs).

    Returns input_ids/attention_mask/position_ids [2B, T]; response_start/lengths [2B]; ref_chosen/ref_rejected/
    weights float64 [B] (reference zeros when the data has none); num_tokens, the non-padding token count.
    """
    seqs = [data.chosen[i] for i in indices] + [data.rejected[i] for i in indices]
    lengths = [len(s.input_ids) for s in seqs]
    width = max(lengths)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, :lengths[row]] = torch.from_numpy(seq.input_ids)
        attention_mask[row, :lengths[row]] = 1
    if data.ref_chosen is not None:
        ref_chosen, ref_rejected = data.ref_chosen[indices], data.ref_rejected[indices]
    else:
        ref_chosen = ref_rejected = np.zeros(len(indices))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(width).expand(len(seqs), width).contiguous(),
        "response_start": torch.tensor([s.response_start for s in seqs], dtype=torch.long),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "ref_chosen": torch.tensor(ref_chosen, dtype=torch.float64),
        "ref_rejected": torch.tensor(ref_rejected, dtype=torch.float64),
        "weights": torch.tensor(weights, dtype=torch.float64),
        "num_tokens": attention_mask.sum(),
    }


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move a collated batch's tensors to `device`."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
