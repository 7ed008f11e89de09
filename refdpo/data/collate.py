"""Pairs -> one padded batch: the B chosen sequences, then the B rejected ones, in a single [2B, T] forward.
For scoring (no gradient), `collate_shared` instead packs each pair as one row, prompt once.

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


def collate_packed(data: PairData, indices: np.ndarray, weights: np.ndarray, pad_id: int, capacity: int = 0,
                   pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """The pairs' 2B sequences packed into rows without padding between them (padding-free training).

    Each row holds whole sequences back to back, position ids restarting at 0 for each, and no attention mask:
    transformers then derives a block-diagonal causal mask from the position ids (a varlen kernel with
    flash-attention), so every sequence sees only itself, exactly as in its own padded row. Rows hold at most
    max(`capacity`, longest sequence) tokens: wider rows waste less padding but cost more attention on a CPU,
    where the mask is dense. Sequence k (chosen of pair k, then rejected of pair k at B + k) gets its response
    log-probs from the positions flat_index with segment == k, as in `collate_shared`.

    Returns input_ids/position_ids [R, W]; flat_index/targets/segment [M]; response_start/lengths [2B] (of each
    sequence on its own); ref_chosen/ref_rejected/weights float64 [B]; num_tokens.
    """
    padded = collate_pairs(data, indices, weights, pad_id, 1)  # the per-pair tensors, and the sequences
    lengths = padded["lengths"].tolist()
    starts = padded["response_start"].tolist()
    rows = pack_rows(lengths, max(capacity, max(lengths)))
    width = -(-max(sum(lengths[k] for k in row) for row in rows) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)  # the padded tail counts as one more sequence
    flat_index, targets, segment = [], [], []
    for r, row in enumerate(rows):
        offset = 0
        for k in row:
            n, s = lengths[k], starts[k]
            seq = padded["input_ids"][k, :n]
            input_ids[r, offset:offset + n] = seq
            position_ids[r, offset:offset + n] = torch.arange(n)
            position_ids[r, offset + n:] = torch.arange(width - offset - n)
            flat_index.append(torch.arange(r * width + offset + s - 1, r * width + offset + n - 1))
            targets.append(seq[s:])
            segment.append(torch.full((n - s,), k, dtype=torch.long))
            offset += n
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "flat_index": torch.cat(flat_index),
        "targets": torch.cat(targets),
        "segment": torch.cat(segment),
        **{key: padded[key] for key in ("response_start", "lengths", "ref_chosen", "ref_rejected", "weights",
                                        "num_tokens")},
    }


def shares_prompt(data: PairData, i: int) -> bool:
    """Do pair i's chosen and rejected sequences start with the same tokenised prompt?"""
    c, r = data.chosen[i], data.rejected[i]
    p = c.response_start
    return p >= 1 and r.response_start == p and bool(np.array_equal(c.input_ids[:p], r.input_ids[:p]))


def collate_shared(data: PairData, indices: np.ndarray, pad_id: int, mask_dtype: torch.dtype = torch.bool,
                   pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """One row per pair, [prompt | chosen response | rejected response], the prompt computed once.

    Every pair must satisfy `shares_prompt`. The rejected response's positions restart after the prompt, and a
    custom 4D mask lets each response attend to the prompt and to its own earlier tokens only, so each log-prob
    is the one of the pair's own [prompt | response] sequence. The last prompt position predicts the first
    token of both responses.

    Returns input_ids/position_ids [B, W]; attention_mask [B, 1, W, W] (bool: True attends; a float dtype:
    0 or the most negative value, for eager attention); flat_index/targets/segment [M] (prediction position
    in the flattened [B*W] batch, its target token, and which sum it belongs to: pair b's chosen response is
    segment b, its rejected one B + b); num_tokens, the tokens of the unshared chosen + rejected sequences.
    """
    b = len(indices)
    parts, widths = [], []
    for i in indices:
        c, r = data.chosen[i], data.rejected[i]
        p = c.response_start
        parts.append((c.input_ids[:p], c.input_ids[p:], r.input_ids[p:]))
        widths.append(len(c.input_ids) + len(r.input_ids) - p)
    width = -(-max(widths) // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    segments = torch.full((b, width), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 padding
    flat_index, targets, segment = [], [], []
    for row, (prompt, chosen, rejected) in enumerate(parts):
        p, nc, nr = len(prompt), len(chosen), len(rejected)
        input_ids[row, :p + nc + nr] = torch.from_numpy(np.concatenate([prompt, chosen, rejected]))
        position_ids[row, :p + nc] = torch.arange(p + nc)
        position_ids[row, p + nc:p + nc + nr] = torch.arange(p, p + nr)
        segments[row, :p], segments[row, p:p + nc], segments[row, p + nc:p + nc + nr] = 0, 1, 2
        base = row * width
        chosen_from = np.arange(p - 1, p + nc - 1)  # position p-1+k predicts chosen token k
        rejected_from = np.concatenate([[p - 1], np.arange(p + nc, p + nc + nr - 1)])
        flat_index += [base + chosen_from, base + rejected_from]
        targets += [chosen, rejected]
        segment += [np.full(nc, row), np.full(nr, b + row)]
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & ((k == 0) | (k == q)) & (q >= 0) & (k >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding query attends to itself: no all-masked row
    allowed = allowed[:, None]
    if mask_dtype != torch.bool:
        allowed = torch.zeros(allowed.shape, dtype=mask_dtype).masked_fill_(~allowed, torch.finfo(mask_dtype).min)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": allowed,
        "flat_index": torch.from_numpy(np.concatenate(flat_index)).long(),
        "targets": torch.from_numpy(np.concatenate(targets)).long(),
        "segment": torch.from_numpy(np.concatenate(segment)).long(),
        "num_tokens": torch.tensor(sum(data.num_tokens(i) for i in indices)),
    }


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move a collated batch's tensors to `device`."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
