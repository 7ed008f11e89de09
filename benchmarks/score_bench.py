"""Reference log-prob throughput on CPU or one GPU: refdpo vs a naive per-example loop vs TRL's precompute.

What is measured: the tokens/s of computing, for every preference pair, the summed log-prob of the chosen and
of the rejected response under a reference model (the `chosen_logprob`/`rejected_logprob` a RefDPO dataset
stores), by three tools in the same process, on the same model weights and the same pairs:

  refdpo  `refdpo.commands.score.score_data(model, data, pad_id, share_prompt=True, fused=True)` (batch sizes: its own
          defaults, or --batch-tokens/--max-batch-pairs) on the `PairData` from
          `refdpo.data.build_pairs(..., "tulu", ...)`;
          the timed call includes whatever checks score_data itself runs (a user pays for them too).
          Optional `refdpo-plain` (`--tools`): the same with share_prompt=False.
  naive   for each pair, chosen and rejected separately (batch of 1): `model(input_ids).logits`, float32
          log_softmax, gather the response tokens, sum (in float64). Same token ids as refdpo.
  trl     TRL's `DPOTrainer(precompute_ref_log_probs=True)`: the timed call is
          `trainer._precompute_ref_logps(dataset, "train", precompute_ref_batch_size)`, the method DPOTrainer
          runs from `__init__` (its DataLoader + collator, `compute_ref_log_probs` with TRL's fused LM head, and
          writing the Arrow cache). The pairs are fed as plain text rendered by refdpo's tulu template, so TRL
          tokenises the same text; the token ids are compared and both token counts are reported.

Everything is built offline: a byte-level BPE tokenizer trained on synthetic text (`refdpo.testbed.tiny`), its
vocabulary padded to 16,384 rows, a random-init `LlamaForCausalLM` (`--size 12m`: ~12M parameters, `40m`:
~40M), and `--pairs` pairs in the RefDPO schema with prompts of ~32-128 tokens and responses of ~32-256
tokens (written as JSON lines and read back through refdpo's loader). All tools run in float32 with the same
`torch.set_num_threads` and `torch.set_flush_denormal(True)`.

On a GPU (`--device cuda`) every tool runs the same model on it, in `--dtype` (default bfloat16, what `refdpo
score --dtype auto` picks there; TRL gets bf16=True), and the peak of `torch.cuda.max_memory_allocated` during
each pass is reported besides RSS. bfloat16 log-probs differ between batchings by rounding, so agreement is
then checked against a relative tolerance (BF16_REL_TOL of each sequence's log-prob) instead of 1e-3 nats.

Timing: model building, tokenisation and TRL's dataset preparation are excluded; each tool gets one untimed
warm-up on 16 pairs; then `--reps` rounds alternate the tools (refdpo, naive, trl, refdpo, ...) and the
median is reported. Tokens per pass = non-padding tokens of all chosen + rejected sequences (prompt +
response) in refdpo's tokenisation (TRL's own count is used for TRL should it differ). Peak RSS per tool is
the process's high-water mark during that tool's passes (reset before each pass through
/proc/self/clear_refs), so it includes the model and data held by the process; the growth over the RSS at
the pass's start is reported too. "other load" is the share of the machine's cores that other processes kept
busy during a pass (from /proc/stat): on a shared 2-core machine a contended pass is slower for reasons no
tool controls, so each pass waits for quiet first and is redone (`--retries`) when others took more than
`--max-other-load` of the cores meanwhile; discarded passes are kept in the JSON.

The log-probs are checked: refdpo vs naive must agree within 1e-3 nats per sequence; TRL vs naive is reported
where the token ids match.

Run (from the repository root):
    .venv/bin/python benchmarks/score_bench.py [--size 12m|40m] [--pairs N] [--reps 3] [--device cuda]
Results: a table on stdout and JSON in benchmarks/results/score_bench.json (`--out`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# Offline before anything imports huggingface_hub/datasets; TRL's precompute reads TQDM_DISABLE.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from refdpo.data import PairData, build_pairs, load_split  # noqa: E402
from refdpo.data.templates import render  # noqa: E402
from refdpo.modeling import pad_token_id  # noqa: E402
from refdpo.testbed.tiny import tiny_llama, train_tokenizer  # noqa: E402

TEMPLATE = "tulu"
VOCAB = 16_384
# (hidden, layers, heads, kv_heads, intermediate): ~12M and ~40M parameters with the tied 16k embedding.
SIZES = {"12m": dict(hidden=256, layers=8, heads=8, kv_heads=4, intermediate=1024),
         "40m": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=2048)}
AGREE_TOL = 1e-3  # nats per sequence (float32)
BF16_REL_TOL = 1e-3  # of |log-prob| per sequence: bfloat16 keeps 8 bits, and batching changes the rounding
TOOLS = ("refdpo", "naive", "trl")  # the default set, in the order each round runs them
# refdpo-plain (optional): score_data with share_prompt=False, to see what sharing the prompt is worth.
REFDPO_VARIANTS = {"refdpo": True, "refdpo-plain": False}
WARMUP_PAIRS = 16  # untimed first calls: shapes, allocator, first-touched memory


# ----------------------------------------------------------------------------------------------- synthetic data
# (the text comes from benchdata.py, shared with train_bench.py)

@dataclasses.dataclass
class Setup:
    tokenizer: object
    model: torch.nn.Module
    data: PairData
    records: list[dict]
    pad_id: int
    jsonl: Path


def build_setup(size: str, pairs: int, max_len: int, seed: int, workdir: Path, vocab: int = VOCAB,
                device: str = "cpu", dtype: str = "float32") -> Setup:
    """Tokenizer, random-init Llama and tokenised pairs, all offline; the model on `device` in `dtype`."""
    maker = TextMaker(seed)
    tokenizer = train_tokenizer(["<|system|>\n<|user|>\n<|assistant|>\n"]
                                + [maker.sentence() for _ in range(40_000)], vocab_size=VOCAB)
    maker.tokenizer = tokenizer
    prompt_text, _ = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                            TEMPLATE, tokenizer)
    overhead = len(tokenizer(prompt_text)["input_ids"]) - 1  # BOS + markers around the user content
    records = make_records(maker, pairs, overhead)
    jsonl = workdir / "pairs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    data = build_pairs(load_split(str(jsonl), "train"), tokenizer, TEMPLATE, max_len, ref_columns=None)
    # A vocabulary above the tokenizer's (e.g. Llama 3's 128k) adds output rows the text never uses: the LM head
    # costs what it costs in such a model.
    model = tiny_llama(tokenizer, **SIZES[size], vocab_size=max(vocab, VOCAB), seed=seed, max_positions=max_len)
    model.config.use_cache = False  # scoring never decodes; no tool should pay for a KV cache
    model.to(device, getattr(torch, dtype)).eval()
    return Setup(tokenizer, model, data, records, pad_token_id(tokenizer), jsonl)


def subset(data: PairData, n: int) -> PairData:
    """The first `n` pairs (for warm-ups)."""
    return dataclasses.replace(data, chosen=data.chosen[:n], rejected=data.rejected[:n], rows=data.rows[:n])


# ------------------------------------------------------------------------------------------------------ tools

Scorer = Callable[[], tuple[np.ndarray, np.ndarray]]


def load_score_data() -> tuple[Callable | None, str]:
    """refdpo's batched scorer, or None and why (it is being written; an import may fail mid-edit)."""
    try:
        from refdpo.commands.score import score_data
    except Exception as e:  # ImportError, or a half-edited module's SyntaxError/NameError
        return None, f"{type(e).__name__}: {e}"
    return score_data, ""


@torch.no_grad()
def naive_scores(model: torch.nn.Module, data: PairData) -> tuple[np.ndarray, np.ndarray]:
    """One forward per sequence, full logits, float32 log_softmax, summed in float64 (as refdpo sums)."""
    out = np.empty((2, len(data)))
    device = next(model.parameters()).device
    for side, seqs in enumerate((data.chosen, data.rejected)):
        for i, seq in enumerate(seqs):
            ids = torch.from_numpy(seq.input_ids).long()[None].to(device)
            logits = model(ids).logits[0, :-1].float()
            logps = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).squeeze(1)
            out[side, i] = logps[seq.response_start - 1:].double().sum().item()
    return out[0], out[1]


class TrlPrecompute:
    """A DPOTrainer with precompute_ref_log_probs=True, and its precompute pass, re-runnable on demand."""

    def __init__(self, model: torch.nn.Module, setup: Setup, batch: int, max_len: int, workdir: Path,
                 bf16: bool = False):
        from datasets import Dataset, disable_progress_bars
        from trl import DPOConfig, DPOTrainer

        disable_progress_bars()
        # Plain text rendered by refdpo's template: TRL tokenises prompt and prompt+completion with the
        # tokenizer's special tokens (BOS), as refdpo does, so the ids can be identical.
        rows = []
        for r in setup.records:
            prompt, full_c = render(r["chosen"], TEMPLATE, setup.tokenizer)
            _, full_r = render(r["rejected"], TEMPLATE, setup.tokenizer)
            rows.append({"prompt": prompt, "chosen": full_c[len(prompt):], "rejected": full_r[len(prompt):]})
        rows = [rows[i] for i in setup.data.rows]  # the pairs refdpo kept, in its order
        self.config = DPOConfig(
            output_dir=str(workdir / "trl"), report_to="none",
            use_cpu=next(model.parameters()).device.type == "cpu",
            bf16=bf16, fp16=False,  # the other tools' dtype (TRL's default is bf16 autocast)
            gradient_checkpointing=False, max_length=max_len, precompute_ref_log_probs=True,
            precompute_ref_batch_size=batch, per_device_train_batch_size=batch,
            dataloader_pin_memory=False, disable_tqdm=True, save_strategy="no", logging_strategy="no")
        # Constructing the trainer runs the precompute on a few pairs: TRL's untimed warm-up.
        self.trainer = DPOTrainer(model=model, args=self.config, processing_class=setup.tokenizer,
                                  train_dataset=Dataset.from_list(rows[:WARMUP_PAIRS]))
        # The full set, prepared (tokenised) by TRL's own code outside the timing, as refdpo's build_pairs is.
        self.dataset = self.trainer._prepare_dataset(Dataset.from_list(rows), setup.tokenizer, self.config,
                                                     "bench")
        self.batch = batch

    def _cache_file(self) -> str:
        # DPOTrainer._precompute_ref_logps returns early if this cache exists; remove it so each rep computes.
        from datasets.fingerprint import Hasher

        fingerprint = Hasher.hash((self.dataset._fingerprint, self.trainer._precompute_model_hash))
        return self.dataset._get_cache_file_path(fingerprint)

    def prepare(self) -> None:
        path = self._cache_file()
        if os.path.exists(path):
            os.remove(path)

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        ds = self.trainer._precompute_ref_logps(self.dataset, "train", self.batch)
        return np.asarray(ds["ref_chosen_logps"], dtype=np.float64), np.asarray(ds["ref_rejected_logps"],
                                                                              dtype=np.float64)

    def token_ids(self) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """(prompt+chosen ids, prompt+rejected ids, prompt lengths) as TRL tokenised them."""
        p, c, r = self.dataset["prompt_ids"], self.dataset["chosen_ids"], self.dataset["rejected_ids"]
        return [a + b for a, b in zip(p, c)], [a + b for a, b in zip(p, r)], [len(a) for a in p]


# ---------------------------------------------------------------------------------------------- measurement

def timed(fn: Scorer) -> tuple[float, tuple[np.ndarray, np.ndarray], dict]:
    """Seconds, result, and what else happened: this process's CPU seconds, the share of the machine's cores
    that other processes kept busy (a contended run is slower for reasons no tool controls), and memory
    (peak RSS during the call and its growth over the RSS at the start, MB; the GPU's peak allocation)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak_rss()
    start_kb = status_kb("VmRSS")
    busy0, cpu0 = cpu_busy_s(), time.process_time()
    t0 = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cpu, busy1 = time.process_time() - cpu0, cpu_busy_s()
    peak_kb = status_kb("VmHWM") if reset else None
    other = None
    if busy0 is not None and busy1 is not None:
        other = max(0.0, (busy1 - busy0 - cpu) / (seconds * (os.cpu_count() or 1)))
    info = {"cpu_seconds": cpu, "other_load": other,
            "peak_rss_mb": peak_kb / 1024 if peak_kb else None,
            "rss_growth_mb": max(0, peak_kb - start_kb) / 1024 if peak_kb and start_kb else None,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    return seconds, result, info


def run_pass(tool: str, fn: Scorer, prepare: Callable[[], None] | None,
             args: argparse.Namespace) -> tuple[float, tuple[np.ndarray, np.ndarray], dict]:
    """One timed pass, redone (up to --retries times) when other processes took more than --max-other-load of
    the cores meanwhile: this machine may be shared, and a contended pass measures the neighbour. The least
    contended attempt is kept; the others are returned under "discarded_contended"."""
    attempts = []
    for attempt in range(1 + args.retries):
        waited, _ = wait_for_quiet(args.max_other_load, args.idle_wait)
        if prepare is not None:
            prepare()
        seconds, result, info = timed(fn)
        info.update(seconds=seconds, waited_for_quiet_s=round(waited, 1))
        attempts.append((seconds, result, info))
        load = info["other_load"]
        if load is None or load <= args.max_other_load:
            break
        if attempt < args.retries:
            print(f"  {tool}: {seconds:.2f}s with other processes using {100 * load:.0f}% of the cores; "
                  "redoing", flush=True)
    best = min(range(len(attempts)), key=lambda k: attempts[k][2]["other_load"] or 0.0)
    seconds, result, info = attempts[best]
    info["discarded_contended"] = [a[2] for k, a in enumerate(attempts) if k != best]
    return seconds, result, info


def refdpo_diagnostics(model: torch.nn.Module, data: PairData, pad_id: int, kwargs: dict) -> dict:
    """Where refdpo's time can go, from its own helpers (untimed; internals may change, so guarded): the
    per-call layout check and the positions its batches compute (padding included) against the real tokens."""
    try:
        from refdpo.commands.score import decide_layout, plan_batches, score_data

        defaults = {k: p.default for k, p in inspect.signature(score_data).parameters.items()}
        batch_tokens = kwargs.get("batch_tokens") or defaults.get("batch_tokens")
        if not batch_tokens:  # 0: chosen per device
            from refdpo.commands.score import default_batch_tokens

            batch_tokens = default_batch_tokens(next(model.parameters()).device)
        max_pairs = kwargs.get("max_batch_pairs") or defaults.get("max_batch_pairs")
        t0 = time.perf_counter()
        fused, share = decide_layout(model, data, pad_id, kwargs.get("share_prompt", True))
        decide_s = time.perf_counter() - t0
        plan = plan_batches(data, batch_tokens, max_pairs, share)
        positions = 0
        for indices, shared in plan:
            c = [len(data.chosen[i].input_ids) for i in indices]
            r = [len(data.rejected[i].input_ids) for i in indices]
            if shared:  # one row per pair: prompt once, then both responses
                widths = [a + b - data.chosen[i].response_start for a, b, i in zip(c, r, indices)]
                positions += len(indices) * -(-max(widths) // 8) * 8
            else:
                positions += 2 * len(indices) * -(-max(c + r) // 8) * 8
    except Exception as e:  # diagnostics only: never fail the benchmark over them
        return {"error": f"{type(e).__name__}: {e}"}
    return {"decide_layout_s": decide_s, "fused": fused, "shared": share, "batch_tokens": int(batch_tokens),
            "max_batch_pairs": max_pairs, "batches": len(plan),
            "pairs_per_batch": [len(i) for i, _ in plan], "positions_computed": positions,
            "tokens_per_pass": int(sum(data.num_tokens(i) for i in range(len(data))))}


def max_abs_diff(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    return float(max(np.max(np.abs(a[0] - b[0])), np.max(np.abs(a[1] - b[1]))))


def max_rel_diff(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Largest |a - b| / max(1, |b|) over sequences: bfloat16's rounding scales with the log-prob."""
    return float(max(np.max(np.abs(x - y) / np.maximum(1.0, np.abs(y))) for x, y in zip(a, b)))


def _stats(values: list[int]) -> dict:
    return {"min": int(min(values)), "median": float(statistics.median(values)), "max": int(max(values))}


def data_stats(data: PairData) -> dict:
    prompts = [s.response_start for s in data.chosen]
    responses = [len(s.input_ids) - s.response_start for s in data.chosen + data.rejected]
    return {"pairs": len(data), "tokens_per_pass": int(sum(data.num_tokens(i) for i in range(len(data)))),
            "prompt_tokens": _stats(prompts), "response_tokens": _stats(responses), **data.stats}


def trl_token_check(trl: TrlPrecompute, data: PairData) -> dict:
    """Do TRL's token ids equal refdpo's? TRL's own token count, for an honest tokens/s."""
    chosen, rejected, prompt_lens = trl.token_ids()
    same = sum(list(c) == data.chosen[i].input_ids.tolist() and list(r) == data.rejected[i].input_ids.tolist()
               and prompt_lens[i] == data.chosen[i].response_start == data.rejected[i].response_start
               for i, (c, r) in enumerate(zip(chosen, rejected)))
    return {"pairs_identical": int(same), "pairs": len(data),
            "tokens_per_pass": int(sum(len(c) + len(r) for c, r in zip(chosen, rejected)))}


def machine_info(threads: int) -> dict:
    import transformers

    gpu = {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if torch.cuda.is_available() else {}
    return {**gpu, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": threads, "flush_denormal": True,
            "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version()}


# ------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="12m", help="model size (default 12m)")
    p.add_argument("--vocab", type=int, default=VOCAB,
                   help=f"model vocabulary (default {VOCAB}; 128256 is Llama 3's, the paper's RQ3 reference)")
    p.add_argument("--pairs", type=int, default=128, help="preference pairs (default 128)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds, tools alternating (default 3, min 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for every tool")
    p.add_argument("--max-len", type=int, default=512, help="refdpo max_len and TRL max_length (default 512)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="refdpo score_data batch_tokens (default: score_data's own default)")
    p.add_argument("--max-batch-pairs", type=int, default=None,
                   help="refdpo score_data max_batch_pairs (default: score_data's own default)")
    p.add_argument("--trl-batch", type=int, default=8,
                   help="TRL precompute_ref_batch_size in pairs (default 8, TRL's default "
                        "per_device_train_batch_size)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, run in this order: refdpo,naive,trl (default) and "
                        "optionally refdpo-plain")
    p.add_argument("--max-other-load", type=float, default=0.10,
                   help="redo a pass during which other processes used more than this share of the cores "
                        "(default 0.10), and wait for at most --idle-wait s of quiet before each pass")
    p.add_argument("--retries", type=int, default=2, help="redos of a contended pass (default 2)")
    p.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for quiet (default 120)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="every tool's model dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "score_bench.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.tools = [t for t in args.tools.split(",") if t]
    if unknown := set(args.tools) - set(TOOLS) - set(REFDPO_VARIANTS):
        p.error(f"unknown tools: {', '.join(sorted(unknown))}")
    args.reps = max(1, args.reps)
    return args


def build_scorers(args: argparse.Namespace, setup: Setup, workdir: Path,
                  skipped: dict[str, str]) -> tuple[dict[str, Scorer], dict[str, Callable[[], None]], dict]:
    """Each tool's timed callable and per-rep preparation; warm-ups run here, untimed."""
    scorers: dict[str, Scorer] = {}
    prepares: dict[str, Callable[[], None]] = {}
    extra: dict = {}
    data, model = setup.data, setup.model
    variants = [t for t in args.tools if t in REFDPO_VARIANTS]
    if variants:
        score_data, why = load_score_data()
        if score_data is None:
            for tool in variants:
                skipped[tool] = f"refdpo.commands.score.score_data is not available ({why})"
        for tool in variants if score_data is not None else []:
            # Batch sizes: score_data's own defaults unless given, as a user would call it.
            sizes = dict(batch_tokens=args.batch_tokens, max_batch_pairs=args.max_batch_pairs)
            wanted = dict({k: v for k, v in sizes.items() if v is not None},
                          share_prompt=REFDPO_VARIANTS[tool], fused=True, progress=False)
            # The signature is still changing; pass what it takes and record what was dropped.
            params = inspect.signature(score_data).parameters
            kwargs = {k: v for k, v in wanted.items() if k in params}
            extra[f"{tool}_kwargs"] = kwargs
            if dropped := sorted(set(wanted) - set(kwargs)):
                extra[f"{tool}_kwargs_not_accepted"] = dropped
                print(f"note: score_data takes no {', '.join(dropped)}; {tool} calls it without", flush=True)
            score_data(model, subset(data, WARMUP_PAIRS), setup.pad_id, **kwargs)
            scorers[tool] = functools.partial(score_data, model, data, setup.pad_id, **kwargs)
    if "naive" in args.tools:
        naive_scores(model, subset(data, WARMUP_PAIRS))
        scorers["naive"] = lambda: naive_scores(model, data)
    if "trl" in args.tools:
        try:
            # Its own copy: DPOTrainer patches the model's forward (fused LM head) and owns it.
            trl = TrlPrecompute(copy.deepcopy(model), setup, args.trl_batch, args.max_len, workdir,
                                bf16=args.dtype == "bfloat16")
        except Exception as e:  # TRL missing or incompatible: report and go on with the others
            traceback.print_exc()
            skipped["trl"] = f"DPOTrainer could not be built ({type(e).__name__}: {e})"
        else:
            extra["trl_tokens"] = trl_token_check(trl, data)
            extra["trl_call"] = (f"DPOTrainer._precompute_ref_logps(dataset, 'train', batch_size={args.trl_batch}) "
                                 f"with DPOConfig(precompute_ref_log_probs=True, precompute_ref_batch_size="
                                 f"{args.trl_batch}, bf16=False, max_length={args.max_len})")
            t0 = time.perf_counter()
            from trl.trainer.utils import hash_module

            hash_module(trl.trainer.model)
            extra["trl_model_hash_s"] = time.perf_counter() - t0  # paid once at DPOTrainer init, not timed
            scorers["trl"], prepares["trl"] = trl.run, trl.prepare
    return scorers, prepares, extra


def report(args: argparse.Namespace, setup: Setup, times: dict[str, list[float]], infos: dict[str, list[dict]],
           results: dict, skipped: dict[str, str], extra: dict) -> dict:
    tokens = data_stats(setup.data)["tokens_per_pass"]
    tool_tokens = {t: tokens for t in times}
    if "trl" in times:
        tool_tokens["trl"] = extra["trl_tokens"]["tokens_per_pass"]  # its own count, should it differ
    summary = {}
    for tool, ts in times.items():
        median = statistics.median(ts)
        def each(key: str, tool: str = tool) -> list[float]:
            return [i[key] for i in infos[tool] if i[key] is not None]

        peaks, growth, other = each("peak_rss_mb"), each("rss_growth_mb"), each("other_load")
        summary[tool] = {"seconds": ts, "seconds_median": median, "cpu_seconds": each("cpu_seconds"),
                         "tokens_per_pass": tool_tokens[tool], "tokens_per_s": tool_tokens[tool] / median,
                         "peak_rss_mb": max(peaks) if peaks else None,
                         "peak_gpu_mb": max(each("peak_gpu_mb"), default=None),
                         "rss_growth_mb": max(growth) if growth else None,
                         "other_load": other, "other_load_max": max(other) if other else None,
                         "discarded_contended": [d for i in infos[tool] for d in i["discarded_contended"]]}

    agreement = {}
    if "naive" in results:
        for tool in ("refdpo", "refdpo-plain", "trl"):
            if tool in results:
                agreement[f"{tool}_vs_naive_max_abs_nats"] = max_abs_diff(results[tool], results["naive"])
    if "refdpo" in results and "trl" in results:
        agreement["refdpo_vs_trl_max_abs_nats"] = max_abs_diff(results["refdpo"], results["trl"])
    if "refdpo_vs_naive_max_abs_nats" in agreement:
        if args.dtype == "float32":
            agreement["refdpo_vs_naive_within_tol"] = agreement["refdpo_vs_naive_max_abs_nats"] <= AGREE_TOL
        else:
            rel = max_rel_diff(results["refdpo"], results["naive"])
            agreement.update(refdpo_vs_naive_max_rel=rel, refdpo_vs_naive_within_tol=rel <= BF16_REL_TOL)
    if args.dtype == "float32":
        agreement["tolerance_nats"] = AGREE_TOL
    else:
        agreement["tolerance_relative"] = BF16_REL_TOL

    ratios = {}
    for other, target in (("naive", 3.0), ("trl", 2.0)):
        if "refdpo" in summary and other in summary:
            r = summary["refdpo"]["tokens_per_s"] / summary[other]["tokens_per_s"]
            ratios[f"refdpo_over_{other}"] = {"speedup": r, "target": target, "met": r >= target}

    print(f"\nmodel {args.size} ({sum(p.numel() for p in setup.model.parameters()) / 1e6:.1f}M params), "
          f"{len(setup.data)} pairs, {tokens} tokens per pass, {args.threads} threads, {args.reps} reps")
    print(f"{'tool':<12} {'s (median)':>10} {'s (min-max)':>14} {'tokens/s':>10} {'peak RSS MB':>12} "
          f"{'+RSS MB':>8} {'other load':>10} {'peak GPU MB':>11}")
    for tool, s in summary.items():
        rss = f"{s['peak_rss_mb']:.0f}" if s["peak_rss_mb"] else "n/a"
        growth = f"{s['rss_growth_mb']:.0f}" if s["rss_growth_mb"] is not None else "n/a"
        load = f"{100 * s['other_load_max']:.0f}%" if s["other_load_max"] is not None else "n/a"
        span = f"{min(s['seconds']):.2f}-{max(s['seconds']):.2f}"
        gpu = f"{s['peak_gpu_mb']:.0f}" if s["peak_gpu_mb"] is not None else "n/a"
        print(f"{tool:<12} {s['seconds_median']:>10.2f} {span:>14} {s['tokens_per_s']:>10.0f} {rss:>12} "
              f"{growth:>8} {load:>10} {gpu:>11}")
    print("(other load: the largest share of the machine's cores other processes used during a timed pass)")
    for name, r in ratios.items():
        print(f"{name}: {r['speedup']:.2f}x (target >= {r['target']:.0f}x: {'met' if r['met'] else 'NOT met'})")
    for name, v in agreement.items():
        print(f"{name}: {v:.3g}" if isinstance(v, float) else f"{name}: {v}")
    if "trl_tokens" in extra:
        t = extra["trl_tokens"]
        print(f"trl token ids identical to refdpo's for {t['pairs_identical']}/{t['pairs']} pairs; "
              f"trl tokens per pass {t['tokens_per_pass']} (refdpo {tokens})")
    diag = extra.get("refdpo_diagnostics") or {}
    if "decide_layout_s" in diag:
        print(f"refdpo diagnostics (untimed): decide_layout {diag['decide_layout_s']:.2f}s per call "
              f"(fused {diag['fused']}, shared {diag['shared']}); {diag['batches']} batches compute "
              f"{diag['positions_computed']} positions for {diag['tokens_per_pass']} tokens")
    elif diag:
        print(f"refdpo diagnostics unavailable: {diag['error']}")
    for tool, why in skipped.items():
        print(f"SKIPPED {tool}: {why}")

    return {"benchmark": "reference log-prob scoring throughput (benchmarks/score_bench.py)",
            "command": " ".join([".venv/bin/python", "benchmarks/score_bench.py", *sys.argv[1:]]),
            "machine": machine_info(args.threads),
            "config": {"size": args.size, "model": SIZES[args.size], "vocab_size": setup.model.config.vocab_size,
                       "tokenizer_vocab": len(setup.tokenizer),
                       "parameters": sum(p.numel() for p in setup.model.parameters()),
                       "attn_implementation": setup.model.config._attn_implementation, "dtype": args.dtype,
                       "device": args.device,
                       "template": TEMPLATE, "max_len": args.max_len, "reps": args.reps, "seed": args.seed,
                       "order": "alternating per rep: " + ", ".join(times), "trl_batch": args.trl_batch,
                       "max_other_load": args.max_other_load, "retries": args.retries,
                       **{k: v for k, v in extra.items() if k not in ("trl_tokens", "refdpo_diagnostics")}},
            "data": data_stats(setup.data), "trl_tokens": extra.get("trl_tokens"), "tools": summary,
            "ratios": ratios, "agreement": agreement, "refdpo_diagnostics": extra.get("refdpo_diagnostics"),
            "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)  # one setting for every tool
    torch.set_flush_denormal(True)  # random-init weights produce denormals that slow some CPU kernels
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="score_bench_") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        setup = build_setup(args.size, args.pairs, args.max_len, args.seed, workdir, args.vocab, args.device,
                            args.dtype)
        print(f"setup {time.perf_counter() - t0:.1f}s: {data_stats(setup.data)}", flush=True)
        scorers, prepares, extra = build_scorers(args, setup, workdir, skipped)

        times: dict[str, list[float]] = {t: [] for t in scorers}
        infos: dict[str, list[dict]] = {t: [] for t in scorers}
        results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for rep in range(args.reps):
            for tool, fn in scorers.items():
                seconds, result, info = run_pass(tool, fn, prepares.get(tool), args)
                times[tool].append(seconds)
                infos[tool].append(info)
                results.setdefault(tool, result)
                load = f", other load {100 * info['other_load']:.0f}%" if info["other_load"] is not None else ""
                print(f"rep {rep + 1}/{args.reps} {tool:<12} {seconds:7.2f}s (cpu {info['cpu_seconds']:.1f}s{load})",
                      flush=True)
        if "refdpo" in scorers:
            extra["refdpo_diagnostics"] = refdpo_diagnostics(setup.model, setup.data, setup.pad_id,
                                                             extra["refdpo_kwargs"])
        out = report(args, setup, times, infos, results, skipped, extra)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    ok = out["agreement"].get("refdpo_vs_naive_within_tol", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
