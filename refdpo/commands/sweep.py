"""`refdpo sweep --grid GRID.yaml`: a grid of training runs (beta x objective x reference ...), evaluated into one
table laid out like the paper's Tables 1-5.

A grid file:
  base: configs/paper/mistral.yaml     # a training config (paths are relative to the working directory)
  out: runs/sweeps/rq1-mistral         # one run folder per grid point, plus results.md/.csv/.json
  grid:                                # every combination of these training fields (or a list of such
    beta: [0.1, 0.05, 0.02, 0.01, 0.005]     # mappings: the union of their combinations)
    loss: [dpo]
  set: {epochs: 3}                     # optional: fields fixed for every run
  evaluate_split: val                  # the best checkpoint of each run is evaluated on it
  generate: {prompts: alpaca_eval, max_new_tokens: 2048}   # optional: outputs (and judge: true) per run

Runs go one after another in this process (`--dry-run` prints one `accelerate launch` command per run for a
cluster instead). A run whose summary.json exists is finished and not redone; a run folder with a checkpoint
but no summary is resumed from it; so a killed sweep, started again, continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from refdpo.checkpoint import resolve
from refdpo.commands.evaluate import TABLE_COLUMNS, EvalConfig, evaluate
from refdpo.commands.train_config import TrainConfig
from refdpo.config import Config, coerce_fields, load_yaml, option
from refdpo.errors import ConfigError
from refdpo.io import atomic_write_json
from refdpo.tables import write_tables

log = logging.getLogger(__name__)
GRID_KEYS = {"base", "out", "grid", "set", "evaluate_split", "generate", "judge"}


def load_grid(path: str | Path) -> dict:
    spec = load_yaml(path)
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid file takes "
                          f"{', '.join(sorted(GRID_KEYS))}")
    grids = spec.get("grid")
    grids = [grids] if isinstance(grids, dict) else grids
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) and g for g in grids):
        raise ConfigError(f"{path}: 'grid' must map training fields to lists of values (or be a list of such maps)")
    for grid in grids:
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{path}: grid field '{key}' must be a non-empty list")
        coerce_fields({k: v[0] for k, v in grid.items()} | dict(spec.get("set") or {}), str(path), TrainConfig)
    if not spec.get("out"):
        raise ConfigError(f"{path}: 'out' (the sweep folder) is required")
    return {**spec, "grid": grids}


def _name(point: dict) -> str:
    return "-".join(f"{k}{str(v).replace(',', '+').replace('/', '_')}" for k, v in point.items())


def runs(spec: dict) -> list[tuple[str, dict]]:
    """(run name, overrides) for every grid point, in the grid's order."""
    points = [dict(zip(grid, values)) for grid in spec["grid"] for values in itertools.product(*grid.values())]
    return [(_name(p), {**(spec.get("set") or {}), **p}) for p in points]


def run_config(spec: dict, name: str, overrides: dict) -> TrainConfig:
    base = coerce_fields(load_yaml(spec["base"]), spec["base"], TrainConfig) if spec.get("base") else {}
    values = {**base, **coerce_fields(overrides, name, TrainConfig), "output_dir": str(Path(spec["out"]) / name)}
    return TrainConfig(**values).validate()


def dry_run(spec: dict) -> list[str]:
    """One `accelerate launch` command per run."""
    commands = []
    for name, overrides in runs(spec):
        flags = " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in overrides.items())
        base = f"--config {shlex.quote(spec['base'])} " if spec.get("base") else ""
        commands.append(f"accelerate launch -m refdpo train {base}{flags} --output_dir "
                        f"{shlex.quote(str(Path(spec['out']) / name))}")
    return commands


@dataclass
class SweepConfig(Config):
    REQUIRED: ClassVar = {"grid": "--grid is required"}

    grid: str = option("", "grid YAML (see configs/sweeps/)")
    dry_run: bool = option(False, "print one `accelerate launch` command per run instead of running")


def evaluation_config(cfg: TrainConfig, model: str, split: str) -> EvalConfig:
    """How a run's best checkpoint is evaluated: every setting the two configs share, as the run trained
    (revision, tokenizer, template, objective, layout, ...), with the run's evaluation batch and pairs."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(cfg, f.name)}
    return EvalConfig(**{**shared, "model": model, "split": split, "batch_size": cfg.eval_batch_size or
                         cfg.batch_size, "max_pairs": cfg.max_val_pairs, "out": ""}).validate()


def sweep(spec: dict) -> list[dict]:
    """Train (or resume, or skip) every run, evaluate each best checkpoint, write the results table."""
    from refdpo.commands.train import train

    out, rows, data_cache, grid = Path(spec["out"]), [], {}, runs(spec)
    for k, (name, overrides) in enumerate(grid, start=1):
        cfg = run_config(spec, name, overrides)
        run_dir = Path(cfg.output_dir)
        if (run_dir / "summary.json").exists():
            log.info("sweep run %d of %d: %s is finished; not redone", k, len(grid), name)
        else:
            resume = resolve(run_dir, "last") is not None
            log.info("sweep run %d of %d: %s (%s)", k, len(grid), name, "resuming" if resume else "starting")
            train(TrainConfig(**{**cfg.to_dict(), "resume": resume}), data_cache=data_cache)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append(_result_row(spec, name, overrides, cfg, summary))
        write_tables(rows, out, "results", {"grid": spec})  # the table grows as runs finish
    return rows


def _result_row(spec: dict, name: str, overrides: dict, cfg: TrainConfig, summary: dict) -> dict:
    """One table row: the grid point, the best step, and the best checkpoint's evaluation (cached in the run)."""
    run_dir = Path(cfg.output_dir)
    # Best at step 0 (validation loss never went below the start): the best policy is the initial one.
    best = summary["best"] if summary["best_step"] else cfg.model
    cached = run_dir / "evaluation.json"
    if cached.exists():
        metrics = json.loads(cached.read_text())
    else:
        evaluated = evaluation_config(cfg, best, spec.get("evaluate_split", cfg.val_split))
        metrics = {k: v for k, v in evaluate(evaluated)[0].items() if k in TABLE_COLUMNS}
        atomic_write_json(cached, metrics)
    row = {"run": name, **overrides, "best_step": summary["best_step"], **{f"val_{k}": v for k, v in metrics.items()}}
    if spec.get("generate"):
        row.update(_generate_row(spec, run_dir, best, cfg.template))
    return row


def _generate_row(spec: dict, run_dir: Path, best: str, template: str) -> dict:
    """Outputs of the best checkpoint (once), their length and degeneration counts, and the judge's win rate."""
    from refdpo.commands.generate import GenerateConfig, generate

    outputs = run_dir / "outputs.json"
    stats_path = run_dir / "outputs.stats.json"
    if not stats_path.exists():
        settings = coerce_fields(dict(spec["generate"]), "sweep grid: generate", GenerateConfig)
        generate(GenerateConfig(**{"template": template, **settings, "model": best, "out": str(outputs),
                                   "generator": run_dir.name}).validate())
    stats = json.loads(stats_path.read_text())
    row = {"length_mean": stats["length_tokens"]["mean"], "degenerate": stats["degenerate"]}
    if spec.get("judge"):
        from refdpo.commands.judge import JudgeConfig, judge

        judged = judge(JudgeConfig(outputs=str(outputs), out=str(run_dir / "judge")).validate())[0]
        row["lc_win_rate"] = judged.get("length_controlled_winrate")
    return row
