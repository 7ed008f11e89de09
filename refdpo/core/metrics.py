"""Pair metrics, aggregated exactly over micro-batches, optimizer steps and processes, and written to disk.

Per pair: loss, reward accuracy (r(y_w) > r(y_l)), policy accuracy (log pi(y_w) > log pi(y_l), the paper's
Table 2), margin, rewards, summed log-probs and response lengths. Ties count 0.5: with no training (beta = inf,
or the reference itself) every reward is 0 and reward accuracy is the paper's 0.500. Two log-probs closer than
TIE_NATS (the numerical tolerance log-probs are computed to; beta x TIE_NATS for rewards) are a tie: finer
differences are rounding, whose sign changes with how a pair was batched.
Metrics are weighted sums kept on the device (no host sync per micro-batch), summed across processes once
per report and divided by the number of real (weight-1) pairs, so a logged value is the mean over every pair
the window saw, never a mean of per-micro-batch means.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

TIE_NATS = 1e-4
PAIR_METRICS = ("loss", "reward_accuracy", "policy_accuracy", "margin", "reward_chosen", "reward_rejected",
                "logp_chosen", "logp_rejected", "length_chosen", "length_rejected")


def _wins(a: torch.Tensor, b: torch.Tensor, tie: float) -> torch.Tensor:
    """1 where a > b, 0.5 where they are within `tie` of each other, else 0."""
    tied = (a - b).abs() <= tie
    return torch.where(tied, 0.5, (a > b).double())


class PairStats:
    """Weighted sums of the per-pair metrics (plus pair and token counts) on one process.

    `beta` scales the tie tolerance of reward comparisons (rewards are beta x log-prob differences)."""

    def __init__(self, device: torch.device | str = "cpu", beta: float = 1.0):
        self.device = torch.device(device)
        self.reward_tie = beta * TIE_NATS
        self.sums = torch.zeros(len(PAIR_METRICS) + 2, dtype=torch.float64, device=self.device)

    def add(self, out: dict[str, torch.Tensor], weights: torch.Tensor, num_tokens: torch.Tensor | int) -> None:
        cr, rr = out["chosen_rewards"].double(), out["rejected_rewards"].double()
        pc, pr = out["policy_chosen"].double(), out["policy_rejected"].double()
        per_pair = torch.stack([out["losses"].detach().double(), _wins(cr, rr, self.reward_tie),
                                _wins(pc, pr, TIE_NATS), cr - rr, cr, rr,
                                pc, pr, out["chosen_length"].double(), out["rejected_length"].double()], dim=1)
        w = weights.double()
        self.sums[:-2] += (per_pair * w[:, None]).sum(dim=0)
        self.sums[-2] += w.sum()
        self.sums[-1] += num_tokens

    def reduce(self, accelerator=None, prefix: str = "") -> dict[str, float]:
        """Sum across processes (a collective: every process must call it) and average over pairs."""
        sums = accelerator.reduce(self.sums.clone(), reduction="sum") if accelerator is not None else self.sums
        sums = sums.tolist()
        pairs = sums[-2]
        result = {f"{prefix}{k}": (v / pairs if pairs else float("nan")) for k, v in zip(PAIR_METRICS, sums)}
        result[f"{prefix}pairs"] = int(pairs)
        result[f"{prefix}tokens"] = int(sums[-1])
        return result

    def reset(self) -> None:
        self.sums.zero_()


def peak_memory_gb(device: torch.device) -> float:
    """The process's peak: GPU memory allocated by torch, else resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) plus accelerate's trackers (TensorBoard, W&B)."""

    def __init__(self, run_dir: Path, accelerator, resume_step: int | None = None, header: dict | None = None):
        """`header`: fields added to the first record this run writes (how the run was made: its engine)."""
        self.accelerator = accelerator
        self.header = header
        self.path = Path(run_dir) / "metrics.jsonl"
        if accelerator.is_main_process and resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop what a killed run logged after its last checkpoint (the resumed run logs it again), and a last
        line the kill cut short."""
        from refdpo.io import atomic_write_text

        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.header:
            record, self.header = {**record, **self.header}, None
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        # The trackers get the names dashboards expect: eval/loss for val_loss, train/loss for loss.
        scalars = {f"eval/{k[4:]}" if k.startswith("val_") else f"train/{k}": v for k, v in record.items()
                   if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(scalars, step=record["step"])
