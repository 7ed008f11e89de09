"""`refdpo demo`: the paper's three questions answered on a controlled task with a known reward, on a CPU.

This module is the demo as a whole: its config (sizes, beta grids, run families, what each seed's preparation
builds), the run folder's layout, and the process pool that runs pipeline.py's jobs (each seed's preparation,
then one `refdpo train` run per grid point) before report.py writes the results.

Runs go to a pool of processes with one torch thread each: every number depends only on the config and the
seed, never on the number of workers or the order runs finish in, so the table is the same every time. A
finished step leaves a marker (prepared.json, eval.json); started again, the demo does only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from refdpo.config import Config, check_all, option
from refdpo.errors import ConfigError
from refdpo.io import atomic_write_json
from refdpo.testbed import task
from refdpo.testbed.task import FAMILIES, REFERENCES

PREPARE_WEIGHT = 10  # a seed's preparation takes about as long as ten training runs (progress bar units)


# What a size left unset becomes, (full run, --quick): the one place both sizes are written down.
SIZES = {"seeds": (3, 2), "train_prompts": (4000, 600), "heldout_prompts": (500, 150),
         "demonstrations": (20000, 3000), "sft_steps": (400, 150), "compatible_steps": (200, 60),
         "incompatible_steps": (400, 150), "epochs": (2, 1),
         "betas_dpo": ("10,3,1,0.3,0.1,0.03,0.01", "3,0.3,0.03"), "betas_ref_free": ("100,1,0.1,0.01", "10,1"),
         "betas_prior": ("10,1,0.1,0.01", "1,0.1"), "betas_references": ("10,3,1,0.3", "3,0.3")}


def _sized(name: str, help: str):
    full, quick = SIZES[name]
    return option(None, f"{help}; unset: {full} (--quick: {quick})")


@dataclass
class DemoConfig(Config):
    out: str = option("runs/demo", "run folder: models, data, one folder per training run, results and plots")
    seeds: int | None = _sized("seeds", "repetitions of the whole pipeline (prompts, SFT, pairs, DPO); intervals "
                                        "are over seeds")
    seed: int = option(0, "the first seed")
    workers: int = option(0, "parallel processes of one torch thread each (0: one per CPU core, at most 8); the "
                             "results do not depend on it")
    quick: bool = option(False, "toy size for a smoke test (CI): every size left unset takes its --quick value")
    overwrite: bool = option(False, "delete OUT if it holds a demo with other settings")
    progress: bool = option(True, "show a progress bar")
    study: str = option("rq", "rq: the paper's three questions | advise: the validation of `refdpo advise` on "
                              "references of controlled quality, calibration and held-out phases (study.py)")
    phase: str = option("all", "--study advise: calibrate | heldout | long | all (long: the held-out test on the "
                               "long-reply variant)")
    candidates: str = option("", "--study advise: only these candidate references (comma-separated names, as in "
                                 "results.csv); unset: every one of each phase")
    variant: str = option("base", "the task's parameter set: base | long (replies about 3x longer; task.VARIANTS)")
    # the task
    train_prompts: int | None = _sized("train_prompts", "prompts for preference pairs")
    heldout_prompts: int | None = _sized("heldout_prompts", "held-out prompts: sampled from for evaluation, and "
                                                            "held-out pairs")
    demonstrations: int | None = _sized("demonstrations", "SFT demonstrations, half good, half mediocre")
    max_reply_tokens: int | None = option(None, "generation cap: a reply still going after this many tokens never "
                                                "ended; unset: the variant's (base 40, long 100)")
    bt_temperature: float = option(0.5, "Bradley-Terry temperature of the labels: P(y1 > y2) = sigmoid((r1 - r2) / T)")
    # the models (tiny Llamas: models.py)
    sft_steps: int | None = _sized("sft_steps", "SFT steps of the self reference")
    compatible_steps: int | None = _sized("compatible_steps", "further steps on good demonstrations only for the "
                                                              "compatible reference")
    incompatible_steps: int | None = _sized("incompatible_steps", "steps of the incompatible reference, from scratch")
    sft_batch_size: int = option(128, "demonstrations per SFT step")
    sft_max_lr: float = option(2e-3, "SFT learning rate (AdamW, constant)")
    # preference optimisation: the same budget for every beta and objective
    epochs: int | None = _sized("epochs", "passes over the pairs")
    batch_size: int = option(64, "pairs per step")
    max_lr: float = option(5e-4, "peak learning rate (AdamW, 10% warmup, linear decay)")
    betas_dpo: str | None = _sized("betas_dpo", "RQ1: beta grid with the SFT reference")
    betas_ref_free: str | None = _sized("betas_ref_free", "RQ2: beta grid, reference-free")
    betas_prior: str | None = _sized("betas_prior", "RQ2: beta grid, prior as reference")
    betas_references: str | None = _sized("betas_references", "RQ3: beta grid of both stronger references, each "
                                                              "value also in --betas_dpo")

    def validate(self) -> DemoConfig:
        check_all([(self.study in ("rq", "advise"), "--study must be rq or advise"),
                   (self.phase in ("calibrate", "heldout", "long", "all"),
                    "--phase must be calibrate, heldout, long or all"),
                   (self.variant in task.VARIANTS, f"--variant must be one of {', '.join(task.VARIANTS)}")])
        sizes = SIZES
        if self.study == "advise":
            from refdpo.testbed.study import STUDY_SIZES

            sizes = {**SIZES, **STUDY_SIZES}
        for name, (full, quick) in sizes.items():
            if getattr(self, name) is None:
                setattr(self, name, quick if self.quick else full)
        if self.max_reply_tokens is None:
            self.max_reply_tokens = self.task_variant().max_reply_tokens
        grids = {f: _betas(getattr(self, f"betas_{f}"), f) for f in ("dpo", "ref_free", "prior", "references")}
        check_all([
            (self.seeds >= 2, "--seeds must be >= 2 (intervals are over seeds)"),
            (self.workers >= 0, "--workers must be >= 0"),
            (min(self.train_prompts, self.heldout_prompts, self.demonstrations, self.max_reply_tokens) >= 1,
             "--train_prompts, --heldout_prompts, --demonstrations and --max_reply_tokens must be >= 1"),
            (min(self.sft_steps, self.compatible_steps, self.incompatible_steps, self.epochs, self.batch_size,
                 self.sft_batch_size) >= 1, "step counts, --epochs and batch sizes must be >= 1"),
            (self.bt_temperature > 0 and self.max_lr > 0 and self.sft_max_lr > 0, "temperatures and rates must be > 0"),
            (set(grids["references"]) <= set(grids["dpo"]),
             "every --betas_references value must also be in --betas_dpo (RQ3 compares at equal beta)"),
            (len(grids["dpo"]) >= 3, "--betas_dpo needs at least 3 values to show a non-monotone curve"),
        ])
        return self

    def task_variant(self) -> task.Variant:
        return task.VARIANTS[self.variant]

    def families(self) -> dict[str, dict]:
        """Run family -> the fields of its `refdpo train` run (which reference, or none)."""
        if self.study == "advise":
            from refdpo.testbed.study import families

            return families(self)
        return {family: fields for family, (_, fields) in FAMILIES.items()}

    def seed_plan(self, seed: int) -> SeedPlan:
        """What a seed's preparation builds: the demo's references, or the study's for the seed's phase."""
        if self.study == "advise":
            from refdpo.testbed.study import seed_plan

            return seed_plan(self, seed)
        return SeedPlan(references=dict(REFERENCES), snapshots={self.compatible_steps: "compatible"},
                        incompatible=True, alone=("compatible", "incompatible"))

    def grid(self) -> list[tuple[str, float]]:
        """Every training run of one seed: (family, beta)."""
        betas = {"dpo": self.betas_dpo, "ref_free": self.betas_ref_free, "prior": self.betas_prior,
                 "compatible": self.betas_references, "incompatible": self.betas_references}
        return [(family, beta) for family, spec in betas.items() for beta in _betas(spec, family)]

    def fingerprint(self) -> dict:
        """What the results depend on (not where they go, how many workers, the progress bar or which phase of
        a study runs now)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "workers", "overwrite",
                                                                                 "progress", "phase")}


@dataclass
class SeedPlan:
    """One seed's references. `references`: scored by `refdpo score` (name -> (model folder, columns, mode));
    `snapshots`: steps of further SFT on good demonstrations -> the folder of that model (one trajectory);
    `incompatible`: train the incompatible reference; `alone`: model references measured on their own (their
    strength); `synthesise(seed, split, records)`: the records with extra columns, written into the split after
    scoring; `prior_strength`: measure the prior's own replies (to an empty prompt)."""

    references: dict
    snapshots: dict
    incompatible: bool
    alone: tuple
    synthesise: object = None
    prior_strength: bool = False


def _betas(spec: str, name: str) -> list[float]:
    try:
        values = [float(b) for b in spec.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--betas_{name}: expected comma-separated numbers, got {spec!r}") from None
    if not values or min(values) <= 0 or len(set(values)) != len(values):
        raise ConfigError(f"--betas_{name}: expected distinct positive numbers, got {spec!r}")
    return sorted(values, reverse=True)


def seed_dir(cfg: DemoConfig, seed: int) -> Path:
    return Path(cfg.out) / f"seed-{seed}"


def run_dir(cfg: DemoConfig, seed: int, family: str, beta: float) -> Path:
    return seed_dir(cfg, seed) / "runs" / f"{family}-beta{beta:g}"


# --- the whole demo ---------------------------------------------------------------------------------------

def _worker_init() -> None:
    """One torch thread per process: results are the same whatever the number of workers, and on a loaded
    machine 2 threads per process made steps 10x slower than 1 (testbed notes)."""
    import torch
    import transformers

    from refdpo.allocator import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("refdpo", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _claim(cfg: DemoConfig) -> None:
    """OUT holds this demo (resume it), nothing (start it), or another one (refuse, or --overwrite)."""
    out, manifest = Path(cfg.out), Path(cfg.out) / "demo.json"
    if manifest.exists() and json.loads(manifest.read_text()) != cfg.fingerprint():
        if not cfg.overwrite:
            raise ConfigError(f"{out} holds a demo with other settings: pick another --out, or --overwrite")
        shutil.rmtree(out)
    elif out.exists() and not manifest.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"{out} exists and is not a demo folder: pick another --out, or --overwrite")
        shutil.rmtree(out)
    atomic_write_json(manifest, cfg.fingerprint())


def execute(jobs: list[tuple[DemoConfig, int, list[tuple[str, float]]]], workers: int, progress: bool,
            desc: str) -> tuple[dict, list[dict]]:
    """Prepare each (config, seed) of `jobs`, then train and measure its grid, all in one pool of `workers`
    processes. Returns the preparations, keyed by (run folder, seed), and every run's measurements."""
    from refdpo.console import progress_bar
    from refdpo.testbed.pipeline import prepare, run_one  # lazily: pipeline imports this module

    total = sum(PREPARE_WEIGHT + len(grid) for _, _, grid in jobs)
    prepared, results = {}, []
    bar = progress_bar(total=total, desc=desc, unit="step", dynamic_ncols=True, disable=not progress)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        pending = {pool.submit(prepare, cfg, seed): ("prepare", i) for i, (cfg, seed, _) in enumerate(jobs)}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    kind, i = pending.pop(future)
                    cfg, seed, grid = jobs[i]
                    result = future.result()
                    if kind == "prepare":
                        prepared[(cfg.out, seed)] = result
                        bar.update(PREPARE_WEIGHT)
                        pending.update({pool.submit(run_one, cfg, seed, f, b): ("run", i) for f, b in grid})
                    else:
                        results.append(result)
                        bar.update(1)
                    bar.set_postfix_str(f"seeds ready {len(prepared)}/{len(jobs)}, runs {len(results)}/"
                                        f"{total - PREPARE_WEIGHT * len(jobs)}")
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    bar.close()
    return prepared, results


def pool_size(cfg: DemoConfig, jobs: int) -> int:
    """--workers, or one per CPU core (at most 8), never more than there are jobs."""
    return max(1, min(cfg.workers or min(os.cpu_count() or 1, 8), jobs))


def run_demo(cfg: DemoConfig) -> dict:
    """Prepare every seed, train and measure every grid point, then write the report; returns it. With
    --study advise: the advise study (study.py)."""
    from refdpo.testbed.report import write_report

    if cfg.study == "advise":
        from refdpo.testbed.study import run_study

        return run_study(cfg)
    _claim(cfg)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    grid = cfg.grid()
    workers = pool_size(cfg, len(seeds) * len(grid))
    start = time.perf_counter()
    prepared, results = execute([(cfg, s, grid) for s in seeds], workers, cfg.progress, "demo")
    prepared = {seed: info for (_, seed), info in prepared.items()}
    return write_report(cfg, prepared, results, seconds=time.perf_counter() - start, workers=workers)
