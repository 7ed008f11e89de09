"""`refdpo judge`: clear refusals without the extra or a key; the join with evaluate's table."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import run_cli

from refdpo.commands.judge import JudgeConfig, join_with_table, judge
from refdpo.errors import ConfigError
from refdpo.tables import write_tables


@pytest.mark.skipif(importlib.util.find_spec("alpaca_eval") is not None, reason="alpaca_eval is installed")
def test_judge_without_the_extra_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "outputs.json").write_text(json.dumps([{"instruction": "hi", "output": "hello",
                                                        "generator": "m", "dataset": "d"}]))
    done = run_cli(["judge", str(tmp_path / "outputs.json"), "--out", str(tmp_path / "j")])
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("refdpo judge: error: the AlpacaEval judge is an optional extra that is not installed: "
                         "pip install 'refdpo[eval]'")
    assert not (tmp_path / "j").exists()


def test_judge_without_a_key_is_refused_before_anything_is_sent(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "alpaca_eval" else None)
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_CLIENT_CONFIG_PATH"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "o.json").write_text('[{"instruction": "Hi", "output": "Hello", "generator": "g"}]')
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        judge(JudgeConfig(outputs=str(tmp_path / "o.json")).validate())


def test_win_rates_join_the_evaluate_table_by_checkpoint_name(tmp_path):
    evaluated = [{"model": "runs/a", "checkpoint": "runs/a/checkpoints/step-0000064", "loss": 0.3},
                 {"model": "runs/b/best", "checkpoint": "runs/b/best", "loss": 0.4}]
    judged = [{"generator": "step-0000064", "length_controlled_winrate": 12.5},
              {"generator": "best", "length_controlled_winrate": 9.0}, {"generator": "other", "win_rate": 1.0}]
    rows = join_with_table(judged, evaluated)
    assert rows[0]["val_loss"] == 0.3 and rows[1]["val_loss"] == 0.4 and "val_loss" not in rows[2]
    write_tables(rows, tmp_path, "judge")
    assert json.loads((tmp_path / "judge.json").read_text())["rows"] == rows
    assert (tmp_path / "judge.md").read_text().splitlines()[2].startswith("| step-0000064 | 12.5000 |")
    assert (tmp_path / "judge.csv").read_text().splitlines()[0] == "generator,length_controlled_winrate,val_loss,win_rate"
