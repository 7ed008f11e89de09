"""`refdpo demo`: the paper's three questions answered on a controlled task with a known reward, on a CPU.

Per seed (`prepare`): sample the task, train the SFT model (the self reference), a stronger compatible reference
(the SFT model trained further on good demonstrations) and a stronger incompatible one (another tokenizer,
another initialisation, good demonstrations in another style); sample two replies per prompt from the SFT
model, label them by Bradley-Terry on r*, and score them with `refdpo score` under every reference, prior
included. Then every grid point is one `refdpo train` run (`run_one`), measured on held-out prompts by
sampling from the trained policy and scoring with r* (`measure`) and by `refdpo evaluate`.

Runs go to a pool of processes with one torch thread each: every number depends only on the config and the
seed, never on the number of workers or the order runs finish in, so the table is the same every time. A
finished step leaves a marker (prepared.json, eval.json); started again, the demo does only what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from refdpo.config import Config, check_all, option
from refdpo.errors import ConfigError
from refdpo.io import atomic_write_json, read_jsonl, write_jsonl
from refdpo.testbed import task
from refdpo.testbed.models import TEMPLATE
from refdpo.testbed.report import reference_agreement
from refdpo.testbed.task import FAMILIES, REFERENCES
from refdpo.tokenization import save_tokenizer

log = logging.getLogger(__name__)
MAX_LEN = 128  # tokens: prompt + reply + EOS, with the incompatible tokenizer's two pieces per word
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
    # the task
    train_prompts: int | None = _sized("train_prompts", "prompts for preference pairs")
    heldout_prompts: int | None = _sized("heldout_prompts", "held-out prompts: sampled from for evaluation, and "
                                                            "held-out pairs")
    demonstrations: int | None = _sized("demonstrations", "SFT demonstrations, half good, half mediocre")
    max_reply_tokens: int = option(40, "generation cap: a reply still going after this many tokens never ended")
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
        for name, (full, quick) in SIZES.items():
            if getattr(self, name) is None:
                setattr(self, name, quick if self.quick else full)
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

    def grid(self) -> list[tuple[str, float]]:
        """Every training run of one seed: (family, beta)."""
        betas = {"dpo": self.betas_dpo, "ref_free": self.betas_ref_free, "prior": self.betas_prior,
                 "compatible": self.betas_references, "incompatible": self.betas_references}
        return [(family, beta) for family, spec in betas.items() for beta in _betas(spec, family)]

    def fingerprint(self) -> dict:
        """What the results depend on (not where they go, how many workers, or the progress bar)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "workers", "overwrite",
                                                                                 "progress")}


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


# --- one seed: task, models, preference data ----------------------------------------------------------

def _save(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _demonstrations(keywords: list, n: int, rng: random.Random, good_fraction: float, dialect: bool = False):
    kws = [rng.choice(keywords) for _ in range(n)]
    return kws, [task.demonstration(k, rng, "good" if rng.random() < good_fraction else "mediocre", dialect)
                 for k in kws]


def _pairs(model, tokenizer, keywords: list, cfg: DemoConfig, seed: int, split: str) -> tuple[list[dict], dict]:
    """Two T=1 replies per prompt from the SFT model, labelled by Bradley-Terry on r*. Pairs with a reply that
    never ended are dropped: the data contract's replies end with EOS."""
    from refdpo.testbed.models import sample

    s = sample(model, tokenizer, keywords, greedy=False, max_tokens=cfg.max_reply_tokens, seed=seed,
               num_per_prompt=2)
    keep = [i for i in range(len(keywords)) if s.ended[2 * i] and s.ended[2 * i + 1]]
    replies = [(s.words[2 * i], True, s.words[2 * i + 1], True) for i in keep]
    records, stats = task.preference_records([keywords[i] for i in keep], replies, task.Reward(),
                                             cfg.bt_temperature, random.Random(f"{seed}:labels:{split}"), split)
    return records, {**stats, "dropped_unended": len(keywords) - len(keep)}


def _score_all(folder: Path, split: str) -> None:
    """`refdpo score` under every reference, one column pair each: raw -> ... -> data/{split}.jsonl."""
    from refdpo.commands.score import ScoreConfig, score

    source = folder / "data" / ".stages" / f"{split}.raw.jsonl"
    for i, (name, (model, columns, mode)) in enumerate(REFERENCES.items()):
        last = i == len(REFERENCES) - 1
        out = folder / "data" / (f"{split}.jsonl" if last else f".stages/{split}.{name}.jsonl")
        score(ScoreConfig(model=str(folder / model), dataset=str(source.parent), split=str(source), out=str(out),
                          columns=columns,
                          mode=mode, template=TEMPLATE, max_len=MAX_LEN, progress=False, overwrite=True).validate())
        source = out


def prepare(cfg: DemoConfig, seed: int) -> dict:
    """Everything one seed's runs share; skipped when seed-N/prepared.json exists."""
    from refdpo.testbed.models import new_model, supervised_finetune

    folder = seed_dir(cfg, seed)
    if (folder / "prepared.json").exists():
        return json.loads((folder / "prepared.json").read_text())
    start = time.perf_counter()
    rng = random.Random(f"{seed}:task")
    train_kw, heldout_kw = task.prompts(cfg.train_prompts, cfg.heldout_prompts, rng)
    tokenizer = task.word_tokenizer()
    kws, demos = _demonstrations(train_kw, cfg.demonstrations, rng, 0.5)
    sft = new_model(tokenizer, seed)
    sft_loss = supervised_finetune(sft, tokenizer, kws, demos, cfg.sft_steps, cfg.sft_batch_size, cfg.sft_max_lr, seed)
    _save(sft, tokenizer, folder / "sft")

    kws, demos = _demonstrations(train_kw, cfg.demonstrations // 2, rng, 1.0)
    compatible_loss = supervised_finetune(sft, tokenizer, kws, demos, cfg.compatible_steps, cfg.sft_batch_size,
                                          cfg.sft_max_lr, seed + 1)
    _save(sft, tokenizer, folder / "compatible")
    other_tokenizer = task.subword_tokenizer()
    kws, demos = _demonstrations(train_kw, cfg.demonstrations // 2, rng, 1.0, dialect=True)
    other = new_model(other_tokenizer, seed + 10_000)
    incompatible_loss = supervised_finetune(other, other_tokenizer, kws, demos, cfg.incompatible_steps,
                                            cfg.sft_batch_size, cfg.sft_max_lr, seed + 2)
    _save(other, other_tokenizer, folder / "incompatible")

    from transformers import LlamaForCausalLM

    sft = LlamaForCausalLM.from_pretrained(folder / "sft").eval()
    data_stats = {}
    for split, keywords in (("train", train_kw), ("val", heldout_kw)):
        records, data_stats[split] = _pairs(sft, tokenizer, keywords, cfg, seed + (split == "val"), split)
        write_jsonl(folder / "data" / ".stages" / f"{split}.raw.jsonl", records)
        _score_all(folder, split)
    shutil.rmtree(folder / "data" / ".stages")
    atomic_write_json(folder / "prompts.json", {"heldout": heldout_kw})

    baselines = {"sft": measure(cfg, seed, sft, tokenizer, sft_rewards=None, sft=sft)}
    sft_rewards = baselines["sft"].pop("rewards")
    baselines["sft"]["win_rate"] = 0.5
    for name in ("compatible", "incompatible"):
        model = LlamaForCausalLM.from_pretrained(folder / name).eval()
        tok = other_tokenizer if name == "incompatible" else tokenizer
        baselines[f"{name}_ref"] = measure(cfg, seed, model, tok, sft_rewards, sft if name == "compatible" else None)
        baselines[f"{name}_ref"].pop("rewards")
    info = {"seed": seed, "data": data_stats, "baselines": baselines, "sft_rewards": sft_rewards,
            "references": reference_agreement(folder / "data"),
            "sft_loss": sft_loss, "compatible_loss": compatible_loss, "incompatible_loss": incompatible_loss,
            "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(folder / "prepared.json", info)
    return info


# --- measuring a policy ----------------------------------------------------------------------------------

def measure(cfg: DemoConfig, seed: int, model, tokenizer, sft_rewards: list | None, sft=None) -> dict:
    """On the held-out prompts: replies sampled at T=1 and greedy, scored by r*; win rate over the SFT model's
    T=1 replies (ties 0.5); KL to the SFT model, estimated as the mean of log pi(y|x) - log sft(y|x) over the
    sampled y (when `sft` shares the tokenizer); log p(EOS) after the held-out chosen and rejected replies."""
    from refdpo.testbed.models import encoded_batch, reply_token_logprobs, sample, sequence_logprob_sums

    folder = seed_dir(cfg, seed)
    heldout = [tuple(k) for k in json.loads((folder / "prompts.json").read_text())["heldout"]]
    reward = task.Reward()
    # The same sampling seed for every policy of a seed: differences between policies are not sampling noise.
    t1 = sample(model, tokenizer, heldout, greedy=False, max_tokens=cfg.max_reply_tokens, seed=seed + 7)
    greedy = sample(model, tokenizer, heldout, greedy=True, max_tokens=cfg.max_reply_tokens, seed=seed + 7)
    rewards = np.array([reward(k, w, e) for k, w, e in zip(heldout, t1.words, t1.ended)])
    greedy_rewards = [reward(k, w, e) for k, w, e in zip(heldout, greedy.words, greedy.ended)]
    records = read_jsonl(folder / "data" / "val.jsonl")
    keywords = [r["prompt"].split() for r in records]
    eos = {side: np.array([lp[-1].item() for lp in reply_token_logprobs(model, encoded_batch(
        tokenizer, keywords, [r[side][-1]["content"].split() for r in records]))]) for side in ("chosen", "rejected")}
    out = {"reward": float(rewards.mean()), "reward_greedy": float(np.mean(greedy_rewards)),
           "length": float(t1.lengths().mean()), "length_greedy": float(greedy.lengths().mean()),
           "unended": float(1 - np.mean(t1.ended)), "eos_chosen": float(eos["chosen"].mean()),
           "eos_gap": float((eos["chosen"] - eos["rejected"]).mean()), "rewards": rewards.tolist()}
    if sft_rewards is not None:
        base = np.array(sft_rewards)
        out["win_rate"] = float(np.mean(rewards > base) + 0.5 * np.mean(rewards == base))
    if sft is not None:
        out["kl"] = float(np.mean(sequence_logprob_sums(model, t1.batch) - sequence_logprob_sums(sft, t1.batch)))
    return out


# --- one training run ---------------------------------------------------------------------------------------

_CACHE: dict = {"seed": None, "data": {}, "sft": None}  # per worker: one seed's tokenised splits and SFT model


def run_one(cfg: DemoConfig, seed: int, family: str, beta: float) -> dict:
    """`refdpo train` one grid point from the SFT model, then measure it; skipped when its eval.json exists."""
    from transformers import LlamaForCausalLM

    from refdpo.commands.evaluate import EvalConfig, evaluate
    from refdpo.commands.train import train
    from refdpo.commands.train_config import TrainConfig

    folder, seed_folder = run_dir(cfg, seed, family, beta), seed_dir(cfg, seed)
    if (folder / "eval.json").exists():
        return json.loads((folder / "eval.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished run: start it again (each takes seconds)
    if _CACHE["seed"] != seed:
        _CACHE.update(seed=seed, data={}, sft=LlamaForCausalLM.from_pretrained(seed_folder / "sft").eval())
    start = time.perf_counter()
    fields = dict(dataset=str(seed_folder / "data"), template=TEMPLATE, max_len=MAX_LEN, beta=beta,
                  cache_dir="none", **FAMILIES[family][1])  # tokenised in memory once per worker (_CACHE)
    summary = train(TrainConfig(model=str(seed_folder / "sft"), **fields, val_split="", epochs=cfg.epochs,
                                batch_size=cfg.batch_size, max_lr=cfg.max_lr, warmup_ratio=0.1,
                                gradient_checkpointing=False, eval_at_start=False, save_interval=10**9,
                                report_freq=25, report_to="none", output_dir=str(folder / "train"), seed=seed,
                                progress=False).validate(), data_cache=_CACHE["data"])
    ranking = evaluate(EvalConfig(model=summary["last"], **fields, split="val", batch_size=256).validate())[0]
    prepared = json.loads((seed_folder / "prepared.json").read_text())
    policy = LlamaForCausalLM.from_pretrained(summary["last"]).eval()
    measured = measure(cfg, seed, policy, task.word_tokenizer(), prepared["sft_rewards"], _CACHE["sft"])
    measured.pop("rewards")
    result = {"seed": seed, "family": family, "beta": beta, **measured,
              "reward_accuracy": ranking["reward_accuracy"], "policy_accuracy": ranking["policy_accuracy"],
              "steps": summary["steps"], "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(folder / "eval.json", result)
    return result


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


def run_demo(cfg: DemoConfig) -> dict:
    """Prepare every seed, train and measure every grid point, then write the report; returns it."""
    from refdpo.console import progress_bar
    from refdpo.testbed.report import write_report

    _claim(cfg)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    grid = cfg.grid()
    workers = min(cfg.workers or min(os.cpu_count() or 1, 8), len(seeds) * len(grid))
    start = time.perf_counter()
    prepared, results = {}, []
    bar = progress_bar(total=len(seeds) * (PREPARE_WEIGHT + len(grid)), desc="demo", unit="step", dynamic_ncols=True,
               disable=not cfg.progress)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        pending = {pool.submit(prepare, cfg, s): ("prepare", s) for s in seeds}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    kind, seed = pending.pop(future)
                    result = future.result()
                    if kind == "prepare":
                        prepared[seed] = result
                        bar.update(PREPARE_WEIGHT)
                        pending.update({pool.submit(run_one, cfg, seed, f, b): ("run", seed) for f, b in grid})
                    else:
                        results.append(result)
                        bar.update(1)
                    bar.set_postfix_str(f"seeds ready {len(prepared)}/{len(seeds)}, runs {len(results)}/"
                                        f"{len(seeds) * len(grid)}")
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    bar.close()
    return write_report(cfg, prepared, results, seconds=time.perf_counter() - start, workers=workers)
