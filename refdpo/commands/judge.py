"""`refdpo judge`: AlpacaEval 2 win rates (length-controlled) of `refdpo generate` outputs, as one table.

Runs the `alpaca_eval` package (the optional extra `refdpo[eval]`, imported only here) with the user's API key
for the judge (the paper used gpt-4-1106-preview: `--annotators_config weighted_alpaca_eval_gpt4_turbo`, the
AlpacaEval 2 default). Each outputs file is judged against AlpacaEval's reference outputs; the leaderboard rows
of the judged generators are written as judge.md/.csv/.json, and joined with `refdpo evaluate`'s table when
`--table evaluate.json` is given (matched on the generator name, which `generate` takes from the checkpoint).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from refdpo.config import Config, check_all, option
from refdpo.errors import ConfigError, DataError, RefdpoError, first_line
from refdpo.tables import write_tables

LEADERBOARD_COLUMNS = ("length_controlled_winrate", "win_rate", "standard_error", "n_total", "avg_length")
KEY_VARIABLES = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_CLIENT_CONFIG_PATH")


@dataclass
class JudgeConfig(Config):
    REQUIRED: ClassVar = {"outputs": "give the outputs file(s) to judge"}

    outputs: str = option("", "outputs.json files from refdpo generate, comma-separated")
    annotators_config: str = option("weighted_alpaca_eval_gpt4_turbo", "AlpacaEval judge configuration")
    out: str = option("judge", "folder for judge.md, judge.csv, judge.json and AlpacaEval's annotations")
    table: str | None = option(None, "evaluate.json from refdpo evaluate, to join the win rates with")
    max_instances: int = option(0, "judge only the first N outputs (0: all; a cheap trial)")

    def validate(self) -> JudgeConfig:
        check_all([(self.max_instances >= 0, "--max_instances must be >= 0")])
        return self


def _require_judge() -> None:
    """The package and a key, before anything is read or sent."""
    if importlib.util.find_spec("alpaca_eval") is None:
        raise ConfigError("the AlpacaEval judge is an optional extra that is not installed: "
                          "pip install 'refdpo[eval]'")
    if not any(os.environ.get(name) for name in KEY_VARIABLES):
        raise ConfigError("the judge needs an API key: set OPENAI_API_KEY (or, for other judges, one of "
                          f"{', '.join(KEY_VARIABLES[1:])})")


def _read_outputs(path: str) -> list:
    """An outputs file as `refdpo generate` writes it (a JSON list of records), or one line saying why not."""
    try:
        outputs = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such outputs file (write one with refdpo generate)") from None
    except (OSError, ValueError) as e:
        raise DataError(path, f"not a JSON outputs file: {first_line(e)}") from None
    if not isinstance(outputs, list):
        raise DataError(path, f"expected a JSON list of outputs, got {type(outputs).__name__}")
    return outputs


def judge(cfg: JudgeConfig) -> list[dict]:
    """Judge every outputs file; returns one leaderboard row per generator."""
    paths = [p.strip() for p in cfg.outputs.split(",") if p.strip()]
    loaded = {path: _read_outputs(path) for path in paths}  # the files first: a wrong path is not a missing extra
    if cfg.table and not Path(cfg.table).is_file():
        raise ConfigError(f"--table {cfg.table}: no such file (an evaluate.json written by refdpo evaluate --out)")
    _require_judge()
    from alpaca_eval import evaluate as alpaca_evaluate

    out = Path(cfg.out)
    rows = []
    for path in paths:
        outputs = loaded[path]
        generator = outputs[0]["generator"] if outputs else Path(path).stem
        try:
            leaderboard, _ = alpaca_evaluate(model_outputs=path, annotators_config=cfg.annotators_config,
                                             name=generator, output_path=str(out / generator),
                                             is_return_instead_of_print=True,
                                             max_instances=cfg.max_instances or None)
        except Exception as e:  # the judge's API, quota or format errors: one line, naming the file
            raise RefdpoError(f"{path}: alpaca_eval failed: {type(e).__name__}: "
                              f"{first_line(e)}") from None
        entry = leaderboard.loc[generator] if generator in leaderboard.index else leaderboard.iloc[0]
        rows.append({"generator": generator, "outputs": path,
                     **{c: float(entry[c]) for c in LEADERBOARD_COLUMNS if c in entry}})
    if cfg.table:
        rows = join_with_table(rows, json.loads(Path(cfg.table).read_text())["rows"])
    write_tables(rows, out, "judge", {"annotators_config": cfg.annotators_config})
    return rows


def join_with_table(rows: list[dict], evaluated: list[dict]) -> list[dict]:
    """Each judged row with the evaluate row of the same checkpoint (by the generator = checkpoint name)."""
    by_name = {Path(r["checkpoint"].rstrip("/")).name: r for r in evaluated}
    by_name.update({Path(r["model"].rstrip("/")).name: r for r in evaluated})
    return [{**row, **{f"val_{k}": v for k, v in by_name.get(row["generator"], {}).items()
                       if k not in ("model", "checkpoint")}} for row in rows]
