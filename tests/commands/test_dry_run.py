"""`--dry_run`: the resolved config, formats, counts, length percentiles, drops and steps, with no model loaded."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from helpers import run_main

from refdpo.data import build_pairs, load_split


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model's weights fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_train_dry_run_reports_without_loading_the_model(tiny_setup, tmp_path, tok, capsys, no_model):
    run = tmp_path / "run"
    out, _ = run_main(["train", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"),
                       "--max_len", "48", "--batch_size", "8", "--epochs", "2", "--warmup_steps", "5",
                       "--output_dir", str(run), "--dry_run"], capsys, code=0)
    assert not run.exists()
    # The numbers are the data's: the same split tokenised directly.
    full = build_pairs(load_split(str(tiny_setup / "data"), "train"), tok, "tulu", 48, None)
    kept = len(full)
    assert f"train: {tiny_setup / 'data' / 'train.jsonl'} (messages format): {kept} of 256 pairs kept; max_len " \
           f"drops {256 - kept}, cuts {full.stats['partially_truncated']}" in out
    replies = [e.full_length - e.response_start for side in (full.chosen, full.rejected) for e in side]
    assert f"reply tokens: p50 {int(np.percentile(replies, 50))}, " in out
    steps = -(-kept // 8) * 2
    assert f"steps per epoch {-(-kept // 8)}, epochs 2, steps {steps}, warmup steps 5" in out
    config = yaml.safe_load(out.split("resolved config:\n")[1].split("\n\n")[0])
    assert config["max_len"] == 48 and config["dry_run"] is True
    # scored at max_len 512: the run would refuse the columns, and the dry run says so
    assert "reference log-probs: scored with max_len 512 but training uses 48" in out
    assert "(the run refuses this; --strict false trains anyway)" in out


def test_score_dry_run_plans_batches_and_writes_nothing(tiny_setup, tmp_path, capsys, no_model):
    out_file = tmp_path / "scored.jsonl"
    out, _ = run_main(["score", "--model", str(tiny_setup / "model"), "--dataset", str(tiny_setup / "data"),
                       "--split", "val", "--out", str(out_file), "--dry_run"], capsys, code=0)
    assert not out_file.exists() and not any(tmp_path.iterdir())
    assert "val: " in out and "64 of 64 pairs kept" in out and "plan: processes 1, batches " in out
