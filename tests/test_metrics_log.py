"""metrics.jsonl on resume: what came after the checkpoint, and a line cut short by the kill, are dropped."""

from __future__ import annotations

import json

from refdpo.core.metrics import MetricsLog


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
