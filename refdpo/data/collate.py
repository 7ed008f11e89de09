"""Pairs -> one batch: padded (the B chosen sequences, then the B rejected ones, in a single [2B, T] forward) or
packed (sequences back to back in rows, no padding between them; with a custom mask, each pair's prompt once:
training, evaluation, and scoring's shared-prompt rows, one pair a row).

Sequences are right-padded, so each keeps its own positions 0..L-1 and its log-prob does not depend on what
it is batched with (the original left-then-right padding with no position ids did). Position ids are passed
explicitly all the same: they are what a packed (padding-free) batch resets per sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from refdpo.data.pairs import PairData


class _Batch(Mapping):
    """A batch's tensors by name: fields typed and shaped below, and `batch["input_ids"]` as transformers'
    dicts (and the code that built them) index them."""

    def __getitem__(self, key: str):
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to(self, device: torch.device | str) -> _Batch:
        """The batch with its tensors on `device`."""
        return dataclasses.replace(self, **{k: v.to(device, non_blocking=True) for k, v in self.items()
                                            if torch.is_tensor(v)})


@dataclass
class PaddedBatch(_Batch):
    """B pairs as 2B right-padded rows, the chosen sequences then the rejected ones (collate_pairs)."""

    input_ids: torch.Tensor  # int64 [2B, T]
    attention_mask: torch.Tensor  # int64 [2B, T]: 1 on real tokens
    position_ids: torch.Tensor  # int64 [2B, T]
    response_start: torch.Tensor  # int64 [2B]: index of each sequence's first response token
    lengths: torch.Tensor  # int64 [2B]: real tokens of each sequence
    ref_chosen: torch.Tensor  # float64 [B]: stored reference log-probs (zeros when there are none)
    ref_rejected: torch.Tensor  # float64 [B]
    weights: torch.Tensor  # float64 [B]: 1 for a real pair, 0 for a pair that only fills the batch
    num_tokens: torch.Tensor  # int64 []: non-padding tokens


@dataclass
class PackedBatch(_Batch):
    """The same pairs' sequences packed back to back in R rows (collate_packed); sequence k's response log-probs
    are predicted at the flattened positions flat_index where segment == k (chosen of pair b: b, rejected: B + b)."""

    input_ids: torch.Tensor  # int64 [R, W]
    position_ids: torch.Tensor  # int64 [R, W]: restarting at each sequence (or after each shared prompt)
    attention_mask: torch.Tensor | None  # None (position ids say it all), or bool/float [R, 1, W, W]
    flat_index: torch.Tensor  # int64 [M]: positions in the flattened [R * W] rows that predict a response token
    targets: torch.Tensor  # int64 [M]: the token each of them predicts
    segment: torch.Tensor  # int64 [M]: which of the 2B sequences it belongs to
    response_start: torch.Tensor  # int64 [2B], of each sequence on its own
    lengths: torch.Tensor  # int64 [2B]
    ref_chosen: torch.Tensor  # float64 [B]
    ref_rejected: torch.Tensor  # float64 [B]
    weights: torch.Tensor  # float64 [B]
    num_tokens: torch.Tensor  # int64 []: tokens of the sequences unshared, as collate_pairs counts them



def collate_pairs(data: PairData, indices: np.ndarray, weights: np.ndarray, pad_id: int,
                  pad_to_multiple_of: int = 8) -> PaddedBatch:
    """The model inputs and the per-pair tensors for `indices` (with `weights`, 0 for padding pairs)."""
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
    return PaddedBatch(
        input_ids=input_ids, attention_mask=attention_mask,
        position_ids=torch.arange(width).expand(len(seqs), width).contiguous(),
        response_start=torch.tensor([s.response_start for s in seqs], dtype=torch.long),
        lengths=torch.tensor(lengths, dtype=torch.long),
        ref_chosen=torch.tensor(ref_chosen, dtype=torch.float64),
        ref_rejected=torch.tensor(ref_rejected, dtype=torch.float64),
        weights=torch.tensor(weights, dtype=torch.float64), num_tokens=attention_mask.sum())


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sequence indices grouped into rows of at most `capacity` tokens (a sequence
    longer than that gets a row of its own). Deterministic: ties keep the original order."""
    rows, room = [], []
    for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, free in enumerate(room):
            if lengths[k] <= free:
                rows[r].append(k)
                room[r] -= lengths[k]
                break
        else:
            rows.append([k])
            room.append(capacity - lengths[k])
    return rows


def _prefix_mask(unit: torch.Tensor, part: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """[R, 1, W, W] attention mask from per-position labels [R, W]: `unit` (-1 for padding) and `part` (0 for
    the unit's shared prefix, k for its k-th response). A query attends to earlier keys of its own unit that are
    the prefix or its own part; a padding query to itself only (no all-masked row). bool: True attends; a float
    dtype: 0 or the most negative value (eager attention)."""
    width = unit.shape[1]
    q_unit, k_unit, q_part, k_part = unit[:, :, None], unit[:, None, :], part[:, :, None], part[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (q_unit == k_unit) & (q_unit >= 0) & ((k_part == 0) | (k_part == q_part))
    mask = (mask | torch.eye(width, dtype=torch.bool))[:, None]
    if mask_dtype != torch.bool:
        mask = torch.zeros(mask.shape, dtype=mask_dtype).masked_fill_(~mask, torch.finfo(mask_dtype).min)
    return mask


def collate_packed(data: PairData, indices: np.ndarray, weights: np.ndarray, pad_id: int, capacity: int = 0,
                   mask_dtype: torch.dtype | None = None, pad_to_multiple_of: int = 8) -> PackedBatch:
    """The pairs' sequences packed into rows without padding between them (padding-free training).

    A row holds whole units back to back. With `mask_dtype` None a unit is one sequence, its position ids
    restart at 0, and there is no attention mask: transformers derives a block-diagonal causal mask from the
    position ids (a varlen kernel with flash-attention). With a `mask_dtype`, a pair whose chosen and rejected
    sequences share their prompt is one unit [prompt | chosen | rejected], the prompt computed once (a fifth of
    the tokens at RefDPO's lengths), with an explicit [R, 1, W, W] mask in that dtype (bool: True attends; a
    float dtype: 0 or the most negative value, for eager attention) letting each response see the prompt and
    itself only, the rejected positions restarting after the prompt.
    Either way every sequence's log-probs are those of its own padded row.

    Rows hold at most max(`capacity`, longest unit) tokens (capacity 1: a unit a row): wider rows waste less
    padding but cost more attention where the mask is dense.
    """
    padded = collate_pairs(data, indices, weights, pad_id, 1)  # the per-pair tensors, and the sequences
    n = len(indices)
    units = []  # (prefix ids, [(segment, response ids)])
    for j, i in enumerate(indices):
        c, r = data.chosen[i], data.rejected[i]
        if mask_dtype is not None and shares_prompt(data, i):
            p = c.response_start
            units.append((c.input_ids[:p], [(j, c.input_ids[p:]), (n + j, r.input_ids[p:])]))
        else:
            for seg, e in ((j, c), (n + j, r)):
                units.append((e.input_ids[:e.response_start], [(seg, e.input_ids[e.response_start:])]))
    sizes = [len(prefix) + sum(len(resp) for _, resp in responses) for prefix, responses in units]
    rows = pack_rows(sizes, max(capacity, max(sizes)))
    width = -(-max(sum(sizes[u] for u in row) for row in rows) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)  # the padded tail counts as one more sequence
    unit_of = torch.full((len(rows), width), -1, dtype=torch.long)  # which unit a position belongs to
    part_of = torch.zeros((len(rows), width), dtype=torch.long)  # 0: prefix, k: its k-th response
    flat_index, targets, segment = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for u in row:
            prefix, responses = units[u]
            p = len(prefix)
            input_ids[r, at:at + p] = torch.from_numpy(prefix)
            position_ids[r, at:at + p] = torch.arange(p)
            unit_of[r, at:at + p] = u
            cursor = at + p
            for part, (seg, resp) in enumerate(responses, start=1):
                m = len(resp)
                input_ids[r, cursor:cursor + m] = torch.from_numpy(resp)
                position_ids[r, cursor:cursor + m] = torch.arange(p, p + m)
                unit_of[r, cursor:cursor + m], part_of[r, cursor:cursor + m] = u, part
                # The prompt's last position predicts each response's first token; then each its own next.
                first = [at + p - 1] if p else []
                flat_index.append(r * width + torch.tensor(first + list(range(cursor, cursor + m - 1)),
                                                           dtype=torch.long))
                targets.append(torch.from_numpy(resp[1 - len(first):]))
                segment.append(torch.full((m - 1 + len(first),), seg, dtype=torch.long))
                cursor += m
            position_ids[r, cursor:] = torch.arange(width - cursor)
            at = cursor
    mask = None if mask_dtype is None else _prefix_mask(unit_of, part_of, mask_dtype)
    return PackedBatch(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                       flat_index=torch.cat(flat_index), targets=torch.cat(targets).long(), segment=torch.cat(segment),
                       **{key: padded[key] for key in ("response_start", "lengths", "ref_chosen", "ref_rejected",
                                                       "weights", "num_tokens")})


def shares_prompt(data: PairData, i: int) -> bool:
    """Do pair i's chosen and rejected sequences start with the same tokenised prompt?"""
    c, r = data.chosen[i], data.rejected[i]
    p = c.response_start
    return p >= 1 and r.response_start == p and bool(np.array_equal(c.input_ids[:p], r.input_ids[:p]))


def to_device(batch: Mapping, device: torch.device | str) -> Mapping:
    """A batch's tensors moved to `device` (a PaddedBatch or PackedBatch stays one)."""
    if isinstance(batch, _Batch):
        return batch.to(device)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
