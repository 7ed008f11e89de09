"""`refdpo train`: DPO and its variants from reference log-probs stored in the dataset, on accelerate.

One optimizer step, in full (see `_train_step`): for each of `accumulate_step` micro-batches of [chosen;
rejected] sequences, the policy's summed response log-probs come from one forward; the objective compares them
with the stored reference log-probs; the loss is the weighted sum of per-pair losses scaled so that, after
accelerate divides by the accumulation steps and DDP/DeepSpeed average over processes, the gradient is the
mean over the real pairs of the global batch. Then clip, AdamW, linear schedule.

Runs unchanged on a CPU, one GPU, DDP, DeepSpeed ZeRO-3 or FSDP: whatever `accelerate launch` sets up.
"""

from __future__ import annotations

import importlib.util
import logging
import resource
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refdpo import checkpoint as ckpt
from refdpo import provenance as prov
from refdpo.config import TrainConfig, save_yaml
from refdpo.data import (
    PairData,
    PairSampler,
    RawSplit,
    build_pairs,
    collate_pairs,
    load_split,
    parse_ref_columns,
    to_device,
)
from refdpo.data.templates import check_template
from refdpo.engine import (
    describe_engine,
    engine_name,
    keep_fsdp2_outputs_dtype,
    make_accelerator,
    start_processes,
)
from refdpo.errors import ConfigError
from refdpo.evaluate import evaluate_pairs, forward_pairs
from refdpo.layout import choose_collate
from refdpo.logprobs import head_matches_model
from refdpo.metrics import MetricsLog, PairStats
from refdpo.modeling import load_policy, pad_token_id, reset_accelerate_state
from refdpo.resume import load_state
from refdpo.tokenization import check_reload, load_tokenizer

log = logging.getLogger(__name__)


def load_pairs(cfg: TrainConfig, split: str, tokenizer, limit: int = 0, cache: dict | None = None) -> PairData:
    """Load, validate and tokenise one split as the config says. With `cache` (a sweep's), a split tokenised
    the same way for an earlier run is reused."""
    ref_columns = parse_ref_columns(cfg.ref_columns) if cfg.objective.uses_reference else None
    key = (cfg.dataset, cfg.dataset_config, cfg.dataset_revision, split, limit, cfg.tokenizer or cfg.model,
           cfg.template, cfg.max_len, cfg.on_truncated, ref_columns)
    if cache is not None and key in cache:
        return cache[key]
    raw = load_split(cfg.dataset, split, cfg.dataset_config, cfg.dataset_revision)
    every_record = raw.records
    if limit:
        raw.records = raw.records[:limit]
        raw.line_numbers = raw.line_numbers[:limit] if raw.line_numbers else None
    data = build_pairs(raw, tokenizer, cfg.template, cfg.max_len, ref_columns, cfg.on_truncated)
    log.info("%s: %d pairs (%s)", data.source, len(data), ", ".join(f"{k} {v}" for k, v in data.stats.items()))
    if ref_columns is not None:
        _check_provenance(cfg, raw, data, tokenizer, every_record)
    if cache is not None:
        cache[key] = data
    return data


def _check_provenance(cfg: TrainConfig, raw: RawSplit, data: PairData, tokenizer, records: list[dict]) -> None:
    """Compare how the reference columns were scored (their provenance sidecar) with this run: warn, or with
    --strict refuse, on what would make the stored log-probs mean something else than intended."""
    columns = data.stats["ref_columns"]
    entry = prov.read(raw.provenance).get(prov.column_key(columns))
    if entry is None:
        log.info("%s: no provenance for %s (not written by refdpo score): how they were scored is unchecked",
                 raw.source, ",".join(columns))
        return
    longest = max(e.full_length for seqs in (data.chosen, data.rejected) for e in seqs)
    warnings, notes = prov.training_report(entry, model=cfg.model, revision=cfg.revision, tokenizer=tokenizer,
                                           template=cfg.template, max_len=cfg.max_len, rows=len(records),
                                           longest=longest, conversations=prov.records_fingerprint(records, prov.CONVERSATIONS))
    for note in notes:
        log.info("%s: %s", raw.source, note)
    if warnings and cfg.strict:
        raise ConfigError(f"{raw.source}: the reference log-probs do not match this run (--strict): "
                          + "; ".join(warnings))
    for warning in warnings:
        log.warning("%s: %s (--strict refuses this)", raw.source, warning)


def _run_dir(cfg: TrainConfig) -> Path:
    """--output_dir, or runs/<date-time> chosen by the main process and shared with the others."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    name = [cfg.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}"]
    if PartialState().num_processes > 1:
        broadcast_object_list(name)
    return Path(name[0])


def _resume_point(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint to resume from; refuse to write into a folder holding another run."""
    found = ckpt.latest_resumable(run_dir) if run_dir.exists() else None
    if cfg.resume:
        if found is None:
            log.warning("--resume: %s has no complete checkpoint yet; starting from step 0", run_dir)
        return found
    if found is not None or (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"{run_dir} already holds a run: continue it with --resume, or pick another "
                          "--output_dir")
    return None


def _lock_run_dir(run_dir: Path, accelerator, if_exists: bool = False, held=None):
    """The main process's lock on the run folder (checkpoint.lock_run_dir; `held`: the one it took already);
    every process calls this, and all refuse together when another run holds it. `if_exists`: lock only a
    folder that exists already (None otherwise), so that a run refused later for its data creates nothing."""
    from accelerate.utils import broadcast_object_list

    lock, problem = held, [None]
    if accelerator.is_main_process and held is None and not (if_exists and not run_dir.exists()):
        lock, holder = ckpt.lock_run_dir(run_dir)
        if lock is None:
            problem[0] = (f"{run_dir} is being written by another run (pid {holder}): two runs would overwrite "
                          "each other's checkpoints; wait for it to end, or pick another --output_dir")
    if accelerator.num_processes > 1:
        broadcast_object_list(problem)
    if problem[0]:
        raise ConfigError(problem[0])
    return lock


def _sample_texts(data: PairData, tokenizer, n: int = 16) -> list[str]:
    """Training sequences as text (decoded as tokenised: special tokens, whitespace and all)."""
    seqs = data.chosen[:n] + data.rejected[:n]
    return [tokenizer.decode(s.input_ids.tolist()) for s in seqs]


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def _train_step(model, optimizer, accelerator, micro_batches, valid: int, data: PairData, pad_id: int,
                cfg: TrainConfig, fused: bool, stats: PairStats, collate=collate_pairs) -> torch.Tensor | None:
    """One optimizer step over this process's micro-batches; returns the gradient norm before clipping (a
    tensor: reading it would wait for the GPU, so that happens only when a report is written)."""
    objective = cfg.objective
    # Per-pair loss sums are scaled so the step's gradient is the mean over the `valid` real pairs.
    scale = cfg.accumulate_step * accelerator.num_processes / valid
    grad_norm = None
    for indices, weights in micro_batches:
        batch = to_device(collate(data, indices, weights, pad_id), accelerator.device)
        with accelerator.accumulate(model):
            out = forward_pairs(model, batch, objective, fused)
            loss = (out["losses"] * batch["weights"]).sum() * scale
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stats.add(out, batch["weights"], batch["num_tokens"])
    return grad_norm


def train(cfg: TrainConfig, data_cache: dict | None = None) -> dict:
    """Train as configured; returns a summary (run folder, best step and validation loss, last metrics).
    `data_cache`: tokenised splits shared across the runs of a sweep (see load_pairs)."""
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    if "wandb" in cfg.trackers and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--report_to wandb needs the wandb package: pip install 'refdpo[wandb]'")
    reset_accelerate_state()
    cpu = start_processes()
    run_dir = _run_dir(cfg)
    accelerator = make_accelerator(cpu, gradient_accumulation_steps=cfg.accumulate_step,
                                   mixed_precision=cfg.mixed_precision, log_with=cfg.trackers or None,
                                   project_dir=str(run_dir))
    if not accelerator.is_main_process:
        logging.getLogger("refdpo").setLevel(logging.WARNING)
    device = accelerator.device
    engine = describe_engine(accelerator)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats slow CPU matmuls by up to 4x, and change nothing here
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(cfg.seed)
    lock = _lock_run_dir(run_dir, accelerator, if_exists=True)  # before anything is loaded: a live run's folder
    resume_from = _resume_point(cfg, run_dir)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    check_template(cfg.template, tokenizer)
    pad_id = pad_token_id(tokenizer)
    train_data = load_pairs(cfg, cfg.train_split, tokenizer, cfg.max_train_pairs, data_cache)
    val_data = load_pairs(cfg, cfg.val_split, tokenizer, cfg.max_val_pairs, data_cache) if cfg.val_split else None

    log.info("engine: %s", engine_name(engine))  # after the data: a data error stays the only line
    model = load_policy(cfg, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.max_lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    sampler = PairSampler(len(train_data), cfg.batch_size, cfg.accumulate_step, accelerator.num_processes,
                          accelerator.process_index, cfg.seed, lengths=train_data.token_counts())
    total_steps = sampler.steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total_steps), total_steps)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    keep_fsdp2_outputs_dtype(accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)

    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_val_loss": None, "best_step": None,
             "global_batch": sampler.global_batch, "train_pairs": len(train_data), "total_steps": total_steps}
    if resume_from is not None:
        saved = ckpt.load_trainer_state(resume_from)
        for key in ("global_batch", "train_pairs"):
            if saved[key] != state[key]:
                raise ConfigError(f"cannot resume {run_dir}: its {key} was {saved[key]}, now {state[key]} "
                                  "(resuming needs the same data and global batch)")
        load_state(accelerator, model, optimizer, scheduler, resume_from)
        state.update(saved)
        log.info("resumed from %s (step %d)", resume_from, state["global_step"])

    lock = _lock_run_dir(run_dir, accelerator, held=lock)
    if accelerator.is_main_process:
        save_yaml(cfg, run_dir / "config.yaml")
    if cfg.trackers:
        wandb_kwargs = {"name": run_dir.name, "dir": str(run_dir), "resume": "allow",
                        "id": state.setdefault("wandb_id", f"{run_dir.name}-{cfg.seed}")}
        accelerator.init_trackers(cfg.wandb_project if "wandb" in cfg.trackers else "tensorboard",
                                  config=cfg.to_dict(), init_kwargs={
                                      "wandb": wandb_kwargs,
                                      "tensorboard": {"purge_step": state["global_step"] + 1} if resume_from else {}})
    # On resume, what a killed run logged after its checkpoint is dropped (it is logged again); resuming a run
    # killed before its first checkpoint starts the log afresh.
    resume_step = state["global_step"] if resume_from is not None else (-1 if cfg.resume else None)
    metrics_log = MetricsLog(run_dir, accelerator, resume_step=resume_step, header={"engine": engine})

    # The chunked LM head must reproduce the model's own log-probs; check once on real data, else fall back.
    probe = to_device(collate_pairs(train_data, [0], [1.0], pad_id), device)
    low = accelerator.mixed_precision in ("bf16", "fp16") or cfg.dtype != "float32"
    fused, diff = head_matches_model(model, probe, low)
    if not fused:
        log.warning("chunked LM head disagrees with the model's logits (max diff %.2g): using full logits", diff)
    engine["lm_head"] = "tiled" if fused else "full logits"
    longest = int(val_data.token_counts().max()) if val_data is not None else 0
    collate = choose_collate(model, train_data, pad_id, device, fused, cfg.packing, cfg.pack_capacity, longest, low)

    def run_eval(epoch_progress: float) -> bool:
        """Evaluate on the validation split, log it; True when this is the lowest validation loss so far."""
        val = evaluate_pairs(model, val_data, cfg.objective, accelerator, cfg.eval_batch_size or cfg.batch_size,
                             pad_id, fused, collate=collate)
        metrics_log.write({"step": state["global_step"], "epoch": epoch_progress, **val})
        state["last_val"] = val
        if state["best_val_loss"] is None or val["val_loss"] < state["best_val_loss"]:
            state.update(best_val_loss=val["val_loss"], best_step=state["global_step"])
            return True
        return False

    if cfg.eval_at_start and state["global_step"] == 0 and val_data is not None:
        run_eval(0.0)

    model.train()
    stats = PairStats(device, cfg.beta)
    save_every = cfg.save_interval or cfg.eval_interval
    bar = tqdm(total=total_steps, initial=state["global_step"], desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and accelerator.is_main_process))
    window_start, reload_checked = time.perf_counter(), False
    for epoch in range(state["epoch"], cfg.epochs):
        for step in range(state["step_in_epoch"], sampler.steps_per_epoch):  # > 0 only when resuming
            micro_batches, valid = sampler.step(epoch, step)
            lr = scheduler.get_last_lr()[0]
            grad_norm = _train_step(model, optimizer, accelerator, micro_batches, valid, train_data, pad_id,
                                    cfg, fused, stats, collate)
            scheduler.step()
            end_of_epoch = step + 1 == sampler.steps_per_epoch
            state.update(global_step=state["global_step"] + 1, epoch=epoch + end_of_epoch,
                         step_in_epoch=0 if end_of_epoch else step + 1)
            global_step, progress = state["global_step"], epoch + (step + 1) / sampler.steps_per_epoch
            bar.update(1)

            if global_step % cfg.report_freq == 0 or global_step == total_steps:
                metrics = stats.reduce(accelerator)
                elapsed = time.perf_counter() - window_start
                record = {"step": global_step, "epoch": round(progress, 6), "lr": lr,
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          **metrics, "tokens_per_s": metrics["tokens"] / elapsed,
                          "peak_mem_gb": _peak_memory_gb(device)}
                metrics_log.write(record)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
                stats.reset()
                window_start = time.perf_counter()

            due_eval = val_data is not None and (global_step % cfg.eval_interval == 0 or end_of_epoch)
            if due_eval or global_step % save_every == 0 or global_step == total_steps:
                is_best = run_eval(progress) if due_eval else False
                saved = ckpt.save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, run_dir,
                                             global_step, state, is_best)
                if not reload_checked:  # a checkpoint must tokenise as training did (tokenization.py)
                    check_reload(tokenizer, saved, _sample_texts(train_data, tokenizer))
                    reload_checked = True
                window_start = time.perf_counter()  # evaluation and saving are not training throughput
    bar.close()
    accelerator.end_training()

    summary = {"run_dir": str(run_dir), "engine": engine, "steps": state["global_step"], "best_step": state["best_step"],
               "best_val_loss": state["best_val_loss"], "last_val": state.get("last_val"),
               "best": str(ckpt.resolve(run_dir, "best")) if ckpt.resolve(run_dir, "best") else None,
               "last": str(ckpt.resolve(run_dir, "last")) if ckpt.resolve(run_dir, "last") else None,
               "data": {"train": train_data.stats, "val": val_data.stats if val_data else None}}
    if accelerator.is_main_process:
        ckpt.atomic_write_json(run_dir / "summary.json", summary)
        lock.close()
    return summary
