"""The one start-up check of the fast paths: each optimisation is used only after it reproduced the plain
computation on real pairs of this data, with this model, within one tolerance (`agreement_tolerance`).

  the tiled LM head     against the model's own logits (`head_matches_model`)
  packed rows           against padded rows: a model whose attention ignores position-id restarts or the custom
                        mask would let packed sequences see each other (`packing_works`, `choose_collate`)
  shared-prompt rows    the same check, for scoring (commands/score.py's `decide_layout`)

Two computations of the same summed log-probs differ by rounding alone within AGREE_ATOL nats, growing with the
sums past 100 nats; in bfloat16/float16 (weights, autocast, or an FSDP2/ZeRO-3 bf16 policy) LOW_PRECISION_FACTOR
times that. Measured on an H200, 0.5B random Llama, sums of ~400 nats: layouts differed by up to 0.037 nats in
bf16 (float32 tolerance there: 0.004; bf16: 0.13). A layout or head that is actually wrong (sequences seeing
each other, a missed logit transform) is off by nats.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from refdpo.core.lm_head import redirectable
from refdpo.core.logprobs import sequence_logprobs
from refdpo.data import UNBOUNDED, PairData, collate_packed, collate_pairs, to_device
from refdpo.modeling import custom_mask_problem, mask_dtype

log = logging.getLogger(__name__)
AGREE_ATOL = 1e-3
LOW_PRECISION_FACTOR = 32


def low_precision(model: torch.nn.Module) -> bool:
    """Are the model's weights in bfloat16/float16? (Mixed precision is the caller's to say.)"""
    return next(model.parameters()).dtype in (torch.bfloat16, torch.float16)


def agreement_tolerance(largest: float, low_precision: bool) -> float:
    """Tolerance in nats for comparing summed log-probs whose largest magnitude is `largest` (see above)."""
    return AGREE_ATOL * max(1.0, largest / 100) * (LOW_PRECISION_FACTOR if low_precision else 1)


def agrees(plain: torch.Tensor | np.ndarray, fast: torch.Tensor | np.ndarray, low: bool) -> tuple[bool, float]:
    """(does `fast` reproduce `plain` within the tolerance?, max abs difference), for summed log-probs."""
    plain, fast = torch.as_tensor(plain, dtype=torch.float64), torch.as_tensor(fast, dtype=torch.float64)
    if not plain.numel():
        return True, 0.0
    diff = (fast.cpu() - plain.cpu()).abs().max().item()
    return diff <= agreement_tolerance(plain.abs().max().item(), low), diff


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode (dropout would make two forwards differ) for the block, its own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def head_matches_model(model: torch.nn.Module, batch: dict, low_precision_compute: bool | None = None
                       ) -> tuple[bool, float]:
    """Does the redirected head give the model's own log-probs on `batch`? Returns (ok, max abs difference);
    an architecture the redirection cannot handle at all is (False, inf), with the reason logged.
    `low_precision_compute`: the model computes in bf16/fp16 (default: its weights' dtype says)."""
    if not redirectable(model):
        return False, math.inf
    low = low_precision(model) if low_precision_compute is None else low_precision_compute
    with evaluating(model):
        plain = sequence_logprobs(model, batch, fused=False)[0]
        try:
            fused = sequence_logprobs(model, batch, fused=True)[0]
        except Exception as e:  # any failure of the redirection means: use the model's own logits
            log.warning("chunked LM head unusable for this model: %s", e)
            return False, math.inf
    return agrees(plain, fused, low)


@torch.no_grad()
def packing_works(model, data: PairData, pad_id: int, device: torch.device, fused: bool,
                  layout: dict, low_precision_compute: bool | None = None) -> tuple[bool, float]:
    """Do packed rows give every sequence the log-prob of its own padded row? Checked once, on two real pairs
    packed into a single row. Returns (ok, max abs difference)."""
    indices = np.arange(min(2, len(data)))
    weights = np.ones(len(indices))
    low = low_precision(model) if low_precision_compute is None else low_precision_compute
    with evaluating(model):
        padded = sequence_logprobs(model, to_device(collate_pairs(data, indices, weights, pad_id), device), fused)[0]
        packed = collate_packed(data, indices, weights, pad_id, **{**layout, "capacity": UNBOUNDED})
        packed = sequence_logprobs(model, to_device(packed, device), fused)[0]
    return agrees(padded, packed, low)


def choose_collate(model, data: PairData, pad_id: int, device: torch.device, fused: bool, packing: bool = True,
                   pack_capacity: int = 0, longest: int = 0, low_precision_compute: bool | None = None) -> Callable:
    """The collate function (data, indices, weights, pad_id) -> batch for this model: packed rows with each
    pair's prompt computed once (a custom mask: sdpa, eager), packed rows of whole sequences (position ids
    restart: flash-attention's varlen kernel, or where the custom mask cannot be used), or padded rows.
    `longest`: the most tokens of any pair it will see, when other data (a validation split) comes after
    `data`; `low_precision_compute`: it computes in bf16/fp16 (default: its weights' dtype says)."""
    if not packing:
        return collate_pairs
    inner = getattr(model, "module", model)  # under a DDP/DeepSpeed wrapper: the model that has the config
    problem = custom_mask_problem(inner, max(longest, int(data.token_counts().max())))
    flash = getattr(inner.config, "_attn_implementation", "") == "flash_attention_2"
    layouts = ([] if problem else [{"mask_dtype": mask_dtype(inner)}]) + [{"mask_dtype": None}]
    for layout in layouts:
        ok, diff = packing_works(model, data, pad_id, device, fused, layout, low_precision_compute)
        if ok:
            capacity = pack_capacity or (UNBOUNDED if flash and layout["mask_dtype"] is None else 0)
            return partial(collate_packed, capacity=capacity, **layout)
        log.warning("packed layout %s disagrees with padded rows for this model (max diff %.2g)", layout, diff)
    log.warning("running without packing")
    return collate_pairs
