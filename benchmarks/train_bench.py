"""DPO training-step throughput on CPU (or one GPU): refdpo vs TRL's DPOTrainer vs a hand-written floor.

What is measured: the tokens/s of one optimizer step of DPO (batch of 8 pairs, no accumulation) on the same
random-init model, the same pairs in the same order, the same reference log-probs and the same allocator
settings, by three tools, each run in a fresh subprocess:

  refdpo  `refdpo.commands.train.train(TrainConfig(...))` on a dataset that stores the reference log-probs (scored
          beforehand with `refdpo.commands.score.score`, untimed): template tulu, batch_size 8, accumulate_step 1,
          float32 (GPU: mixed_precision bf16), no gradient checkpointing, no validation split, report_freq 1,
          one checkpoint at the end, its defaults otherwise (packing on). Per-step time and tokens come from
          the run's metrics.jsonl (`tokens` / `tokens_per_s`: train.py times from the end of the previous
          report to this one, so one record = sampling + collate + forward + backward + clip + AdamW +
          scheduler + the metrics reduction). `refdpo.commands.train._train_step` is wrapped (it still runs unchanged)
          only to see which pairs each step gets, to reset the peak-RSS counter at the first measured step and
          read it after the last one (before the final checkpoint is written), and to time the call itself
          (reported as a cross-check).
  trl     `trl.DPOTrainer` with DPOConfig(precompute_ref_log_probs=True, per_device_train_batch_size=8,
          gradient_accumulation_steps=1, max_length, fp32 (GPU: bf16=True), no gradient checkpointing,
          report_to=[], logging_steps=1, save_strategy="no", max_steps, dataloader_num_workers=0, fixed seed,
          beta 0.1, loss sigmoid, the learning-rate settings of refdpo, train_sampling_strategy="sequential"
          on the pairs listed in refdpo's step order); its other defaults as shipped (optimizer included).
          The pairs are given as the text refdpo's tulu template renders (TRL tokenises it; the ids are
          compared with refdpo's). Its reference pre-computation (inside DPOTrainer.__init__) is timed
          separately and reported, never counted in step time. A step is timed by a TrainerCallback from
          on_step_begin to on_step_end (forward, backward, clip, optimizer, scheduler; the DataLoader/collator
          runs before on_step_begin, so TRL's collation is NOT in its step time: end-to-end time between
          consecutive step ends is reported as "cycle" too). Tokens: `training_step` is overridden to add up,
          before calling TRL's, `attention_mask` of the collated batch (DataCollatorForPreference: keys
          input_ids, attention_mask, completion_mask, ref_chosen_logps, ref_rejected_logps; rows = [prompt +
          chosen; prompt + rejected], right-padded), i.e. every non-padding token fed to the model.
  floor   a minimal step written here: the padded [chosen; rejected] batch (2B rows, right padding, explicit
          position ids), `model.model(...)` hidden states, only the positions that predict a response token
          gathered and sent through `model.lm_head`, float32 log_softmax + gather, float64 sums, DPO sigmoid
          loss against the stored reference log-probs, backward, clip_grad_norm_(1.0), AdamW step, zero_grad
          (timed from collation to `loss.item()`). The same pairs and order. What a step costs close to the
          hardware's floor in eager PyTorch.

Tokens per step, for every tool: the non-padding tokens of the 2B sequences (prompt + response, the prompt
counted in both). Each run does --warmup untimed steps then --steps measured ones; a run's number is the
median over its measured steps; the report is the median over --reps runs. Order: for rep, for size, for
allocator, for tool in (refdpo, trl, floor): one fresh subprocess each (environment set before it starts, so
peak RSS and allocator state are its own). Before each run the machine must be quiet (other processes using at
most --max-other-load of the cores, waiting up to --idle-wait s); the load other processes put on the cores
during the measured steps is recorded, and a run above --max-other-load is redone (--retries), the discarded
attempts kept in the JSON.

Allocators (--allocators): `default`: each tool as it ships: refdpo's subprocess calls
`refdpo.allocator.tune_allocator()` first, as the refdpo entry point does (glibc mallopt settings), TRL and the
floor run with glibc's defaults. `tuned`: every subprocess gets the same allocator, LD_PRELOAD of tcmalloc when
/usr/lib/x86_64-linux-gnu/libtcmalloc*.so* exists, else MALLOC_MMAP_THRESHOLD_=33554432
MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864 (--tuned-allocator picks; tune_allocator() sees
either and does nothing; what it did is recorded). Every subprocess uses torch.set_flush_denormal(True) and
torch.set_num_threads(--threads), OMP_NUM_THREADS likewise.

Memory: peak RSS = VmHWM of the subprocess, reset through /proc/self/clear_refs at the first measured step and
read after the last one (so it includes the model, optimizer state and data the process holds, not the setup
phase); its growth over the RSS at the first measured step and the process's peak up to the end of the measured
steps (setup included: TRL's pre-computation, refdpo's start-up checks) are reported too. On a GPU the peak of
torch.cuda.max_memory_allocated over the measured steps is reported as well.

MFU: model FLOPs of a step = 6 N T + 6 H V R + 6 L H sum(s^2), where N = non-embedding parameters (the tied
embedding/LM head excluded), T = tokens of the step (as above), H = hidden size, V = vocabulary rows, R =
response tokens (the positions whose log-prob DPO needs: only they need the LM head), L = layers, s = the
length of each of the 2B sequences (causal attention: 12 L H s^2 / 2 for forward + backward). MFU = FLOPs/s
divided by the machine's measured peak: the median GFLOP/s of `a @ b` on 2048 x 2048 float32 matrices with the
same thread count (GPU: 8192 x 8192 bfloat16), measured once at the start. The same model FLOPs count for all
tools (padding or recomputation a tool adds is its cost, not model work).

Numerics, once per size: on the first step's batch, refdpo's `forward_pairs` (padded `collate_pairs` and the
packed `collate_packed` the training loop uses) against the floor's loss, in float32 with float64 sums: the
per-sequence log-probs, the loss with the stored references (policy == reference at step 1, so it is log 2)
and with references shifted by +-10 nats (a non-trivial loss), and the gradient norm. The step-1 loss and mean
log-probs each tool logged in its own run are compared too (all tools see the same first batch).

Everything is built offline: a byte-level BPE tokenizer trained on synthetic text (`refdpo.testbed.tiny`),
the model's vocabulary padded to 16,384 rows, a random-init `LlamaForCausalLM` (tied embeddings, float32):
`12m` hidden 320, 4 layers, 5 heads, intermediate 1280; `40m` hidden 512, 8 layers, 8 heads, intermediate
2048; `0.5b` (with --device cuda only) hidden 1024, 24 layers, 16 heads, 8 KV heads, intermediate 5504, 32,000
rows, bf16 autocast, sdpa or flash_attention_2 when installed. Pairs: prompts of ~32-128 tokens, responses of
~32-256, max_length 512 (nothing is truncated).

Targets (CPU, 40m): refdpo tokens/s >= 2.5x TRL's with allocator "default" and >= 1.5x with "tuned"; refdpo's
peak RSS over the measured steps <= 0.6x TRL's.

Run (from the repository root):
    .venv/bin/python benchmarks/train_bench.py [--size 12m,40m] [--allocators default,tuned] [--reps 3]
Results: a markdown table on stdout and JSON in benchmarks/results/train_bench.json (`--out`), rewritten after
every run (with "complete": false until the end).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

# Offline before anything imports huggingface_hub/datasets; TRL's precompute reads TQDM_DISABLE.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TUNE_FLAG = "--child-tune-allocator"
if TUNE_FLAG in sys.argv:  # a refdpo subprocess: what the refdpo entry point does first, before torch exists
    from refdpo.allocator import tune_allocator

    _TUNE_APPLIED: bool | None = tune_allocator()
else:
    _TUNE_APPLIED = None

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchdata import TextMaker, make_records  # noqa: E402 (its own folder)
from benchutil import (  # noqa: E402 (its own folder)
    cpu_busy_s,
    cpu_name,
    reset_peak_rss,
    status_kb,
    trl_version,
    wait_for_quiet,
)

TEMPLATE = "tulu"
BATCH = 8  # pairs per step
BETA = 0.1
LR = 5e-7  # refdpo's default max_lr, given to TRL and the floor too
WEIGHT_DECAY = 0.01
# hidden, layers, heads, kv_heads, intermediate; vocab = model rows; tokenizer_vocab = BPE size it is trained to.
SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=2048, tokenizer_vocab=2048),
    "12m": dict(hidden=320, layers=4, heads=5, kv_heads=5, intermediate=1280, vocab=16_384, tokenizer_vocab=16_384),
    "40m": dict(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=2048, vocab=16_384, tokenizer_vocab=16_384),
    "0.5b": dict(hidden=1024, layers=24, heads=16, kv_heads=8, intermediate=5504, vocab=32_000,
                 tokenizer_vocab=16_384),
}
PUBLIC_SIZES = ("12m", "40m", "0.5b")  # "tiny" is for smoke tests
GPU_ONLY = {"0.5b"}
TOOLS = ("refdpo", "trl", "floor")
ALLOCATORS = ("default", "tuned")
TUNED_GLIBC = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824",
               "MALLOC_TOP_PAD_": "67108864"}
PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
REF_COLUMNS = ("chosen_logprob", "rejected_logprob")
LOGP_TOL = 1e-3  # nats per sequence, refdpo vs floor
LOSS_TOL = 1e-4
TARGETS = {"default": 2.5, "tuned": 1.5}  # refdpo tokens/s over TRL's at 40m
MEMORY_TARGET = 0.6  # refdpo peak RSS over TRL's at 40m


# ----------------------------------------------------------------------------------------------- synthetic data
# (the text comes from benchdata.py, shared with score_bench.py)

def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------------------------------------- measurement

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Window:
    """The measured steps of one run: peak RSS (VmHWM reset at the start), the GPU's peak allocation, this
    process's CPU seconds and the share of the cores other processes used meanwhile."""

    def __init__(self, device: torch.device):
        self.device = device
        self.info: dict | None = None

    def start(self) -> None:
        self.peak_before_kb = status_kb("VmHWM")  # the process's peak so far (setup)
        self.reset = reset_peak_rss()
        self.rss0_kb = status_kb("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.busy0, self.cpu0, self.t0 = cpu_busy_s(), time.process_time(), time.perf_counter()

    def stop(self) -> dict:
        seconds = time.perf_counter() - self.t0
        cpu, busy1 = time.process_time() - self.cpu0, cpu_busy_s()
        peak_kb = status_kb("VmHWM") if self.reset else None
        other = None
        if self.busy0 is not None and busy1 is not None:
            other = max(0.0, (busy1 - self.busy0 - cpu) / (seconds * (os.cpu_count() or 1)))
        def mb(kb: int | None) -> float | None:
            return kb / 1024 if kb is not None else None

        self.info = {
            "seconds": seconds, "cpu_seconds": cpu, "other_load": other, "torch_threads": torch.get_num_threads(),
            "peak_rss_mb": mb(peak_kb), "rss_start_mb": mb(self.rss0_kb),
            "rss_growth_mb": mb(peak_kb - self.rss0_kb) if peak_kb and self.rss0_kb else None,
            "lifetime_peak_rss_mb": mb(max(peak_kb or 0, self.peak_before_kb or 0)) if self.reset else
            mb(status_kb("VmHWM")),
            "peak_gpu_mb": (torch.cuda.max_memory_allocated(self.device) / 2**20
                            if self.device.type == "cuda" else None)}
        return self.info


def batch_shape(data, indices) -> dict:
    """Tokens (non-padding, chosen + rejected), response tokens and sum of squared sequence lengths."""
    seqs = [data.chosen[i] for i in indices] + [data.rejected[i] for i in indices]
    lengths = [len(s.input_ids) for s in seqs]
    return {"tokens": int(sum(lengths)), "response_tokens": int(sum(n - s.response_start
                                                                      for n, s in zip(lengths, seqs))),
            "sum_sq_len": int(sum(n * n for n in lengths))}


def model_flops(step: dict, dims: dict) -> float:
    """6 N T + 6 H V R + 6 L H sum(s^2) (see the module docstring)."""
    return (6.0 * dims["non_embedding_params"] * step["tokens"]
            + 6.0 * dims["hidden"] * dims["vocab_rows"] * step["response_tokens"]
            + 6.0 * dims["layers"] * dims["hidden"] * step["sum_sq_len"])


def measure_peak(device: torch.device, threads: int, reps: int = 7) -> dict:
    """Median GFLOP/s of a plain matmul: 2048^2 float32 on a CPU, 8192^2 bfloat16 on a GPU."""
    torch.set_num_threads(threads)
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        rates.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return {"gflops": statistics.median(rates), "gflops_runs": rates, "n": n, "dtype": str(dtype).removeprefix(
        "torch."), "device": str(device), "threads": threads}


# ------------------------------------------------------------------------------------------------- the floor

def floor_batch(data, indices, pad_id: int, device: torch.device) -> dict:
    """The padded [chosen; rejected] batch and where the response log-probs are."""
    seqs = [data.chosen[i] for i in indices] + [data.rejected[i] for i in indices]
    lengths = [len(s.input_ids) for s in seqs]
    width = max(lengths)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    predicts = torch.zeros((len(seqs), width), dtype=torch.bool)  # position p predicts a response token
    for row, seq in enumerate(seqs):
        input_ids[row, :lengths[row]] = torch.from_numpy(seq.input_ids)
        attention_mask[row, :lengths[row]] = 1
        predicts[row, seq.response_start - 1:lengths[row] - 1] = True
    where = predicts.nonzero()
    flat_index = where[:, 0] * width + where[:, 1]
    ref_c = data.ref_chosen[indices] if data.ref_chosen is not None else np.zeros(len(indices))
    ref_r = data.ref_rejected[indices] if data.ref_rejected is not None else np.zeros(len(indices))
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "position_ids": torch.arange(width).expand(len(seqs), width),
             "flat_index": flat_index, "targets": input_ids.flatten()[flat_index + 1], "segment": where[:, 0],
             "ref_chosen": torch.tensor(ref_c, dtype=torch.float64),
             "ref_rejected": torch.tensor(ref_r, dtype=torch.float64)}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["num_tokens"] = int(sum(lengths))
    return batch


def floor_loss(model, batch: dict, beta: float = BETA, ref_shift: torch.Tensor | None = None):
    """DPO sigmoid loss (mean over pairs) and the policy's summed response log-probs (chosen, rejected)."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], use_cache=False).last_hidden_state
    rows = hidden.reshape(-1, hidden.shape[-1])[batch["flat_index"]]
    logits = model.lm_head(rows).float()
    token_lp = torch.log_softmax(logits, dim=-1).gather(1, batch["targets"][:, None]).squeeze(1)
    n = batch["ref_chosen"].shape[0]
    sums = torch.zeros(2 * n, dtype=torch.float64, device=token_lp.device).index_add(
        0, batch["segment"], token_lp.double())
    chosen, rejected = sums[:n], sums[n:]
    ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
    if ref_shift is not None:
        ref_c, ref_r = ref_c + ref_shift, ref_r - ref_shift
    z = beta * ((chosen - ref_c) - (rejected - ref_r))
    return -torch.nn.functional.logsigmoid(z).mean(), chosen, rejected


# ----------------------------------------------------------------------------------------------------- setup

def load_model(model_dir: str | Path, attn: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    return model.to(device)


def load_data(setup_dir: Path, tokenizer, max_len: int):
    from refdpo.data import build_pairs, load_split

    return build_pairs(load_split(str(setup_dir / "data"), "train"), tokenizer, TEMPLATE, max_len, REF_COLUMNS)


def model_dims(model) -> dict:
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight
    untied_head = head.numel() if head.data_ptr() != model.get_input_embeddings().weight.data_ptr() else 0
    return {"parameters": total, "embedding_params": embedding, "untied_head_params": untied_head,
            "non_embedding_params": total - embedding - untied_head, "hidden": config.hidden_size,
            "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads, "intermediate": config.intermediate_size,
            "vocab_rows": config.vocab_size, "tied": bool(config.tie_word_embeddings)}


def build_setup(size: str, args: argparse.Namespace, root: Path, device: torch.device,
                texts: dict) -> dict:
    """Tokenizer, random-init Llama, pairs scored by that model as reference (untimed), TRL's text rows and
    the step order, under root/size. `texts` caches (tokenizer, records) per tokenizer size across sizes."""
    from refdpo.commands.score import ScoreConfig, score
    from refdpo.data import PairSampler
    from refdpo.data.templates import render
    from refdpo.modeling import pad_token_id
    from refdpo.testbed.tiny import tiny_llama, train_tokenizer

    spec = SIZES[size]
    out = root / size
    pairs = (args.warmup + args.steps) * args.batch
    key = spec["tokenizer_vocab"]
    if key not in texts:
        maker = TextMaker(args.seed)
        tokenizer = train_tokenizer(["<|system|>\n<|user|>\n<|assistant|>\n"]
                                    + [maker.sentence() for _ in range(40_000)], vocab_size=key)
        maker.tokenizer = tokenizer
        prompt_text, _ = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                TEMPLATE, tokenizer)
        overhead = len(tokenizer(prompt_text)["input_ids"]) - 1  # BOS + markers around the user content
        texts[key] = (tokenizer, make_records(maker, pairs, overhead))
    tokenizer, records = texts[key]
    model = tiny_llama(tokenizer, hidden=spec["hidden"], layers=spec["layers"], heads=spec["heads"],
                       kv_heads=spec["kv_heads"], intermediate=spec["intermediate"], vocab_size=spec["vocab"],
                       seed=args.seed, tie=True, max_positions=args.max_len)
    dims = model_dims(model)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    del model
    write_jsonl(out / "raw" / "train.jsonl", records)
    t0 = time.perf_counter()
    score(ScoreConfig(model=str(out / "model"), dataset=str(out / "raw"), split="train",
                      out=str(out / "data" / "train.jsonl"), template=TEMPLATE, max_len=args.max_len,
                      dtype="float32", progress=False).validate())
    scoring_s = time.perf_counter() - t0
    data = load_data(out, tokenizer, args.max_len)
    if len(data) != pairs:
        print(f"warning: {pairs - len(data)} of {pairs} pairs were dropped by build_pairs", flush=True)
    order = PairSampler(len(data), args.batch, 1, 1, 0, args.seed).order(0).tolist()
    rows = []
    for i in order:
        r = records[data.rows[i]]
        prompt, full_c = render(r["chosen"], TEMPLATE, tokenizer)
        _, full_r = render(r["rejected"], TEMPLATE, tokenizer)
        rows.append({"prompt": prompt, "chosen": full_c[len(prompt):], "rejected": full_r[len(prompt):]})
    expected = [{"chosen": data.chosen[i].input_ids.tolist(), "rejected": data.rejected[i].input_ids.tolist(),
                 "response_start": int(data.chosen[i].response_start)} for i in order]
    (out / "plan.json").write_text(json.dumps({"order": order, "pairs": len(data), "dims": dims,
                                               "pad_id": pad_token_id(tokenizer)}))
    (out / "trl_rows.json").write_text(json.dumps({"rows": rows, "expected_ids": expected}))
    prompts = [s.response_start for s in data.chosen]
    responses = [len(s.input_ids) - s.response_start for s in data.chosen + data.rejected]

    def stats(v: list[int]) -> dict:
        return {"min": int(min(v)), "median": float(statistics.median(v)), "max": int(max(v))}

    return {"dir": str(out), "dims": dims, "order": order, "data": data, "tokenizer": tokenizer,
            "pad_id": pad_token_id(tokenizer),
            "info": {"pairs": len(data), "tokenizer_vocab": len(tokenizer), "reference_scoring_s": scoring_s,
                     "prompt_tokens": stats(prompts), "response_tokens": stats(responses),
                     "tokens_per_pair_median": float(statistics.median(
                         data.num_tokens(i) for i in range(len(data))))}}


def numerics_check(setup: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """refdpo's forward_pairs (padded and packed) vs the floor on the first step's batch, float32 weights."""
    from refdpo.core.forward import forward_pairs
    from refdpo.core.objectives import Objective
    from refdpo.core.verify import head_matches_model
    from refdpo.data import collate_packed, collate_pairs, to_device

    data, pad_id = setup["data"], setup["pad_id"]
    model = load_model(Path(setup["dir"]) / "model", args.attn, device)
    model.train()
    idx = np.asarray(setup["order"][:args.batch])
    weights = np.ones(len(idx))
    shift = torch.linspace(-10.0, 10.0, len(idx), dtype=torch.float64, device=device)
    objective = Objective("dpo", BETA)
    fused, _ = head_matches_model(model, to_device(collate_pairs(data, idx[:1], weights[:1], pad_id), device))
    results = {}

    def grad_norm(module: torch.nn.Module) -> float:
        norms = [p.grad.double().norm() for p in module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    for name, collate in (("refdpo_padded", collate_pairs), ("refdpo_packed", partial(collate_packed, capacity=0))):
        batch = to_device(collate(data, idx, weights, pad_id), device)
        with torch.no_grad():
            out = forward_pairs(model, batch, objective, fused)
        shifted = dict(batch, ref_chosen=batch["ref_chosen"] + shift, ref_rejected=batch["ref_rejected"] - shift)
        model.zero_grad(set_to_none=True)
        out_shift = forward_pairs(model, shifted, objective, fused)
        loss_shift = (out_shift["losses"] * shifted["weights"]).sum() / len(idx)
        loss_shift.backward()
        results[name] = {"loss": float((out["losses"] * batch["weights"]).sum() / len(idx)),
                         "loss_shifted": loss_shift.item(), "grad_norm": grad_norm(model),
                         "chosen": out["policy_chosen"].double().cpu(),
                         "rejected": out["policy_rejected"].double().cpu()}
    batch = floor_batch(data, idx, pad_id, device)
    with torch.no_grad():
        loss, chosen, rejected = floor_loss(model, batch)
    model.zero_grad(set_to_none=True)
    loss_shift = floor_loss(model, batch, ref_shift=shift)[0]
    loss_shift.backward()
    floor = {"loss": loss.item(), "loss_shifted": loss_shift.item(), "grad_norm": grad_norm(model),
             "chosen": chosen.detach().cpu(), "rejected": rejected.detach().cpu()}
    report = {"batch_pairs": len(idx), "fused_head": fused, "ref_shift_nats": [-10.0, 10.0],
              "floor": {k: floor[k] for k in ("loss", "loss_shifted", "grad_norm")}}
    for name, r in results.items():
        logp_diff = float(max((r["chosen"] - floor["chosen"]).abs().max(),
                              (r["rejected"] - floor["rejected"]).abs().max()))
        loss_diff = abs(r["loss"] - floor["loss"])
        shifted_diff = abs(r["loss_shifted"] - floor["loss_shifted"])
        report[name] = {"loss": r["loss"], "loss_shifted": r["loss_shifted"], "grad_norm": r["grad_norm"],
                        "logp_max_abs_diff_vs_floor": logp_diff, "loss_abs_diff_vs_floor": loss_diff,
                        "loss_shifted_abs_diff_vs_floor": shifted_diff,
                        "grad_norm_rel_diff_vs_floor": abs(r["grad_norm"] - floor["grad_norm"]) / max(
                            floor["grad_norm"], 1e-30),
                        "agree": logp_diff <= LOGP_TOL and max(loss_diff, shifted_diff) <= LOSS_TOL}
    report["tolerances"] = {"logp_nats": LOGP_TOL, "loss": LOSS_TOL}
    del model
    return report


# ------------------------------------------------------------------------------------------- the subprocesses

def _step_records(steps: list[dict], warmup: int) -> list[dict]:
    for k, s in enumerate(steps):
        s["step"] = k + 1
        s["measured"] = k >= warmup
    return steps


def child_refdpo(spec: dict, device: torch.device) -> dict:
    import refdpo.commands.train as rt
    from refdpo.commands.train_config import TrainConfig

    setup = Path(spec["setup_dir"])
    plan = json.loads((setup / "plan.json").read_text())
    first, last = spec["warmup"], spec["warmup"] + spec["steps"] - 1
    original = rt._train_step
    signature = inspect.signature(original)
    window = Window(device)
    steps: list[dict] = []

    def wrapped(*a, **k):
        bound = signature.bind(*a, **k)
        bound.apply_defaults()
        args = bound.arguments
        i = len(steps)
        if i == first:
            window.start()
        t0 = time.perf_counter()
        result = original(*a, **k)
        _sync(device)
        seconds = time.perf_counter() - t0
        indices = np.concatenate([ix for ix, _ in args["micro_batches"]]).tolist()
        run = args["run"]  # refdpo.commands.train.Run: what the step trains on, and its layout
        collate = run.collate
        name = getattr(getattr(collate, "func", collate), "__name__", str(collate))
        if isinstance(collate, partial) and collate.keywords:
            name += "(" + ", ".join(f"{k}={v}" for k, v in collate.keywords.items()) + ")"
        steps.append({"seconds_wrapped": seconds, "indices": indices, "collate": name,
                      **batch_shape(run.train_data, indices)})
        if i == last:
            window.stop()
        return result

    rt._train_step = wrapped
    cfg = TrainConfig(model=str(setup / "model"), dataset=str(setup / "data"), train_split="train",
                      val_split="", template=TEMPLATE, max_len=spec["max_len"], epochs=1,
                      batch_size=spec["batch"], accumulate_step=1, dtype="float32",
                      mixed_precision="bf16" if device.type == "cuda" else "no", gradient_checkpointing=False,
                      attn_implementation=spec["attn"], eval_at_start=False, report_freq=1, report_to="none",
                      save_interval=10**9, max_train_pairs=(spec["warmup"] + spec["steps"]) * spec["batch"],
                      output_dir=spec["run_dir"], seed=spec["seed"], progress=False).validate()
    t0 = time.perf_counter()
    summary = rt.train(cfg)
    total_s = time.perf_counter() - t0
    records = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    records = [r for r in records if "tokens_per_s" in r]
    if len(records) != len(steps):
        raise RuntimeError(f"metrics.jsonl has {len(records)} training records for {len(steps)} steps")
    for s, r in zip(steps, records):
        s.update(seconds=r["tokens"] / r["tokens_per_s"], tokens_per_s=r["tokens_per_s"],
                 metrics_tokens=r["tokens"], loss=r["loss"], logp_chosen=r["logp_chosen"],
                 logp_rejected=r["logp_rejected"])
        if r["tokens"] != s["tokens"]:
            s["tokens_mismatch"] = True
    order = plan["order"]
    # What a step holds, not its order: the sampler splits a step into micro-batches by length.
    same = all(sorted(s["indices"]) == sorted(order[k * spec["batch"]:(k + 1) * spec["batch"]])
               for k, s in enumerate(steps))
    for s in steps:
        del s["indices"]
    return {"steps": _step_records(steps, spec["warmup"]), "window": window.info, "total_s": total_s,
            "same_batches_as_plan": same, "tune_allocator_applied": _TUNE_APPLIED,
            "collate": steps[0]["collate"] if steps else None,
            "step1": {k: steps[0].get(k) for k in ("loss", "logp_chosen", "logp_rejected")} if steps else None}


def child_trl(spec: dict, device: torch.device) -> dict:
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    disable_progress_bars()
    setup = Path(spec["setup_dir"])
    payload = json.loads((setup / "trl_rows.json").read_text())
    batch, warmup, n_steps = spec["batch"], spec["warmup"], spec["steps"]

    class BenchDPOTrainer(DPOTrainer):
        """DPOTrainer, counting the tokens fed to each step and timing its reference pre-computation."""

        def __init__(self, *a, **k):
            self.bench_pending: list[dict] = []
            self.bench_precompute: list[dict] = []
            self.bench_ref_batches = 0
            super().__init__(*a, **k)

        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            lengths = mask.sum(dim=1)
            half = mask.shape[0] // 2
            self.bench_pending.append({"tokens": int(mask.sum()),
                                       "response_tokens": int(inputs["completion_mask"].sum()),
                                       "sum_sq_len": int((lengths * lengths).sum()),
                                       "chosen_lengths": lengths[:half].tolist(), "width": int(mask.shape[1])})
            return super().training_step(model, inputs, num_items_in_batch)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            _sync(device)
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            _sync(device)
            self.bench_precompute.append({"split": name, "seconds": time.perf_counter() - t0, "pairs": len(dataset),
                                          "batch_size": batch_size})
            return out

        def compute_ref_log_probs(self, model, inputs):
            self.bench_ref_batches += 1
            return super().compute_ref_log_probs(model, inputs)

    window = Window(device)
    steps: list[dict] = []

    class StepTimer(TrainerCallback):
        trainer: BenchDPOTrainer | None = None
        t_begin = t_end = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                window.start()
            self.trainer.bench_pending.clear()
            _sync(device)
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            now = time.perf_counter()
            pending = self.trainer.bench_pending
            step = {key: sum(p[key] for p in pending) for key in ("tokens", "response_tokens", "sum_sq_len")}
            step.update(seconds=now - self.t_begin, cycle_seconds=(now - self.t_end) if self.t_end else None,
                        chosen_lengths=[n for p in pending for n in p["chosen_lengths"]],
                        widths=[p["width"] for p in pending])
            step["tokens_per_s"] = step["tokens"] / step["seconds"]
            steps.append(step)
            self.t_end = now
            if state.global_step == warmup + n_steps:
                window.stop()

    timer = StepTimer()
    tokenizer = AutoTokenizer.from_pretrained(str(setup / "model"))
    model = load_model(setup / "model", spec["attn"], device)
    cuda = device.type == "cuda"
    config = DPOConfig(
        output_dir=spec["run_dir"], report_to=[], use_cpu=not cuda, bf16=cuda, fp16=False,
        gradient_checkpointing=False, max_length=spec["max_len"], precompute_ref_log_probs=True,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, logging_strategy="steps",
        logging_steps=1, save_strategy="no", eval_strategy="no", max_steps=warmup + n_steps,
        dataloader_num_workers=0, dataloader_pin_memory=cuda, seed=spec["seed"], data_seed=spec["seed"],
        beta=BETA, loss_type=["sigmoid"], learning_rate=LR, weight_decay=WEIGHT_DECAY, warmup_steps=0.1,
        lr_scheduler_type="linear", max_grad_norm=1.0, train_sampling_strategy="sequential", disable_tqdm=True)
    t0 = time.perf_counter()
    trainer = BenchDPOTrainer(model=model, args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(payload["rows"]), callbacks=[timer])
    init_s = time.perf_counter() - t0
    timer.trainer = trainer
    # Do TRL's token ids equal refdpo's (same text, same tokenizer)?
    ds = trainer.train_dataset
    expected = payload["expected_ids"]
    identical = sum(p + c == e["chosen"] and p + r == e["rejected"] and len(p) == e["response_start"]
                    for p, c, r, e in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], expected))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    expected_lengths = [[len(e["chosen"]) for e in expected[k * batch:(k + 1) * batch]] for k in range(len(steps))]
    same = all(s["chosen_lengths"] == want for s, want in zip(steps, expected_lengths))
    for s in steps:
        del s["chosen_lengths"]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    step1 = None
    if logs:
        step1 = {"loss": logs[0]["loss"], "logp_chosen": logs[0].get("logps/chosen"),
                 "logp_rejected": logs[0].get("logps/rejected")}
    return {"steps": _step_records(steps, warmup), "window": window.info, "init_s": init_s, "train_s": train_s,
            "precompute": trainer.bench_precompute, "precompute_ref_batches": trainer.bench_ref_batches,
            "precompute_s": sum(p["seconds"] for p in trainer.bench_precompute),
            "pairs_identical_to_refdpo": int(identical), "pairs": len(expected), "same_batches_as_plan": same,
            "optim": str(config.optim), "step1": step1, "trl_loss_history": logs,
            "token_keys": "sum of attention_mask over input_ids rows [prompt+chosen; prompt+rejected] "
                          "(DataCollatorForPreference); response tokens = completion_mask"}


def child_floor(spec: dict, device: torch.device) -> dict:
    from transformers import AutoTokenizer

    setup = Path(spec["setup_dir"])
    plan = json.loads((setup / "plan.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(setup / "model"))
    data = load_data(setup, tokenizer, spec["max_len"])
    model = load_model(setup / "model", spec["attn"], device)
    model.train()
    torch.manual_seed(spec["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    order, batch_pairs = plan["order"], spec["batch"]
    window = Window(device)
    steps: list[dict] = []
    for k in range(spec["warmup"] + spec["steps"]):
        indices = order[k * batch_pairs:(k + 1) * batch_pairs]
        if k == spec["warmup"]:
            window.start()
        _sync(device)
        t0 = time.perf_counter()
        batch = floor_batch(data, indices, plan["pad_id"], device)
        with autocast:
            loss, chosen, rejected = floor_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # waits for the device, as a logged loss would
        seconds = time.perf_counter() - t0
        shape = batch_shape(data, indices)
        steps.append({"seconds": seconds, "tokens_per_s": shape["tokens"] / seconds, "loss": loss_value,
                      "logp_chosen": float(chosen.detach().mean()), "logp_rejected": float(rejected.detach().mean()),
                      **shape})
        if k == spec["warmup"] + spec["steps"] - 1:
            window.stop()
    return {"steps": _step_records(steps, spec["warmup"]), "window": window.info, "same_batches_as_plan": True,
            "step1": {k: steps[0][k] for k in ("loss", "logp_chosen", "logp_rejected")}}


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import logging

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as refdpo's train does; bf16 autocast matmuls anyway
    t0 = time.perf_counter()
    try:
        result = {"child": CHILDREN[spec["tool"]](spec, device)}
        result.update(ok=True)
    except Exception as e:
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["wall_s"] = time.perf_counter() - t0
    result["env"] = {k: v for k, v in os.environ.items()
                     if k.startswith("MALLOC_") or k in ("LD_PRELOAD", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if result["ok"] else 1


CHILDREN = {"refdpo": child_refdpo, "trl": child_trl, "floor": child_floor}


# ---------------------------------------------------------------------------------------------- orchestration

def find_tcmalloc() -> str | None:
    found = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libtcmalloc*.so*"))
    for prefix in ("libtcmalloc_minimal.so", "libtcmalloc.so"):
        for path in found:
            if Path(path).name.startswith(prefix):
                return path
    return None


def child_env(allocator: str, tuned_kind: str, tcmalloc: str | None, args: argparse.Namespace,
              workdir: Path) -> dict:
    """The environment a subprocess starts with: this one's, minus any allocator settings, plus the mode's."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") and k.endswith("_"))}
    env.pop("REFDPO_TUNE_MALLOC", None)  # refdpo as it ships
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split()
               if not any(a in p for a in PRELOADED_ALLOCATORS)]
    if allocator == "tuned":
        if tuned_kind == "tcmalloc":
            preload.append(tcmalloc)
        else:
            env.update(TUNED_GLIBC)
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               TQDM_DISABLE="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(workdir / "hf_datasets"))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_child(tool: str, size: str, allocator: str, rep: int, args: argparse.Namespace, setup: dict,
              workdir: Path, envs: dict) -> dict:
    """One (tool, size, allocator) run in a fresh subprocess, redone when the machine was contended."""
    attempts = []
    for attempt in range(1 + args.retries):
        tag = f"{tool}-{size}-{allocator}-rep{rep}-try{attempt}"
        spec = {"tool": tool, "setup_dir": setup["dir"], "run_dir": str(workdir / "runs" / tag),
                "result": str(workdir / f"{tag}.result.json"), "warmup": args.warmup, "steps": args.steps,
                "batch": args.batch, "max_len": args.max_len, "threads": args.threads, "device": args.device,
                "attn": args.attn, "seed": args.seed}
        spec_path = workdir / f"{tag}.spec.json"
        spec_path.write_text(json.dumps(spec))
        waited, load_before = wait_for_quiet(args.max_other_load, args.idle_wait)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
        if tool == "refdpo":
            cmd.append(TUNE_FLAG)
        log_path = workdir / f"{tag}.log"
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(cmd, env=envs[allocator], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                      timeout=args.child_timeout)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        wall = time.perf_counter() - t0
        result_path = Path(spec["result"])
        result = json.loads(result_path.read_text()) if result_path.exists() else {"ok": False}
        if not result.get("ok"):
            tail = log_path.read_text()[-3000:]
            result.setdefault("error", f"subprocess exited with {code}")
            result["log_tail"] = tail
        result.update(tool=tool, size=size, allocator=allocator, rep=rep, attempt=attempt, exit_code=code,
                      subprocess_wall_s=wall, waited_for_quiet_s=round(waited, 1), other_load_before=load_before)
        if result.get("ok"):
            summarise_run(result, setup["dims"], args)
        attempts.append(result)
        load = (result.get("child") or {}).get("window", {}) or {}
        load = load.get("other_load")
        if not result.get("ok") or load is None or load <= args.max_other_load:
            break
        if attempt < args.retries:
            print(f"  {tag}: other processes used {100 * load:.0f}% of the cores during the measured steps; "
                  "redoing", flush=True)
    ok = [a for a in attempts if a.get("ok")]
    best = min(ok, key=lambda a: a["child"]["window"].get("other_load") or 0.0) if ok else attempts[-1]
    best["discarded_contended"] = [{k: v for k, v in a.items() if k != "discarded_contended"}
                                   for a in attempts if a is not best]
    return best


def summarise_run(result: dict, dims: dict, args: argparse.Namespace) -> None:
    """Per-run medians over the measured steps: tokens/s, model FLOPs/s."""
    measured = [s for s in result["child"]["steps"] if s["measured"]]
    for s in result["child"]["steps"]:
        s["model_flops"] = model_flops(s, dims)
        s["model_flops_per_s"] = s["model_flops"] / s["seconds"]
    result["measured_steps"] = len(measured)
    if measured:
        result["tokens_per_s_median"] = statistics.median(s["tokens_per_s"] for s in measured)
        result["model_flops_per_s_median"] = statistics.median(s["model_flops_per_s"] for s in measured)
        result["step_seconds_median"] = statistics.median(s["seconds"] for s in measured)
    if len(measured) < args.steps:
        result["warning"] = f"only {len(measured)} of {args.steps} measured steps ran"


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: list[dict], peak: dict, sizes: list[str], args: argparse.Namespace) -> dict:
    summary: dict = {}
    for size in sizes:
        for allocator in args.allocators:
            cell = {}
            for tool in args.tools:
                mine = [r for r in runs if (r["size"], r["allocator"], r["tool"]) == (size, allocator, tool)
                        and r.get("ok") and "tokens_per_s_median" in r]
                if not mine:
                    continue
                windows = [r["child"]["window"] or {} for r in mine]
                entry = {
                    "runs": len(mine),
                    "tokens_per_s": _median([r["tokens_per_s_median"] for r in mine]),
                    "tokens_per_s_runs": [r["tokens_per_s_median"] for r in mine],
                    "step_seconds": _median([r["step_seconds_median"] for r in mine]),
                    "mfu": _median([r["model_flops_per_s_median"] / (peak["gflops"] * 1e9) for r in mine]),
                    "peak_rss_mb": _median([w.get("peak_rss_mb") for w in windows]),
                    "peak_rss_mb_runs": [w.get("peak_rss_mb") for w in windows],
                    "rss_growth_mb": _median([w.get("rss_growth_mb") for w in windows]),
                    "lifetime_peak_rss_mb": _median([w.get("lifetime_peak_rss_mb") for w in windows]),
                    "peak_gpu_mb": _median([w.get("peak_gpu_mb") for w in windows]),
                    "other_load_max": max((w.get("other_load") or 0.0) for w in windows),
                    "torch_threads": sorted({w.get("torch_threads") for w in windows}),
                    "same_batches_as_plan": all(r["child"].get("same_batches_as_plan") for r in mine),
                }
                if tool == "trl":
                    entry["precompute_s"] = _median([r["child"].get("precompute_s") for r in mine])
                    entry["cycle_tokens_per_s"] = _median([_median(
                        [s["tokens"] / s["cycle_seconds"] for s in r["child"]["steps"]
                         if s["measured"] and s.get("cycle_seconds")]) for r in mine])
                if tool == "refdpo":
                    entry["collate"] = mine[0]["child"].get("collate")
                    entry["tune_allocator_applied"] = sorted({str(r["child"].get("tune_allocator_applied"))
                                                              for r in mine})
                    entry["wrapped_tokens_per_s"] = _median([_median(
                        [s["tokens"] / s["seconds_wrapped"] for s in r["child"]["steps"] if s["measured"]])
                        for r in mine])
                cell[tool] = entry
            ratios = {}
            if "refdpo" in cell:
                for other in ("trl", "floor"):
                    if other in cell:
                        ratios[f"refdpo_over_{other}_tokens_per_s"] = (cell["refdpo"]["tokens_per_s"]
                                                                       / cell[other]["tokens_per_s"])
                mem_key = "peak_gpu_mb" if args.device == "cuda" else "peak_rss_mb"
                if "trl" in cell and cell["trl"].get(mem_key) and cell["refdpo"].get(mem_key):
                    ratios[f"refdpo_over_trl_{mem_key}"] = cell["refdpo"][mem_key] / cell["trl"][mem_key]
            summary.setdefault(size, {})[allocator] = {"tools": cell, "ratios": ratios}
    return summary


def targets(summary: dict, args: argparse.Namespace) -> list[dict]:
    out = []
    cell = summary.get("40m", {})
    for allocator, target in TARGETS.items():
        ratio = cell.get(allocator, {}).get("ratios", {}).get("refdpo_over_trl_tokens_per_s")
        out.append({"name": f"40m {allocator}: refdpo tokens/s >= {target}x trl", "value": ratio,
                    "met": None if ratio is None or args.device != "cpu" else ratio >= target})
    for allocator in ALLOCATORS:
        ratio = cell.get(allocator, {}).get("ratios", {}).get("refdpo_over_trl_peak_rss_mb")
        out.append({"name": f"40m {allocator}: refdpo peak RSS <= {MEMORY_TARGET}x trl", "value": ratio,
                    "met": None if ratio is None or args.device != "cpu" else ratio <= MEMORY_TARGET})
    return out


def machine_info(args: argparse.Namespace, tcmalloc: str | None) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "hostname": platform.node(), "cpu": cpu_name(), "cpu_count": os.cpu_count(), "gpu": gpu,
            "torch_threads": args.threads, "flush_denormal": True, "python": platform.python_version(),
            "platform": platform.platform(), "libc": " ".join(platform.libc_ver()), "tcmalloc": tcmalloc,
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version()}


def _fmt(value, spec: str = ".0f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_report(out: dict, args: argparse.Namespace) -> None:
    gpu = args.device == "cuda"
    print(f"\npeak: {out['peak']['gflops']:.1f} GFLOP/s ({out['peak']['n']}^2 {out['peak']['dtype']} matmul, "
          f"{out['peak']['threads']} threads); {args.warmup} warm-up + {args.steps} measured steps, batch "
          f"{args.batch} pairs, {args.reps} reps")
    for size, s in out["setups"].items():
        d = s["dims"]
        print(f"{size}: {d['parameters']:,} parameters ({d['non_embedding_params']:,} non-embedding, "
              f"{d['embedding_params']:,} tied embedding = {d['vocab_rows']:,} rows x {d['hidden']}), "
              f"{d['layers']} layers, {d['heads']} heads / {d['kv_heads']} KV, intermediate {d['intermediate']}; "
              f"{s['info']['pairs']} pairs, reference scoring {s['info']['reference_scoring_s']:.1f}s (untimed)")
    header = ["size", "allocator", "tool", "tokens/s", "x trl", "x floor", "peak RSS MB", "RSS growth MB",
              "process peak MB", "mem x trl"] + (["peak GPU MB"] if gpu else []) + ["MFU", "other load", "runs"]
    print("\n| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for size, by_alloc in out["summary"].items():
        for allocator, cell in by_alloc.items():
            ratios = cell["ratios"]
            for tool, e in cell["tools"].items():
                mem_key = "peak_gpu_mb" if gpu else "peak_rss_mb"
                row = [size, allocator, tool, _fmt(e["tokens_per_s"]),
                       _fmt(ratios.get("refdpo_over_trl_tokens_per_s"), ".2f") if tool == "refdpo" else "",
                       _fmt(ratios.get("refdpo_over_floor_tokens_per_s"), ".2f") if tool == "refdpo" else "",
                       _fmt(e["peak_rss_mb"]), _fmt(e["rss_growth_mb"]), _fmt(e["lifetime_peak_rss_mb"]),
                       _fmt(ratios.get(f"refdpo_over_trl_{mem_key}"), ".2f") if tool == "refdpo" else ""]
                row += [_fmt(e["peak_gpu_mb"])] if gpu else []
                row += [_fmt(100 * e["mfu"] if e["mfu"] is not None else None, ".1f") + "%",
                        f"{100 * e['other_load_max']:.0f}%", str(e["runs"])]
                print("| " + " | ".join(row) + " |")
    print("(tokens/s: median over reps of each run's median step; peak RSS: VmHWM over the measured steps; "
          "process peak: setup included; other load: the largest share of the cores other processes used "
          "during a run's measured steps)")
    for size, by_alloc in out["summary"].items():
        for allocator, cell in by_alloc.items():
            tools = cell["tools"]
            notes = []
            if "trl" in tools:
                notes.append(f"trl precompute {_fmt(tools['trl'].get('precompute_s'), '.2f')}s (not in step time), "
                             f"trl end-to-end cycle {_fmt(tools['trl'].get('cycle_tokens_per_s'))} tokens/s")
            if "refdpo" in tools:
                r = tools["refdpo"]
                notes.append(f"refdpo collate {r.get('collate')}, tune_allocator applied "
                             f"{','.join(r.get('tune_allocator_applied', []))}, _train_step alone "
                             f"{_fmt(r.get('wrapped_tokens_per_s'))} tokens/s")
            bad = [t for t, e in tools.items() if not e["same_batches_as_plan"]]
            if bad:
                notes.append(f"WARNING: {', '.join(bad)} did not get the planned batches")
            print(f"{size} {allocator}: " + "; ".join(notes))
    for size, check in out["numerics"].items():
        for name in ("refdpo_padded", "refdpo_packed"):
            c = check.get(name)
            if c:
                print(f"numerics {size} {name} vs floor: logp max |diff| {c['logp_max_abs_diff_vs_floor']:.2e} nats, "
                      f"loss |diff| {c['loss_abs_diff_vs_floor']:.2e} (loss {c['loss']:.6f}), shifted-reference "
                      f"loss |diff| {c['loss_shifted_abs_diff_vs_floor']:.2e} (loss {c['loss_shifted']:.6f}), "
                      f"grad norm rel diff {c['grad_norm_rel_diff_vs_floor']:.2e}: "
                      f"{'agree' if c['agree'] else 'DISAGREE'}")
        if "error" in check:
            print(f"numerics {size}: check failed: {check['error']}")
    for size, by_tool in out.get("step1", {}).items():
        parts = [f"{tool} loss {_fmt(v.get('loss'), '.6f')} logp chosen {_fmt(v.get('logp_chosen'), '.3f')} "
                 f"rejected {_fmt(v.get('logp_rejected'), '.3f')}" for tool, v in by_tool.items() if v]
        print(f"step 1 in the runs, {size}: " + "; ".join(parts))
    for t in out["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"target {t['name']}: {_fmt(t['value'], '.2f')} -> {verdict}")
    for r in out["failed"]:
        print(f"FAILED {r['tool']} {r['size']} {r['allocator']} rep {r['rep']}: {r.get('error')}")
    if args.reps < 3:
        print(f"note: --reps {args.reps} (< 3): a smoke run, not a result")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="12m,40m", help=f"comma-separated: {', '.join(PUBLIC_SIZES)} (0.5b: "
                                                     "--device cuda only; default 12m,40m)")
    p.add_argument("--allocators", default=",".join(ALLOCATORS), help="comma-separated: default,tuned")
    p.add_argument("--tuned-allocator", choices=("auto", "tcmalloc", "glibc"), default="auto",
                   help="what 'tuned' means: tcmalloc (LD_PRELOAD), glibc (MALLOC_* variables), or auto: tcmalloc "
                        "when /usr/lib/x86_64-linux-gnu/libtcmalloc* exists, else glibc")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of refdpo,trl,floor")
    p.add_argument("--reps", type=int, default=3, help="rounds (default 3; use at least 3 for a result)")
    p.add_argument("--steps", type=int, default=8, help="measured steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps per run (default 2)")
    p.add_argument("--batch", type=int, default=BATCH, help=f"pairs per step (default {BATCH})")
    p.add_argument("--max-len", type=int, default=512, help="refdpo max_len and TRL max_length (default 512)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for every tool")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--attn", default="auto", help="attention for every tool: auto (flash_attention_2 on a GPU "
                                                  "when installed, else sdpa), sdpa, eager, flash_attention_2")
    p.add_argument("--max-other-load", type=float, default=0.10,
                   help="redo a run during whose measured steps other processes used more than this share of "
                        "the cores (default 0.10), and wait for at most --idle-wait s of quiet before each run")
    p.add_argument("--retries", type=int, default=1, help="redos of a contended run (default 1)")
    p.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for quiet (default 120)")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds per subprocess (default 3600)")
    p.add_argument("--skip-numerics", action="store_true", help="skip the refdpo-vs-floor numerics check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="keep models, data and run logs here")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "train_bench.json")
    args = p.parse_args(argv)
    args.sizes = [s for s in args.size.split(",") if s]
    args.allocators = [a for a in args.allocators.split(",") if a]
    args.tools = [t for t in args.tools.split(",") if t]
    for name, values, allowed in (("size", args.sizes, SIZES), ("allocators", args.allocators, ALLOCATORS),
                                  ("tools", args.tools, TOOLS)):
        if unknown := set(values) - set(allowed):
            p.error(f"unknown --{name}: {', '.join(sorted(unknown))}")
    args.tools = [t for t in TOOLS if t in args.tools]  # the order each round runs them
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is available")
    if args.device == "cpu" and (gpu_only := [s for s in args.sizes if s in GPU_ONLY]):
        p.error(f"--size {','.join(gpu_only)} needs --device cuda")
    if min(args.reps, args.steps, args.batch) < 1 or args.warmup < 0:
        p.error("--reps, --steps and --batch must be >= 1, --warmup >= 0")
    if args.attn == "auto":
        from transformers.utils import is_flash_attn_2_available

        args.attn = "flash_attention_2" if args.device == "cuda" and is_flash_attn_2_available() else "sdpa"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child_main(argv[1])
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    device = torch.device(args.device)
    tcmalloc = find_tcmalloc()
    tuned_kind = args.tuned_allocator
    if tuned_kind == "auto":
        tuned_kind = "tcmalloc" if tcmalloc else "glibc"
    if tuned_kind == "tcmalloc" and not tcmalloc:
        print("error: --tuned-allocator tcmalloc: no /usr/lib/x86_64-linux-gnu/libtcmalloc*.so* found", file=sys.stderr)
        return 2
    command = " ".join([".venv/bin/python", "benchmarks/train_bench.py", *argv])
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        envs = {a: child_env(a, tuned_kind, tcmalloc, args, workdir) for a in ALLOCATORS}
        waited, load = wait_for_quiet(args.max_other_load, args.idle_wait)
        peak = measure_peak(device, args.threads)
        peak.update(waited_for_quiet_s=round(waited, 1), other_load_before=load)
        print(f"peak {peak['gflops']:.1f} GFLOP/s ({peak['n']}^2 {peak['dtype']}, {args.threads} threads)", flush=True)
        setups, numerics, texts = {}, {}, {}
        for size in args.sizes:
            t0 = time.perf_counter()
            setups[size] = build_setup(size, args, workdir / "setup", device, texts)
            d = setups[size]["dims"]
            print(f"setup {size} {time.perf_counter() - t0:.1f}s: {d['parameters']:,} parameters "
                  f"({d['non_embedding_params']:,} non-embedding), {setups[size]['info']}", flush=True)
            if not args.skip_numerics:
                try:
                    numerics[size] = numerics_check(setups[size], args, device)
                except Exception as e:  # report, and measure all the same
                    traceback.print_exc()
                    numerics[size] = {"error": f"{type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the subprocesses need the GPU's memory, not this process's cache
        out = {"benchmark": "DPO training-step throughput (benchmarks/train_bench.py)", "complete": False,
               "command": command, "machine": machine_info(args, tcmalloc), "peak": peak,
               "config": {"sizes": args.sizes, "allocators": args.allocators, "tools": args.tools,
                          "tuned_allocator": tuned_kind,
                          "tuned_env": ({"LD_PRELOAD": tcmalloc} if tuned_kind == "tcmalloc" else TUNED_GLIBC),
                          "reps": args.reps, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
                          "max_len": args.max_len, "threads": args.threads, "device": args.device,
                          "attn_implementation": args.attn, "seed": args.seed, "beta": BETA, "lr": LR,
                          "weight_decay": WEIGHT_DECAY, "template": TEMPLATE,
                          "dtype": "float32 weights, bf16 autocast" if args.device == "cuda" else "float32",
                          "max_other_load": args.max_other_load, "retries": args.retries,
                          "order": "for rep: for size: for allocator: for tool in " + ", ".join(args.tools),
                          "mfu_formula": "6*N_nonembedding*tokens + 6*hidden*vocab*response_tokens "
                                         "+ 6*layers*hidden*sum(seq_len^2)"},
               "setups": {s: {"dims": v["dims"], "info": v["info"], "model": SIZES[s]} for s, v in setups.items()},
               "numerics": numerics, "runs": [], "summary": {}, "targets": [], "failed": []}
        write_json(args.out, out)
        runs = out["runs"]
        for rep in range(args.reps):
            for size in args.sizes:
                for allocator in args.allocators:
                    for tool in args.tools:
                        r = run_child(tool, size, allocator, rep, args, setups[size], workdir, envs)
                        runs.append(r)
                        if r.get("ok"):
                            w = r["child"]["window"] or {}
                            print(f"rep {rep + 1}/{args.reps} {size} {allocator:<7} {tool:<6} "
                                  f"{_fmt(r.get('tokens_per_s_median'))} tokens/s, peak RSS "
                                  f"{_fmt(w.get('peak_rss_mb'))} MB, other load "
                                  f"{_fmt(100 * w['other_load'] if w.get('other_load') is not None else None)}% "
                                  f"({r['subprocess_wall_s']:.0f}s)", flush=True)
                        else:
                            print(f"rep {rep + 1}/{args.reps} {size} {allocator} {tool} FAILED: {r.get('error')}\n"
                                  f"{r.get('log_tail', '')}", flush=True)
                        out["summary"] = summarise(runs, peak, args.sizes, args)
                        write_json(args.out, out)
        out["summary"] = summarise(runs, peak, args.sizes, args)
        out["targets"] = targets(out["summary"], args)
        out["failed"] = [{k: r.get(k) for k in ("tool", "size", "allocator", "rep", "error")}
                         for r in runs if not r.get("ok")]
        step1: dict = {}
        for r in runs:
            if r.get("ok") and r["rep"] == 0 and r["allocator"] == args.allocators[0]:
                step1.setdefault(r["size"], {})[r["tool"]] = r["child"].get("step1")
        out["step1"] = step1
        out["complete"] = True
        write_json(args.out, out)
    print_report(out, args)
    print(f"wrote {args.out}")
    return 1 if out["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
