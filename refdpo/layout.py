"""Which batch layout a model trains and evaluates on: packed rows with each pair's prompt computed once (a
custom mask: sdpa, eager), packed rows of whole sequences (position ids restart: flash-attention's varlen
kernel, or where the custom mask cannot be used), or padded rows. A packed layout is used only after it
reproduced the padded one on real pairs of this data with this model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from refdpo.data import PairData, collate_packed, collate_pairs, to_device
from refdpo.logprobs import agreement_tolerance, low_precision, sequence_logprobs
from refdpo.modeling import custom_mask_problem, mask_dtype

log = logging.getLogger(__name__)


@torch.no_grad()
def packing_works(model, data: PairData, pad_id: int, device: torch.device, fused: bool,
                  layout: dict, low_precision_compute: bool | None = None) -> tuple[bool, float]:
    """Do packed rows give every sequence the log-prob of its own padded row? A model whose attention ignores
    the position-id restarts, or the custom mask, would let packed sequences see each other: checked once, on
    two real pairs packed into a single row, before trusting it. Returns (ok, max abs difference)."""
    indices = np.arange(min(2, len(data)))
    weights = np.ones(len(indices))
    was_training = model.training
    model.eval()
    try:
        padded = sequence_logprobs(model, to_device(collate_pairs(data, indices, weights, pad_id), device), fused)[0]
        packed = collate_packed(data, indices, weights, pad_id, **{**layout, "capacity": 1 << 30})
        packed = sequence_logprobs(model, to_device(packed, device), fused)[0]
    finally:
        model.train(was_training)
    diff = (packed - padded).abs().max().item()
    low = low_precision(model) if low_precision_compute is None else low_precision_compute
    return diff <= agreement_tolerance(padded.abs().max().item(), low), diff


def choose_collate(model, data: PairData, pad_id: int, device: torch.device, fused: bool, packing: bool = True,
                   pack_capacity: int = 0, longest: int = 0, low_precision_compute: bool | None = None) -> Callable:
    """The collate function (data, indices, weights, pad_id) -> batch for this model; `longest`: the most
    tokens of any pair it will see, when other data (a validation split) comes after `data`;
    `low_precision_compute`: it computes in bf16/fp16 (default: its weights' dtype says)."""
    if not packing:
        return collate_pairs
    inner = getattr(model, "module", model)  # under a DDP/DeepSpeed wrapper: the model that has the config
    problem = custom_mask_problem(inner, max(longest, int(data.token_counts().max())))
    flash = getattr(inner.config, "_attn_implementation", "") == "flash_attention_2"
    layouts = ([] if problem else [{"mask_dtype": mask_dtype(inner)}]) + [{"mask_dtype": None}]
    for layout in layouts:
        ok, diff = packing_works(model, data, pad_id, device, fused, layout, low_precision_compute)
        if ok:
            capacity = pack_capacity or (1 << 30 if flash and layout["mask_dtype"] is None else 0)
            return partial(collate_packed, capacity=capacity, **layout)
        log.warning("packed layout %s disagrees with padded rows for this model (max diff %.2g)", layout, diff)
    log.warning("running without packing")
    return collate_pairs
