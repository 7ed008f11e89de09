"""The work of `refdpo demo`'s pool (demo.py): one seed's preparation, one training run, measuring a policy.

Per seed (`prepare`): sample the task, train the SFT model (the self reference), a stronger compatible reference
(the SFT model trained further on good demonstrations) and a stronger incompatible one (another tokenizer,
another initialisation, good demonstrations in another style); sample two replies per prompt from the SFT
model, label them by Bradley-Terry on r*, and score them with `refdpo score` under every reference, prior
included. Then every grid point is one `refdpo train` run (`run_one`), measured on held-out prompts by
sampling from the trained policy and scoring with r* (`measure`) and by `refdpo evaluate`. Each depends only on
the config and the seed, and leaves its marker (prepared.json, eval.json) when done.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np

from refdpo.io import atomic_write_json, read_jsonl, write_jsonl
from refdpo.testbed import task
from refdpo.testbed.demo import DemoConfig, SeedPlan, run_dir, seed_dir
from refdpo.testbed.models import TEMPLATE
from refdpo.testbed.report import reference_agreement
from refdpo.tokenization import save_tokenizer

# --- one seed: task, models, preference data ----------------------------------------------------------

def _save(model, tokenizer, folder: Path) -> None:
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    save_tokenizer(tokenizer, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _demonstrations(keywords: list, n: int, rng: random.Random, good_fraction: float, variant: task.Variant,
                    dialect: bool = False):
    kws = [rng.choice(keywords) for _ in range(n)]
    return kws, [task.demonstration(k, rng, "good" if rng.random() < good_fraction else "mediocre", dialect, variant)
                 for k in kws]


def _pairs(model, tokenizer, keywords: list, cfg: DemoConfig, seed: int, split: str) -> tuple[list[dict], dict]:
    """Two T=1 replies per prompt from the SFT model, labelled by Bradley-Terry on r*. Pairs with a reply that
    never ended are dropped: the data contract's replies end with EOS."""
    from refdpo.testbed.models import sample

    s = sample(model, tokenizer, keywords, greedy=False, max_tokens=cfg.max_reply_tokens, seed=seed,
               num_per_prompt=2)
    keep = [i for i in range(len(keywords)) if s.ended[2 * i] and s.ended[2 * i + 1]]
    replies = [(s.words[2 * i], True, s.words[2 * i + 1], True) for i in keep]
    records, stats = task.preference_records([keywords[i] for i in keep], replies, cfg.task_variant().reward,
                                             cfg.bt_temperature, random.Random(f"{seed}:labels:{split}"), split)
    return records, {**stats, "dropped_unended": len(keywords) - len(keep)}


def _score_all(folder: Path, split: str, references: dict, max_len: int) -> None:
    """`refdpo score` under every reference, one column pair each: raw -> ... -> data/{split}.jsonl."""
    from refdpo.commands.score import ScoreConfig, score

    source = folder / "data" / ".stages" / f"{split}.raw.jsonl"
    for i, (name, (model, columns, mode)) in enumerate(references.items()):
        last = i == len(references) - 1
        out = folder / "data" / (f"{split}.jsonl" if last else f".stages/{split}.{name}.jsonl")
        score(ScoreConfig(model=str(folder / model), dataset=str(source.parent), split=str(source), out=str(out),
                          columns=columns,
                          mode=mode, template=TEMPLATE, max_len=max_len, progress=False, overwrite=True).validate())
        source = out


def _models(cfg: DemoConfig, seed: int, plan: SeedPlan, folder: Path, train_kw: list, rng: random.Random) -> dict:
    """The SFT model (the self reference), its further-trained snapshots on good demonstrations (one trajectory,
    saved at each step count of the plan) and the incompatible reference; returns their SFT losses."""
    from refdpo.testbed.models import new_model, supervised_finetune

    variant, tokenizer = cfg.task_variant(), task.word_tokenizer()
    kws, demos = _demonstrations(train_kw, cfg.demonstrations, rng, 0.5, variant)
    sft = new_model(tokenizer, seed)
    losses = {"sft_loss": supervised_finetune(sft, tokenizer, kws, demos, cfg.sft_steps * variant.sft_scale,
                                              cfg.sft_batch_size, cfg.sft_max_lr, seed)}
    _save(sft, tokenizer, folder / "sft")
    kws, demos = _demonstrations(train_kw, cfg.demonstrations // 2, rng, 1.0, variant)
    losses["compatible_loss"] = supervised_finetune(
        sft, tokenizer, kws, demos, max(plan.snapshots), cfg.sft_batch_size, cfg.sft_max_lr, seed + 1,
        snapshot_at=tuple(plan.snapshots), snapshot=lambda steps: _save(sft, tokenizer, folder / plan.snapshots[steps]))
    kws, demos = _demonstrations(train_kw, cfg.demonstrations // 2, rng, 1.0, variant, dialect=True)
    if plan.incompatible:
        other_tokenizer = task.subword_tokenizer()
        other = new_model(other_tokenizer, seed + 10_000)
        losses["incompatible_loss"] = supervised_finetune(other, other_tokenizer, kws, demos, cfg.incompatible_steps,
                                                          cfg.sft_batch_size, cfg.sft_max_lr, seed + 2)
        _save(other, other_tokenizer, folder / "incompatible")
    return losses


def prepare(cfg: DemoConfig, seed: int) -> dict:
    """Everything one seed's runs share; skipped when seed-N/prepared.json exists."""
    from transformers import LlamaForCausalLM

    folder = seed_dir(cfg, seed)
    if (folder / "prepared.json").exists():
        return json.loads((folder / "prepared.json").read_text())
    start = time.perf_counter()
    plan = cfg.seed_plan(seed)
    rng = random.Random(f"{seed}:task")
    train_kw, heldout_kw = task.prompts(cfg.train_prompts, cfg.heldout_prompts, rng)
    losses = _models(cfg, seed, plan, folder, train_kw, rng)
    tokenizer = task.word_tokenizer()
    sft = LlamaForCausalLM.from_pretrained(folder / "sft").eval()
    data_stats = {}
    for split, keywords in (("train", train_kw), ("val", heldout_kw)):
        records, data_stats[split] = _pairs(sft, tokenizer, keywords, cfg, seed + (split == "val"), split)
        write_jsonl(folder / "data" / ".stages" / f"{split}.raw.jsonl", records)
        _score_all(folder, split, plan.references, cfg.task_variant().max_len)
        if plan.synthesise is not None:
            path = folder / "data" / f"{split}.jsonl"
            write_jsonl(path, plan.synthesise(seed, split, read_jsonl(path)))
    shutil.rmtree(folder / "data" / ".stages")
    atomic_write_json(folder / "prompts.json", {"heldout": heldout_kw})

    baselines = {"sft": measure(cfg, seed, sft, tokenizer, sft_rewards=None, sft=sft)}
    sft_rewards = baselines["sft"].pop("rewards")
    baselines["sft"]["win_rate"] = 0.5
    for name in plan.alone:
        model = LlamaForCausalLM.from_pretrained(folder / name).eval()
        tok = task.subword_tokenizer() if name == "incompatible" else tokenizer
        baselines[f"{name}_ref"] = measure(cfg, seed, model, tok, sft_rewards, None if name == "incompatible" else sft)
        baselines[f"{name}_ref"].pop("rewards")
    if plan.prior_strength:
        baselines["prior_ref"] = {"reward": prior_reward(cfg, seed, sft, tokenizer)}
    info = {"seed": seed, "data": data_stats, "baselines": baselines, "sft_rewards": sft_rewards,
            "references": reference_agreement(folder / "data", plan.references), **losses,
            "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(folder / "prepared.json", info)
    return info


# --- measuring a policy ----------------------------------------------------------------------------------

def _heldout(cfg: DemoConfig, seed: int) -> list[tuple[str, ...]]:
    return [tuple(k) for k in json.loads((seed_dir(cfg, seed) / "prompts.json").read_text())["heldout"]]


def prior_reward(cfg: DemoConfig, seed: int, sft, tokenizer) -> float:
    """The prior's own strength: the mean r* of the SFT model's T=1 replies to an empty user turn, judged
    against each held-out prompt's keywords (what the prior reference scores is p(y | empty prompt))."""
    from refdpo.testbed.models import sample

    heldout = _heldout(cfg, seed)
    t1 = sample(sft, tokenizer, [()] * len(heldout), greedy=False, max_tokens=cfg.max_reply_tokens, seed=seed + 7)
    reward = cfg.task_variant().reward
    return float(np.mean([reward(k, w, e) for k, w, e in zip(heldout, t1.words, t1.ended)]))

def measure(cfg: DemoConfig, seed: int, model, tokenizer, sft_rewards: list | None, sft=None) -> dict:
    """On the held-out prompts: replies sampled at T=1 and greedy, scored by r*; win rate over the SFT model's
    T=1 replies (ties 0.5); KL to the SFT model, estimated as the mean of log pi(y|x) - log sft(y|x) over the
    sampled y (when `sft` shares the tokenizer); log p(EOS) after the held-out chosen and rejected replies."""
    from refdpo.testbed.models import encoded_batch, reply_token_logprobs, sample, sequence_logprob_sums

    folder = seed_dir(cfg, seed)
    heldout = _heldout(cfg, seed)
    reward = cfg.task_variant().reward
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
    if _CACHE["seed"] != seed_folder:
        _CACHE.update(seed=seed_folder, data={}, sft=LlamaForCausalLM.from_pretrained(seed_folder / "sft").eval())
    start = time.perf_counter()
    fields = dict(dataset=str(seed_folder / "data"), template=TEMPLATE, max_len=cfg.task_variant().max_len,
                  beta=beta, cache_dir="none", **cfg.families()[family])  # tokenised in memory once per worker (_CACHE)
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
