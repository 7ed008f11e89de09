"""Response log-probabilities: log p(y|x) = sum over response tokens of log_softmax(logits)[token].

Token log-probs are computed in float32 and summed in float64: a 2,000-token reply sums to thousands of nats,
where float32 can only resolve about 2e-4, more than the 1e-4 nats the sums must agree with float64 to.

The one implementation every command uses (training, evaluation, scoring references, analysis, check): the
model runs its own forward and its output head is the tiled one of `core/lm_head.py` (`fused=True`), or the
model's own logits normalised in float32 chunks (`fused=False`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from refdpo.console import progress_bar
from refdpo.core.lm_head import (
    CHUNK_ELEMENTS,
    chunked_target_logprobs,
    head_transform,
    redirect_head,
    redirectable,
    unwrap,
)
from refdpo.data import PairData, collate_pairs, to_device
from refdpo.modeling import input_device


def prediction_mask(response_start: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[N, T] bool: position p is selected when it predicts a response token, i.e. start-1 <= p < length-1."""
    positions = torch.arange(width, device=response_start.device)
    return (positions >= (response_start - 1).unsqueeze(1)) & (positions < (lengths - 1).unsqueeze(1))


def _chunk_rows(vocab: int, chunk_elements: int | None) -> int:
    return max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab)


def token_logprobs_at(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      position_ids: torch.Tensor, flat_index: torch.Tensor, targets: torch.Tensor,
                      fused: bool = True, chunk_elements: int | None = None) -> torch.Tensor:
    """float32 [M]: for each m, log p(targets[m]) predicted at flat position flat_index[m] of the [N, T] batch.

    The general form: a position may predict several targets (a prompt shared by two responses predicts the
    first token of each), and `attention_mask` may be a custom 4D mask [N, 1, T, T] (see data/collate.py: collate_packed)."""
    call = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if fused and redirectable(model):
        scale, softcap = head_transform(model)

        def compute(head, hidden):
            # Under a device map the head may sit on another device than the last layer.
            device = head.weight.device
            rows = hidden.reshape(-1, hidden.shape[-1]).to(device)[flat_index.to(device)]
            return chunked_target_logprobs(rows, head.weight, targets.to(device), head.bias, scale, softcap,
                                           chunk_elements)

        with redirect_head(model, compute) as captured:
            model(**call)
        if "out" not in captured:
            raise RuntimeError(f"{type(unwrap(model)).__name__}'s forward never called its output embeddings; "
                               "use fused=False")
        return captured["out"].to(input_ids.device)
    logits = model(**call).logits
    rows = logits.reshape(-1, logits.shape[-1])[flat_index.to(logits.device)]
    return _chunked_log_softmax_gather(rows, targets.to(logits.device), chunk_elements).to(input_ids.device)


def response_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            position_ids: torch.Tensor, response_start: torch.Tensor, lengths: torch.Tensor,
                            fused: bool = True, chunk_elements: int | None = None) -> torch.Tensor:
    """[N, T] float32: at position p, log p(input_ids[p+1] | input_ids[:p+1]) where that token belongs to the
    response (span [response_start, length)), 0 elsewhere. Summing over T gives the sequence log-prob."""
    mask = prediction_mask(response_start, lengths, input_ids.shape[1])
    flat_index = mask.reshape(-1).nonzero().squeeze(1)
    targets = input_ids.roll(-1, dims=1)[mask]
    token_lp = token_logprobs_at(model, input_ids, attention_mask, position_ids, flat_index, targets, fused,
                                 chunk_elements)
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, token_lp)


def _gather_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)


def _chunked_log_softmax_gather(logits: torch.Tensor, targets: torch.Tensor,
                                chunk_elements: int | None) -> torch.Tensor:
    """The fallback path: the model's own logits [M, V], normalised in float32 one checkpointed chunk at a time."""
    rows = _chunk_rows(logits.shape[1], chunk_elements)
    parts = []
    for lo in range(0, logits.shape[0], rows):
        args = (logits[lo:lo + rows], targets[lo:lo + rows])
        parts.append(checkpoint(_gather_logprob, *args, use_reentrant=False) if logits.requires_grad
                     else _gather_logprob(*args))
    return torch.cat(parts) if parts else logits.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(model: torch.nn.Module, batch: dict, fused: bool = True,
                      chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs [N] (float64 sums of float32 token log-probs) and response token counts [N],
    from a padded batch (collate_pairs) or a packed one (collate_packed: it carries flat_index/segment)."""
    counts = (batch["lengths"] - batch["response_start"]).clamp(min=0)
    if "segment" in batch:
        token_lp = token_logprobs_at(model, batch["input_ids"], batch.get("attention_mask"), batch["position_ids"],
                                     batch["flat_index"], batch["targets"], fused, chunk_elements)
        sums = torch.zeros(len(counts), dtype=torch.float64, device=token_lp.device)
        return sums.index_add(0, batch["segment"], token_lp.double()), counts
    token_lp = response_token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"],
                                       batch["response_start"], batch["lengths"], fused, chunk_elements)
    return token_lp.sum(dim=1, dtype=torch.float64), counts


def reference_logprobs_float64(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The plain computation every optimisation is checked against: full float64 logits, log_softmax, gather.

    `model` must already be in float64. For tests and checks on small inputs only."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).logits.double()
        logp = F.log_softmax(logits[:, :-1], dim=-1).gather(2, batch["input_ids"][:, 1:, None]).squeeze(2)
        mask = prediction_mask(batch["response_start"], batch["lengths"], batch["input_ids"].shape[1])[:, :-1]
        return (logp * mask).sum(dim=1)


@dataclass
class TokenLogprobs:
    """Every response position of a split: its target token, log-prob, side and pair, and whether it is the
    sequence's end token (the last response token of an untruncated sequence)."""

    targets: np.ndarray  # int64 [M]
    logprobs: np.ndarray  # float64 [M]
    side: np.ndarray  # int8 [M]: 0 chosen, 1 rejected
    pair: np.ndarray  # int64 [M]
    is_end: np.ndarray  # bool [M]


@torch.inference_mode()
def token_logprobs(model: torch.nn.Module, data: PairData, pad_id: int, batch_size: int = 8,
                   desc: str = "log-probs") -> TokenLogprobs:
    device = input_device(model)
    parts: dict[str, list] = {k: [] for k in ("targets", "logprobs", "side", "pair", "is_end")}
    for lo in progress_bar(range(0, len(data), batch_size), desc=desc, dynamic_ncols=True, leave=False):
        idx = np.arange(lo, min(lo + batch_size, len(data)))
        b = to_device(collate_pairs(data, idx, np.ones(len(idx)), pad_id), device)
        lp = response_token_logprobs(model, b["input_ids"], b["attention_mask"], b["position_ids"],
                                     b["response_start"], b["lengths"])
        mask = prediction_mask(b["response_start"], b["lengths"], b["input_ids"].shape[1])
        rows, cols = mask.nonzero(as_tuple=True)
        n = len(idx)
        seqs = [data.chosen[i] for i in idx] + [data.rejected[i] for i in idx]
        untruncated = torch.tensor([s.full_length == len(s.input_ids) for s in seqs], device=device)
        parts["targets"].append(b["input_ids"].roll(-1, dims=1)[rows, cols].cpu().numpy())
        parts["logprobs"].append(lp[rows, cols].double().cpu().numpy())
        parts["side"].append((rows >= n).to(torch.int8).cpu().numpy())
        parts["pair"].append(idx[(rows % n).cpu().numpy()])
        parts["is_end"].append(((cols == b["lengths"][rows] - 2) & untruncated[rows]).cpu().numpy())
    return TokenLogprobs(**{k: np.concatenate(v) for k, v in parts.items()})
