"""Pair metrics: exact weighted means, padding pairs excluded, ties within the log-prob tolerance count 0.5."""

from __future__ import annotations

import json

import pytest
import torch

from refdpo.core.metrics import TIE_NATS, MetricsLog, PairStats

D = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def outputs(losses, cr, rr, pc, pr):
    return {"losses": D(*losses), "chosen_rewards": D(*cr), "rejected_rewards": D(*rr), "policy_chosen": D(*pc),
            "policy_rejected": D(*pr), "chosen_length": D(5, 6, 7), "rejected_length": D(1, 2, 3)}


def test_weighted_means_over_several_batches_exclude_padding():
    stats = PairStats(beta=0.1)
    stats.add(outputs([1.0, 2.0, 99.0], [0.3, 0.0, 9.0], [0.1, 0.2, -9.0], [-1, -5, 0], [-2, -4, 0]),
              D(1, 1, 0), num_tokens=40)
    stats.add(outputs([3.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.6, 0.0, 0.0], [-7, -3, -3], [-6, -3, -3]),
              D(1, 0, 0), num_tokens=10)
    m = stats.reduce()
    assert m["pairs"] == 3 and m["tokens"] == 50
    assert m["loss"] == pytest.approx((1 + 2 + 3) / 3)
    assert m["reward_accuracy"] == pytest.approx((1 + 0 + 0) / 3)  # 0.3>0.1; 0.0<0.2; 0.5<0.6
    assert m["policy_accuracy"] == pytest.approx((1 + 0 + 0) / 3)  # -1>-2; -5<-4; -7<-6
    assert m["margin"] == pytest.approx((0.2 - 0.2 - 0.1) / 3)
    assert m["length_chosen"] == pytest.approx((5 + 6 + 5) / 3)


def test_differences_below_the_tolerance_are_ties():
    beta = 0.5
    stats = PairStats(beta=beta)
    tiny = 0.9 * TIE_NATS
    stats.add(outputs([0.0] * 3, [beta * tiny, 0.0, 2 * beta * TIE_NATS], [0.0, 0.0, 0.0],
                      [-3.0 + tiny, -3.0, -3.0], [-3.0, -3.0, -3.0 + 2 * TIE_NATS]), D(1, 1, 1), num_tokens=0)
    m = stats.reduce()
    assert m["reward_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert m["policy_accuracy"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_reset():
    stats = PairStats()
    stats.add(outputs([1.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3, [0.0] * 3), D(1, 1, 1), num_tokens=3)
    stats.reset()
    assert stats.reduce()["pairs"] == 0

# --- metrics.jsonl ------------------------------------------------------------------------------------------


class MainProcess:
    is_main_process = True
    trackers: list = []


def test_resume_truncates_after_the_checkpoint_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.1 * s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # killed while writing step 5
    log = MetricsLog(tmp_path, MainProcess(), resume_step=2)
    log.write({"step": 3, "loss": 9.0})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 9.0


def test_fresh_start_after_a_kill_before_the_first_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "val_loss": 0.69}) + "\n")
    MetricsLog(tmp_path, MainProcess(), resume_step=-1)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
