"""`refdpo score`: reference log-probs for preference pairs, from any model, with its own tokenizer and template.

For every pair, the reference's summed log-prob of the chosen and of the rejected response (the record contract, data/schema.py) is
written as two columns next to all original fields. Only these scalars cross over to the policy, so the
reference may have any vocabulary. `--mode prior` scores log p(y) with the prompt replaced by a prefix
(templates.py). Provenance is written beside the output (provenance.py).

How it is fast:
  - inference mode, and only response positions go through the LM head (core/lm_head.py);
  - pairs sorted by length into batches of at most `batch_tokens` padded tokens (little padding), longest
    first (an out-of-memory error shows in the first seconds, not after hours);
  - a pair's prompt is computed once: [prompt | chosen | rejected] in one row with a mask that keeps the two
    responses apart (collate_packed with a custom mask), checked at start-up against the plain layout on real pairs;
  - each process of `accelerate launch` takes every n-th block of batches; `--device_map auto` spreads one
    large reference over all GPUs; `--backend vllm` scores with vLLM's prompt log-probs.

How nothing is lost: batches are grouped into blocks of `save_every`, each written atomically to OUT.parts/
as soon as it is done; a manifest fixes the job (model, data, settings, batch plan). Running the same command
again after a crash or kill skips the finished blocks; the plan does not depend on the number of processes,
so the output is byte-identical to an uninterrupted run. The main process then merges the blocks, checks that
every row was scored exactly once, writes OUT atomically with its provenance, and removes OUT.parts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from refdpo import provenance as prov
from refdpo.commands import score_job
from refdpo.config import DataSpec, InferenceSpec, ModelSpec, check_all, option
from refdpo.console import progress_bar, quiet_third_parties
from refdpo.core.logprobs import sequence_logprobs
from refdpo.core.verify import agrees, head_matches_model, low_precision
from refdpo.data import (
    PairData,
    RawSplit,
    collate_packed,
    collate_pairs,
    load_split,
    parse_ref_columns,
    to_device,
)
from refdpo.data.collate import shares_prompt
from refdpo.data.pairs import conversations_fingerprint, reference_pairs
from refdpo.data.schema import DEFAULT_REF_COLUMNS
from refdpo.data.templates import PRIOR_PREFIXES, check_template
from refdpo.data.writing import check_writable, output_format, push_to_hub, write_records
from refdpo.engine import ENGINES, requested_engine, start_processes
from refdpo.errors import ConfigError, RefdpoError
from refdpo.io import require_writable
from refdpo.modeling import (
    custom_mask_problem,
    inference_dtype,
    input_device,
    load_frozen,
    load_vllm,
    mask_dtype,
    pad_token_id,
)
from refdpo.tokenization import load_tokenizer

log = logging.getLogger(__name__)
MODES = ("conditional", "prior")
PAD_MULTIPLE = 8  # collate_pairs/collate_packed pad widths to a multiple of 8


@dataclass
class ScoreConfig(InferenceSpec, DataSpec, ModelSpec):
    REQUIRED: ClassVar = {"out": "--out is required (a .jsonl/.parquet/.csv file or a folder)"}

    split: str = option("train", "split name, or a path to its file")
    out: str = option("", "output: a .jsonl or .parquet file, or a folder (save_to_disk)")
    columns: str = option(",".join(DEFAULT_REF_COLUMNS), "names of the two columns to write CHOSEN,REJECTED "
                                                         "(several references can live in one dataset)")
    mode: str = option("conditional", "conditional: log p(y|x); prior: log p(y), the prompt replaced by --prior_prefix")
    prior_prefix: str = option("empty_user", f"what precedes y in prior mode: {' | '.join(PRIOR_PREFIXES)}")
    batch_tokens: int = option(0, "padded tokens per forward pass, setting the batch size per length bucket (0: "
                                  "16384 on a GPU, 2048 on a CPU, where bigger batches only add attention cost)")
    max_batch_pairs: int = option(64, "pairs per forward pass at most")
    share_prompt: bool = option(True, "compute each pair's prompt once (checked against the plain layout first)")
    save_every: int = option(16, "batches per block written to OUT.parts (what a kill can lose)")
    overwrite: bool = option(False, "replace an existing OUT or an unfinished job with other settings")
    push_to_hub: bool = option(False, "also upload the result to the Hub dataset repo --hub_dataset_id")
    hub_dataset_id: str | None = option(None, "the Hub dataset repo for --push_to_hub")
    progress: bool = option(True, "show a progress bar")
    dry_run: bool = option(False, "load and tokenise the split, print what would be scored (formats, lengths, "
                                  "drops, batches) and stop: no model weights are loaded")

    def validate(self) -> ScoreConfig:
        check_all(self.spec_checks() + [
            (not self.push_to_hub or bool(self.hub_dataset_id), "--push_to_hub needs --hub_dataset_id ORG/NAME"),
            (self.mode in MODES, f"--mode must be one of {', '.join(MODES)}"),
            (self.prior_prefix in PRIOR_PREFIXES, f"--prior_prefix must be one of {', '.join(PRIOR_PREFIXES)}"),
            (self.batch_tokens >= 0, "--batch_tokens must be >= 0 (0: by device)"),
            (min(self.max_batch_pairs, self.save_every) >= 1, "--max_batch_pairs and --save_every must be >= 1"),
        ] + self.inference_checks())
        _column_names(self.columns)
        return self


def _column_names(spec: str) -> tuple[str, str]:
    try:
        return parse_ref_columns(spec)
    except RefdpoError:
        raise ConfigError(f"--columns expects two column names CHOSEN,REJECTED, got {spec!r}") from None


# --- batches ------------------------------------------------------------------------------------------

def default_batch_tokens(device: torch.device) -> int:
    """Measured on a 2-core CPU (benchmarks/score_bench.py): 1-2k padded tokens per batch are fastest there,
    16k is 1.6x slower; a GPU wants large batches."""
    return 16384 if device.type == "cuda" else 2048


def plan_batches(data: PairData, batch_tokens: int, max_batch_pairs: int, share: bool) -> list[tuple[list, bool]]:
    """[(pair indices, shared layout?)]: pairs sorted longest first, grouped while the padded batch stays within
    `batch_tokens` (a pair longer than that gets a batch of its own). Depends on the data only."""
    n = len(data)
    shared = np.array([share and shares_prompt(data, i) for i in range(n)], dtype=bool)
    widths = np.empty(n, dtype=np.int64)
    for i in range(n):
        c, r = len(data.chosen[i].input_ids), len(data.rejected[i].input_ids)
        widths[i] = c + r - data.chosen[i].response_start if shared[i] else max(c, r)
    widths = -(-widths // PAD_MULTIPLE) * PAD_MULTIPLE  # as collate pads them
    order = np.lexsort((np.arange(n), -widths, ~shared))  # shared first, then longest first, then row
    plan, current, width = [], [], 0
    for i in order.tolist():
        rows_per_pair = 1 if shared[i] else 2
        fits = (len(current) < max_batch_pairs and (not current or shared[current[0]] == shared[i])
                and (len(current) + 1) * rows_per_pair * max(width, widths[i]) <= batch_tokens)
        if current and not fits:
            plan.append((current, bool(shared[current[0]])))
            current, width = [], 0
        current.append(i)
        width = max(width, int(widths[i]))
    if current:
        plan.append((current, bool(shared[current[0]])))
    return plan


@torch.inference_mode()
def score_batch(model: torch.nn.Module, data: PairData, indices: list, shared: bool, pad_id: int,
                fused: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs (chosen, rejected) float64 for the pairs `indices`. `shared`: one row per pair,
    [prompt | chosen | rejected], the prompt computed once (collate_packed with a custom mask, a row each)."""
    device, n = input_device(model), len(indices)
    indices, ones = np.asarray(indices), np.ones(n)
    batch = collate_packed(data, indices, ones, pad_id, capacity=1, mask_dtype=mask_dtype(model)) if shared \
        else collate_pairs(data, indices, ones, pad_id)
    sums = sequence_logprobs(model, to_device(batch, device), fused)[0].cpu().numpy()
    return sums[:n], sums[n:]


def _sharing_possible(model: torch.nn.Module, data: PairData) -> str | None:
    """Why the shared-prompt layout cannot be used with this model, or None."""
    problem = custom_mask_problem(model, int(data.token_counts().max()))
    if problem:
        return problem
    if not any(shares_prompt(data, i) for i in range(min(len(data), 64))):
        return "the pairs' tokenised prompts differ"
    return None


@torch.inference_mode()
def decide_layout(model: torch.nn.Module, data: PairData, pad_id: int, share_prompt: bool = True,
                  probe_pairs: int = 1) -> tuple[bool, bool]:
    """(fused head?, shared prompt?): each optimisation is used only if it reproduces the plain computation on
    real pairs of this data (core/verify.py); otherwise the reason is logged."""
    device = input_device(model)
    k = min(len(data), probe_pairs)
    first = to_device(collate_pairs(data, np.arange(k), np.ones(k), pad_id), device)
    fused, diff = head_matches_model(model, first)
    if not fused:
        log.warning("chunked LM head disagrees with the model's logits (max diff %.2g): using full logits", diff)
    if not share_prompt:
        return fused, False
    reason = _sharing_possible(model, data)
    if reason is None:
        probe = [i for i in range(min(len(data), 256)) if shares_prompt(data, i)][:probe_pairs]
        plain = np.concatenate(score_batch(model, data, probe, False, pad_id, fused))
        packed = np.concatenate(score_batch(model, data, probe, True, pad_id, fused))
        ok, diff = agrees(plain, packed, low_precision(model))
        if not ok:
            reason = f"it differs from the plain layout by {diff:.2g} nats on this model"
    if reason is not None:
        log.warning("scoring chosen and rejected without sharing the prompt: %s", reason)
    return fused, reason is None


def score_data(model: torch.nn.Module, data: PairData, pad_id: int, *, batch_tokens: int = 0,
               max_batch_pairs: int = 64, share_prompt: bool = True, progress: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """In memory: (chosen, rejected) summed log-probs, float64 [N], in the order of `data`."""
    fused, share = decide_layout(model, data, pad_id, share_prompt)
    batch_tokens = batch_tokens or default_batch_tokens(input_device(model))
    chosen, rejected = np.empty(len(data)), np.empty(len(data))
    for indices, shared in progress_bar(plan_batches(data, batch_tokens, max_batch_pairs, share), desc="score",
                                disable=not progress):
        chosen[indices], rejected[indices] = score_batch(model, data, indices, shared, pad_id, fused)
    return chosen, rejected


# --- the resumable job ---------------------------------------------------------------------------------

def _check_columns(raw: RawSplit, columns: tuple[str, str]) -> tuple[str, str]:
    """The two output columns must be distinct new or numeric columns: never a conversation or another field."""
    chosen, rejected = columns
    if chosen == rejected:
        raise ConfigError(f"--columns needs two different names, got {chosen!r} twice")
    for name in columns:
        if name in ("chosen", "rejected", "prompt", "messages"):
            raise ConfigError(f"--columns {name!r} would overwrite the conversations; pick other names")
        if name in raw.columns:
            values = [r[name] for r in raw.records if name in r]
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in values):
                raise ConfigError(f"--columns {name!r} would overwrite the non-numeric field {name!r}")
            log.warning("replacing the existing column %s", name)
    return columns


def _vllm_scorer(cfg: ScoreConfig, data: PairData):
    llm = load_vllm(cfg, enable_prefix_caching=True)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)

    def score(indices: list, shared: bool) -> tuple[np.ndarray, np.ndarray]:
        seqs = [data.chosen[i] for i in indices] + [data.rejected[i] for i in indices]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=s.input_ids.tolist()) for s in seqs], params,
                               use_tqdm=False)
        sums = np.array([sum(out.prompt_logprobs[p][int(s.input_ids[p])].logprob
                             for p in range(s.response_start, len(s.input_ids)))
                         for s, out in zip(seqs, outputs)], dtype=np.float64)
        return sums[:len(indices)], sums[len(indices):]

    return score


def score(cfg: ScoreConfig) -> dict:
    """Run `refdpo score` as configured; returns a summary (rows, coverage, speed, output paths)."""
    from accelerate import PartialState

    cfg = cfg.validate().require()  # fields may have been set since the config was made
    quiet_third_parties()  # as the CLI does
    require_writable(Path(cfg.out).parent, "--out")  # before the model loads
    start_processes()
    state = PartialState()
    engine = requested_engine()["engine"]
    if engine is not None and state.is_main_process:
        log.info("scoring is data-parallel under %s too: each of the %d processes holds the whole model and "
                 "scores its own rows (--device_map auto spreads a model too large for one GPU)",
                 ENGINES[engine], state.num_processes)
    if (cfg.device_map or cfg.backend == "vllm") and state.num_processes > 1:
        raise ConfigError("--device_map auto and --backend vllm spread one model over the GPUs of one process "
                          "(vllm: --tensor_parallel_size): launch a single process")
    out, columns = Path(cfg.out), _column_names(cfg.columns)
    if state.device.type == "cpu":
        torch.set_flush_denormal(True)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    check_template(cfg.template, tokenizer)
    raw = load_split(cfg.dataset, cfg.split, cfg.dataset_config, cfg.dataset_revision)
    data, rendered = reference_pairs(raw, tokenizer, cfg.template, cfg.max_len, cfg.on_truncated, cfg.mode,
                                     cfg.prior_prefix)
    batch_tokens = cfg.batch_tokens or default_batch_tokens(state.device)
    if cfg.dry_run:
        return _dry_run(cfg, data, batch_tokens)
    dtype = inference_dtype(cfg.dtype, state.device)
    dtype_name = str(dtype).removeprefix("torch.")
    weights = prov.weights_fingerprint(cfg.model, cfg.revision)
    job = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "push_to_hub", "hub_dataset_id",
                                                              "progress", "save_every", "dry_run", "cache_dir")}
    job.update(batch_tokens=batch_tokens, dtype=dtype_name, weights_sha256=weights,
               data_sha256=prov.records_fingerprint(raw.records), rows=len(raw), save_every=cfg.save_every)

    parts = score_job.parts_dir(out)
    manifest = None
    if state.is_main_process:  # settle what OUT means before spending minutes on loading a large model
        columns = _check_columns(raw, columns)
        check_writable(raw.records, out)
        manifest = score_job.resumable_manifest(out, job, cfg.overwrite)
    model = None if cfg.backend == "vllm" else load_frozen(cfg, state.device, dtype, cfg.device_map)
    pad_id = pad_token_id(tokenizer)
    if state.is_main_process and manifest is None:
        fused, share = (False, False) if model is None else decide_layout(model, data, pad_id, cfg.share_prompt)
        plan = plan_batches(data, batch_tokens, cfg.max_batch_pairs, share)
        manifest = score_job.new_job(out, job, plan, cfg.save_every, fused=fused, share=share)
    state.wait_for_everyone()
    if manifest is None:
        manifest = json.loads((parts / "manifest.json").read_text())
    plan = plan_batches(data, batch_tokens, cfg.max_batch_pairs, manifest["share"])
    if hashlib.sha256(json.dumps(plan).encode()).hexdigest() != manifest["plan_sha256"]:
        raise RefdpoError(f"{parts}: this process planned other batches than the manifest; is the data the same "
                          "on every node?")
    scorer = (_vllm_scorer(cfg, data) if model is None else
              lambda indices, shared: score_batch(model, data, indices, shared, pad_id, manifest["fused"]))

    mine = [b for b in range(manifest["blocks"]) if b % state.num_processes == state.process_index
            and not (parts / f"block-{b:06d}.npz").exists()]
    tokens, seconds = score_job.score_blocks(scorer, plan, mine, cfg.save_every, parts, data,
                                             cfg.progress and state.is_main_process, state.process_index)
    summary = {"out": str(out), "rows_in": len(raw), "pairs": len(data), **data.stats,
               "blocks_scored_here": len(mine), "seconds": seconds, "tokens": tokens,
               "tokens_per_s": tokens / seconds if seconds > 0 else None}
    if not state.is_main_process:
        return summary

    score_job.wait_for_blocks(parts, manifest["blocks"], state.num_processes)
    chosen, rejected, coverage = score_job.merge_blocks(parts, manifest["blocks"], data, len(raw),
                                                     state.num_processes)
    records = [{**raw.records[row], columns[0]: float(chosen[row]), columns[1]: float(rejected[row])}
               for row in np.sort(data.rows).tolist()]
    write_records(records, out)
    entry = prov.reference_entry(cfg, model, tokenizer, rendered, raw, data, weights, dtype_name, manifest, coverage)
    sidecar = _write_provenance(out, raw, records, columns, entry)
    shutil.rmtree(parts, ignore_errors=True)
    if cfg.push_to_hub:
        push_to_hub(records, cfg.hub_dataset_id, cfg.split, cfg.dataset_config, sidecar)
    return {**summary, "coverage": coverage, "provenance": str(sidecar), "format": output_format(out)}


def _dry_run(cfg: ScoreConfig, data: PairData, batch_tokens: int) -> dict:
    """What `refdpo score` would do (commands/dry_run.py): the split, and the batches planned for it."""
    from refdpo.commands.dry_run import processes, split_report

    plan = plan_batches(data, batch_tokens, cfg.max_batch_pairs, cfg.share_prompt)
    blocks = -(-len(plan) // cfg.save_every)
    return {"dry_run": True, "command": "score", "config": asdict(cfg), "splits": {cfg.split: split_report(data)},
            "plan": {"processes": processes(), "batches": len(plan), "batch_tokens": batch_tokens,
                     "blocks": blocks, "mode": cfg.mode, "out": cfg.out}}


def _write_provenance(out: Path, raw: RawSplit, records: list[dict], columns: tuple[str, str],
                      entry: dict) -> Path:
    """The new entry, plus the input's other references (still valid for the rows kept)."""
    conversations = conversations_fingerprint(records)
    entries = {}
    for key, old in prov.read(raw.provenance).items():
        if key != prov.column_key(columns):
            entries[key] = {**old, "rows_out": len(records), "conversations_sha256": conversations}
            if len(records) != len(raw):
                entries[key]["rows_dropped_later"] = old.get("rows_dropped_later", 0) + len(raw) - len(records)
    entries[prov.column_key(columns)] = {**entry, "conversations_sha256": conversations}
    sidecar = prov.sidecar_path(out)
    prov.write(sidecar, entries)
    return sidecar


