"""`refdpo train`: DPO and its variants from reference log-probs stored in the dataset, on accelerate.

One optimizer step, in full (`_train_step`): for each of `accumulate_step` micro-batches of [chosen; rejected]
sequences, one forward gives the policy's summed response log-probs; the objective compares them with the
stored reference log-probs (core/forward.py); the loss is the weighted sum of per-pair losses, scaled so that
after accelerate divides by the accumulation steps and DDP/FSDP/DeepSpeed average over processes, the gradient
is the mean over the real pairs of the global batch. Then clip, AdamW, the schedule (--lr_scheduler_type). Every
`eval_interval` steps and at each epoch's end: the validation loss, and a checkpoint (checkpoint.py).

Runs unchanged on a CPU, one GPU, DDP, DeepSpeed ZeRO-2/3 or FSDP2: whatever `accelerate launch` sets up
(engine.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from refdpo import checkpoint as ckpt
from refdpo.commands.train_config import TrainConfig, resume_changes, schedule_steps
from refdpo.commands.train_data import Inputs, load_split_data, locate_data
from refdpo.config import load_yaml, save_yaml
from refdpo.console import eval_line, interactive, quiet_third_parties, step_line
from refdpo.core.forward import evaluate_pairs, forward_pairs
from refdpo.core.metrics import MetricsLog, PairStats, peak_memory_gb
from refdpo.core.verify import choose_collate, head_matches_model
from refdpo.data import PairData, PairSampler, collate_pairs, to_device
from refdpo.data.templates import check_template
from refdpo.engine import (
    describe_engine,
    engine_name,
    keep_fsdp2_outputs_dtype,
    main_process_first,
    make_accelerator,
    start_processes,
)
from refdpo.errors import ConfigError, Interrupted
from refdpo.io import atomic_write_json, local_or_hub, require_writable
from refdpo.modeling import load_policy, pad_token_id, reset_accelerate_state
from refdpo.signals import StopOnSignal
from refdpo.tokenization import check_reload, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run is: saved with every checkpoint (trainer_state.json) and restored on --resume."""

    global_batch: int  # pairs per optimizer step, all processes: resuming needs the same
    train_pairs: int  # and the same data
    total_steps: int
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_val: dict | None = None
    best_val: dict | None = None
    wandb_id: str | None = None


@dataclass
class Run:
    """Everything the loop needs, set up once by `_setup`."""

    cfg: TrainConfig
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: PairSampler
    tokenizer: object
    train_data: PairData
    val_data: PairData | None
    pad_id: int
    fused: bool  # the tiled LM head (core/verify.py checked it on real pairs)
    collate: object  # the batch layout choose_collate picked
    run_dir: Path
    engine: dict
    progress: Progress
    metrics: MetricsLog
    lock: object  # the main process's lock on run_dir
    mismatches: dict  # {split: [...]}: reference provenance mismatches trained through (--strict false)


def _setup(cfg: TrainConfig, inputs: Inputs, data_cache: dict | None) -> Run:
    """The accelerator, run folder, data, model, optimizer and schedule; resumed when asked; fast paths checked."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    train_at, val_at = locate_data(cfg, inputs)
    reset_accelerate_state()
    cpu = start_processes()
    run_dir = ckpt.run_folder(cfg.output_dir)
    require_writable(run_dir, "--output_dir")
    accelerator = make_accelerator(cpu, gradient_accumulation_steps=cfg.accumulate_step,
                                   mixed_precision=cfg.mixed_precision, log_with=cfg.trackers or None,
                                   project_dir=str(run_dir))
    if not accelerator.is_main_process:
        logging.getLogger("refdpo").setLevel(logging.WARNING)
    engine = describe_engine(accelerator)
    if accelerator.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats slow CPU matmuls by up to 4x, and change nothing here
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(cfg.seed)
    lock = ckpt.claim_run_folder(run_dir, accelerator, if_exists=True)  # before loading: a live run's folder
    resume_from = ckpt.resume_point(run_dir, cfg.resume)
    changes = resume_changes(cfg, load_yaml(run_dir / "config.yaml"), run_dir) if resume_from is not None else {}

    tokenizer = inputs.tokenizer or load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    check_template(cfg.template, tokenizer)
    (train_data, train_mismatch), (val_data, val_mismatch) = main_process_first(accelerator, lambda: (
        load_split_data(cfg, cfg.train_split, train_at, cfg.max_train_pairs, tokenizer, data_cache),
        load_split_data(cfg, cfg.val_split, val_at, cfg.max_val_pairs, tokenizer, data_cache) if val_at
        else (None, [])))
    mismatches = {name: found for name, found in (("train", train_mismatch), ("val", val_mismatch)) if found}
    log.info("engine: %s", engine_name(engine))  # after the data: a data error stays the only line

    model = load_policy(cfg, accelerator.device, inputs.model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.max_lr,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    sampler = PairSampler(len(train_data), cfg.batch_size, cfg.accumulate_step, accelerator.num_processes,
                          accelerator.process_index, cfg.seed, lengths=train_data.token_counts())
    total_steps, warmup = schedule_steps(cfg, sampler.steps_per_epoch)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    keep_fsdp2_outputs_dtype(accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    progress = Progress(sampler.global_batch, len(train_data), total_steps)
    if resume_from is not None:
        progress = _resume(accelerator, model, optimizer, scheduler, resume_from, progress)
    lock = ckpt.claim_run_folder(run_dir, accelerator, held=lock)
    if accelerator.is_main_process:  # config.yaml is the run's as it started; a resume is recorded beside it
        if resume_from is None:
            save_yaml(dataclasses.replace(cfg, output_dir=str(run_dir.resolve())), run_dir / "config.yaml")
        else:
            ckpt.record_resume(run_dir, resume_from, changes)
    _start_trackers(cfg, accelerator, run_dir, progress, resumed=resume_from is not None)
    # On resume, what a killed run logged after its checkpoint is dropped (it is logged again); resuming a run
    # killed before its first checkpoint starts the log afresh.
    resume_step = progress.global_step if resume_from is not None else (-1 if cfg.resume else None)
    metrics = MetricsLog(run_dir, accelerator, resume_step=resume_step, header={"engine": engine})
    pad_id = pad_token_id(tokenizer)
    fused, collate = _fast_paths(cfg, accelerator, model, train_data, val_data, pad_id, engine)
    return Run(cfg, accelerator, model, optimizer, scheduler, sampler, tokenizer, train_data, val_data, pad_id,
               fused, collate, run_dir, engine, progress, metrics, lock, mismatches)


def _resume(accelerator, model, optimizer, scheduler, checkpoint: Path, fresh: Progress) -> Progress:
    saved = Progress(**ckpt.load_trainer_state(checkpoint))
    for key in ("global_batch", "train_pairs"):
        if getattr(saved, key) != getattr(fresh, key):
            raise ConfigError(f"cannot resume {checkpoint.parent.parent}: its {key} was {getattr(saved, key)}, "
                              f"now {getattr(fresh, key)} (resuming needs the same data and global batch)")
    ckpt.load_state(accelerator, model, optimizer, scheduler, checkpoint)
    log.info("resumed from %s (step %d)", checkpoint, saved.global_step)
    return dataclasses.replace(saved, total_steps=fresh.total_steps)


def _start_trackers(cfg: TrainConfig, accelerator, run_dir: Path, progress: Progress, resumed: bool) -> None:
    if not cfg.trackers:
        return
    progress.wandb_id = progress.wandb_id or f"{run_dir.name}-{cfg.seed}"
    wandb_kwargs = {"name": run_dir.name, "dir": str(run_dir), "resume": "allow", "id": progress.wandb_id}
    accelerator.init_trackers(cfg.wandb_project if "wandb" in cfg.trackers else "tensorboard",
                              config=cfg.to_dict(), init_kwargs={
                                  "wandb": wandb_kwargs,
                                  "tensorboard": {"purge_step": progress.global_step + 1} if resumed else {}})


def _fast_paths(cfg: TrainConfig, accelerator, model, train_data: PairData, val_data: PairData | None,
                pad_id: int, engine: dict):
    """(tiled head?, batch layout): each checked against the plain computation on real pairs (core/verify.py)."""
    probe = to_device(collate_pairs(train_data, [0], [1.0], pad_id), accelerator.device)
    low = accelerator.mixed_precision in ("bf16", "fp16") or cfg.dtype != "float32"
    fused, diff = head_matches_model(model, probe, low)
    if not fused:
        log.warning("chunked LM head disagrees with the model's logits (max diff %.2g): using full logits", diff)
    engine["lm_head"] = "tiled" if fused else "full logits"
    longest = int(val_data.token_counts().max()) if val_data is not None else 0
    collate = choose_collate(model, train_data, pad_id, accelerator.device, fused, cfg.packing, cfg.pack_capacity,
                             longest, low)
    return fused, collate


def _train_step(run: Run, micro_batches, valid: int, stats: PairStats) -> torch.Tensor | None:
    """One optimizer step over this process's micro-batches; returns the gradient norm before clipping (a
    tensor: reading it would wait for the GPU, so that happens only when a report is written)."""
    cfg, accelerator, model, optimizer = run.cfg, run.accelerator, run.model, run.optimizer
    # Per-pair loss sums are scaled so the step's gradient is the mean over the `valid` real pairs.
    scale = cfg.accumulate_step * accelerator.num_processes / valid
    grad_norm = None
    for indices, weights in micro_batches:
        batch = to_device(run.collate(run.train_data, indices, weights, run.pad_id), accelerator.device)
        # Inside accumulate(), gradients are synchronised, and optimizer.step()/zero_grad() act, only on the
        # step's last micro-batch (accelerate makes them no-ops on the others).
        with accelerator.accumulate(model):
            out = forward_pairs(model, batch, cfg.objective, run.fused)
            loss = (out["losses"] * batch["weights"]).sum() * scale
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        stats.add(out, batch["weights"], batch["num_tokens"])
    return grad_norm


def _evaluate(run: Run, epoch_progress: float) -> bool:
    """The validation metrics, logged and kept in the progress; True when it is the lowest loss so far."""
    cfg, progress = run.cfg, run.progress
    val = evaluate_pairs(run.model, run.val_data, cfg.objective, run.accelerator,
                         cfg.eval_batch_size or cfg.batch_size, run.pad_id, run.fused, collate=run.collate)
    run.metrics.write({"step": progress.global_step, "epoch": epoch_progress, **val})
    progress.last_val = val
    best = progress.best_val_loss is None or val["val_loss"] < progress.best_val_loss
    if best:
        progress.best_val_loss, progress.best_step, progress.best_val = val["val_loss"], progress.global_step, val
    log.info(eval_line(progress.global_step, epoch_progress, val, best))
    return best


def _report(run: Run, stats: PairStats, lr: float, grad_norm, epoch_progress: float, seconds: float) -> dict:
    """The training metrics of the steps since the last report, logged."""
    metrics = stats.reduce(run.accelerator)
    record = {"step": run.progress.global_step, "epoch": round(epoch_progress, 6), "lr": lr,
              "grad_norm": None if grad_norm is None else float(grad_norm), **metrics,
              "tokens_per_s": metrics["tokens"] / seconds, "peak_mem_gb": peak_memory_gb(run.accelerator.device)}
    run.metrics.write(record)
    stats.reset()
    return record


def train(cfg: TrainConfig, *, model: torch.nn.Module | None = None, tokenizer=None, train_dataset=None,
          eval_dataset=None, data_cache: dict | None = None) -> dict:
    """Train as configured; returns a summary (run folder, best step and validation loss, last metrics).

    The Python API may hand over what the config would otherwise name: a loaded `model` (a transformers causal
    LM, in `cfg.dtype`) and `tokenizer`; a `train_dataset` (a datasets.Dataset, a DatasetDict whose
    `train_split`/`val_split` are used, or a list of records, in any format refdpo reads) and an `eval_dataset`.
    `data_cache`: tokenised splits shared across the runs of a sweep (data.load_pairs)."""
    quiet_third_parties()  # as the CLI does
    inputs = Inputs(model, tokenizer, train_dataset, eval_dataset)
    cfg = cfg.validate().require(*inputs.given())  # fields may have been set since the config was made
    if model is not None and not cfg.model:  # the run records which model it trained
        cfg = dataclasses.replace(cfg, model=getattr(model, "name_or_path", "") or type(model).__name__)
    if cfg.dry_run:
        from refdpo.commands.dry_run import train_dry_run

        return train_dry_run(cfg, inputs)
    if "wandb" in cfg.trackers and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--report_to wandb needs the wandb package: pip install 'refdpo[wandb]'")
    run = _setup(cfg, inputs, data_cache)
    progress, sampler = run.progress, run.sampler
    if cfg.eval_at_start and progress.global_step == 0 and run.val_data is not None:
        _evaluate(run, 0.0)
    run.model.train()
    stats = PairStats(run.accelerator.device, cfg.beta)
    save_every = cfg.save_interval or cfg.eval_interval
    bar = tqdm(total=progress.total_steps, initial=progress.global_step, desc="train", dynamic_ncols=True,
               disable=not (cfg.progress and run.accelerator.is_main_process and interactive()))
    window_start, reload_checked = time.perf_counter(), False
    epochs = -(-progress.total_steps // sampler.steps_per_epoch)  # cfg.epochs, or what --max_steps needs
    with logging_redirect_tqdm(), StopOnSignal() as stop:  # log lines above the bar; Ctrl-C between steps
        for epoch in range(progress.epoch, epochs):
            for step in range(progress.step_in_epoch, sampler.steps_per_epoch):  # > 0 only when resuming
                if progress.global_step == progress.total_steps:  # --max_steps, mid-epoch
                    break
                micro_batches, valid = sampler.step(epoch, step)
                lr = run.scheduler.get_last_lr()[0]
                grad_norm = _train_step(run, micro_batches, valid, stats)
                run.scheduler.step()
                end_of_epoch = step + 1 == sampler.steps_per_epoch
                progress.global_step += 1
                progress.epoch, progress.step_in_epoch = epoch + end_of_epoch, 0 if end_of_epoch else step + 1
                global_step, epoch_progress = progress.global_step, epoch + (step + 1) / sampler.steps_per_epoch
                bar.update(1)
                last = global_step == progress.total_steps
                reported = global_step % cfg.report_freq == 0 or last
                if reported:
                    record = _report(run, stats, lr, grad_norm, epoch_progress, time.perf_counter() - window_start)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if bar.disable and cfg.progress:  # no terminal: a line per report instead of bar refreshes
                        log.info(step_line(global_step, progress.total_steps, record))
                    window_start = time.perf_counter()
                due_eval = run.val_data is not None and (global_step % cfg.eval_interval == 0 or end_of_epoch or last)
                saving = due_eval or global_step % save_every == 0 or last
                if saving:
                    is_best = _evaluate(run, epoch_progress) if due_eval else False
                    saved = ckpt.save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler,
                                                 run.tokenizer, run.run_dir, global_step, dataclasses.asdict(progress),
                                                 is_best)
                    if not reload_checked:  # a checkpoint must tokenise as training did (tokenization.py)
                        check_reload(run.tokenizer, saved, _sample_texts(run.train_data, run.tokenizer))
                        reload_checked = True
                    window_start = time.perf_counter()  # evaluation and saving are not training throughput
                # Processes agree on a stop only where they synchronise anyway (a report, a save): an agreement
                # every step would make every step wait for the GPU.
                if signum := stop.requested(run.accelerator, agree=reported or saving):
                    _interrupt(run, signum, saved_now=saving)
    bar.close()
    run.accelerator.end_training()
    return _finish(run)


def _interrupt(run: Run, signum: int, saved_now: bool) -> None:
    """Save where the run is (unless this step just did) and stop, saying how to resume."""
    import signal

    step = run.progress.global_step
    if not saved_now:
        ckpt.save_checkpoint(run.accelerator, run.model, run.optimizer, run.scheduler, run.tokenizer, run.run_dir,
                             step, dataclasses.asdict(run.progress), False)
    run.accelerator.end_training()
    if run.accelerator.is_main_process:
        run.lock.close()
    raise Interrupted(f"stopped by {signal.Signals(signum).name} at step {step} of {run.progress.total_steps}, "
                      f"checkpoint saved; resume with: refdpo train --config {run.run_dir.resolve()}/config.yaml "
                      "--resume", signum)


def _sample_texts(data: PairData, tokenizer, n: int = 16) -> list[str]:
    """Training sequences as text (decoded as tokenised: special tokens, whitespace and all)."""
    return [tokenizer.decode(s.input_ids.tolist()) for s in data.chosen[:n] + data.rejected[:n]]


def _finish(run: Run) -> dict:
    progress, run_dir = run.progress, run.run_dir
    best, last = ckpt.resolve(run_dir, "best"), ckpt.resolve(run_dir, "last")
    if best is None and progress.best_step == 0:  # training only made validation worse: the best policy is
        best = local_or_hub(run.cfg.model)    # the initial one (`refdpo evaluate --model RUN` loads it)
    summary = {"run_dir": str(run_dir.resolve()), "engine": run.engine, "steps": progress.global_step,
               "best_step": progress.best_step, "best_val_loss": progress.best_val_loss,
               "last_val": progress.last_val, "best_val": progress.best_val,
               "best": str(best) if best else None, "last": str(last) if last else None,
               "data": {"train": run.train_data.stats, "val": run.val_data.stats if run.val_data else None}}
    if run.mismatches:  # trained through with --strict false: the record says so
        summary["reference_mismatches"] = run.mismatches
    if run.accelerator.is_main_process:
        atomic_write_json(run_dir / "summary.json", summary)
        if run.cfg.push_to_hub:  # after the summary: a failed upload loses nothing of the run
            summary["hub"] = _push(run.cfg, summary)
            atomic_write_json(run_dir / "summary.json", summary)
        run.lock.close()
    return summary


def _push(cfg: TrainConfig, summary: dict) -> dict:
    """Upload the best checkpoint (else the last) with a model card; where it went."""
    from refdpo.hub import model_card, push_folder

    folder = Path(summary["best"] or summary["last"])
    repo = cfg.hub_model_id or Path(summary["run_dir"]).name
    card = model_card(cfg.to_dict(), summary["data"], summary, base_model=cfg.model)
    url = push_folder(folder, repo, card, private=cfg.hub_private_repo)
    log.info("pushed %s to the Hub: %s", folder, url)
    return {"repo": repo, "checkpoint": str(folder), "url": url}
