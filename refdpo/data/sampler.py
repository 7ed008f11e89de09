"""Which pairs each process sees: deterministic, resumable, identical across batch layouts.

An optimizer step consumes one *global batch* of `micro_batch * accumulate * world_size` pairs taken in order
from a per-epoch permutation seeded by (seed, epoch). How the global batch is split into micro-batches and
processes does not change which pairs form a step, so 8x1, 4x2, 2x4 and two processes x 4 all train on the
same steps, and resuming at (epoch, step) needs no sampler state. The last global batch of an epoch is filled
up with weight-0 repeats so every process runs the same number of micro-batches (collectives stay in step)
while the padding contributes nothing to the loss or the metrics.

Given the pairs' token counts, the split is by length: the global batch is sorted longest first and dealt to
the processes like cards (process r takes places r, r + W, r + 2W, ...), so every process gets about the same
number of tokens and none waits for another at the gradient all-reduce; each process then cuts its hand into
micro-batches of neighbouring lengths, which keeps padded batches short and packed rows full.
"""

from __future__ import annotations

import math

import numpy as np

MicroBatch = tuple[np.ndarray, np.ndarray]  # (pair indices, weights in {0, 1})


class PairSampler:
    def __init__(self, num_pairs: int, micro_batch: int, accumulate: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, shuffle: bool = True, lengths: np.ndarray | None = None):
        """`lengths`: each pair's token count ([num_pairs]); when given, steps are split by length (above)."""
        if num_pairs <= 0:
            raise ValueError("no pairs to sample from")
        if lengths is not None and len(lengths) != num_pairs:
            raise ValueError(f"{len(lengths)} lengths for {num_pairs} pairs")
        self.num_pairs, self.micro_batch, self.accumulate = num_pairs, micro_batch, accumulate
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.global_batch = micro_batch * accumulate * world_size
        self.steps_per_epoch = math.ceil(num_pairs / self.global_batch)
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)
            else:
                self._order = np.arange(self.num_pairs)
            self._epoch = epoch
        return self._order

    def step(self, epoch: int, step: int) -> tuple[list[MicroBatch], int]:
        """This process's micro-batches for optimizer step `step` of `epoch`, and the step's real pair count."""
        order = self.order(epoch)
        chosen = order[step * self.global_batch:(step + 1) * self.global_batch]
        valid = len(chosen)
        weights = np.zeros(self.global_batch)
        weights[:valid] = 1.0
        indices = np.concatenate([chosen, np.full(self.global_batch - valid, chosen[0])])
        if self.lengths is None:
            micro = []
            for a in range(self.accumulate):
                slot = (a * self.world_size + self.rank) * self.micro_batch
                micro.append((indices[slot:slot + self.micro_batch], weights[slot:slot + self.micro_batch]))
            return micro, valid
        longest_first = np.argsort(-self.lengths[indices], kind="stable")
        hand = longest_first[self.rank::self.world_size]
        return [(indices[part], weights[part]) for part in np.split(hand, self.accumulate)], valid


def eval_batches(num_pairs: int, batch_size: int, world_size: int = 1, rank: int = 0,
                 lengths: np.ndarray | None = None) -> list[MicroBatch]:
    """This process's share of an evaluation pass: every pair exactly once across processes, and the same
    number of batches on every process (weight-0 padding), so sharded models can run their collectives.
    Given the pairs' token counts, pairs are dealt longest first, so batches hold pairs of similar length."""
    per_rank = math.ceil(num_pairs / world_size)
    if lengths is None:
        lo = rank * per_rank
        mine = np.arange(lo, min(lo + per_rank, num_pairs))
    else:
        mine = np.argsort(-np.asarray(lengths), kind="stable")[rank::world_size]
    filler = mine[-1] if len(mine) else 0  # weight 0; the shortest pair, where lengths are known
    padded = np.concatenate([mine, np.full(per_rank - len(mine), filler)]).astype(np.int64)
    weights = np.concatenate([np.ones(len(mine)), np.zeros(per_rank - len(mine))])
    return [(padded[i:i + batch_size], weights[i:i + batch_size]) for i in range(0, per_rank, batch_size)]
