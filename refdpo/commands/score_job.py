"""A resumable job over a fixed plan of batches, shared by any number of processes.

The plan is cut into blocks of `save_every` batches. OUT.parts/ holds `manifest.json` (the job's settings and
a hash of its plan) and one `block-NNNNNN.npz` per finished block (row ids and results), each written
atomically. Process r of n takes blocks r, r+n, ...; a rerun of the same job skips finished blocks, whatever
the number of processes, so its result is the one an uninterrupted run gives. The main process waits for every
block on the shared folder (polling, no collective timeout), then merges them and checks that every expected
row appears exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np

from refdpo.console import progress_bar
from refdpo.data import PairData
from refdpo.errors import ConfigError, RefdpoError
from refdpo.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def resumable_manifest(out: Path, job: dict, overwrite: bool) -> dict | None:
    """The manifest of an unfinished job with these settings, to continue; None to start afresh. Refuses to
    replace an existing OUT or another job's blocks without --overwrite. Cheap: runs before the model loads."""
    parts = parts_dir(out)
    manifest_path = parts / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["job"] == job:
            done = len(list(parts.glob("block-*.npz")))
            log.info("continuing the unfinished job in %s (%d of %d blocks done)", parts, done, manifest["blocks"])
            return manifest
        if not overwrite:
            changed = sorted(k for k in set(job) | set(manifest["job"]) if job.get(k) != manifest["job"].get(k))
            raise ConfigError(f"{parts} holds an unfinished job with other settings ({', '.join(changed)} "
                              "differ): run the same command to finish it, or pass --overwrite")
    elif out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    return None


def new_job(out: Path, job: dict, plan: list, save_every: int, **extra) -> dict:
    """Start a job afresh: an empty OUT.parts/ and its manifest (`extra`: decisions a rerun must reuse)."""
    parts = parts_dir(out)
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    manifest = {"job": job, **extra, "batches": len(plan),
                "blocks": math.ceil(len(plan) / save_every),
                "plan_sha256": hashlib.sha256(json.dumps(plan).encode()).hexdigest()}
    atomic_write_json(parts / "manifest.json", manifest)
    return manifest


def save_block(path: Path, rows: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, rows=rows, chosen=chosen, rejected=rejected)
    atomic_write_bytes(path, buffer.getvalue())


def heartbeat(parts: Path, rank: int) -> None:
    """Mark process `rank` alive: it has just scored a batch (wait_for_blocks reads it)."""
    (parts / f"alive-{rank}").touch()


def _last_beat(parts: Path, rank: int) -> float:
    for path in (parts / f"alive-{rank}", parts / "manifest.json"):  # no beat yet: since the job was planned
        if path.exists():
            return path.stat().st_mtime
    return time.time()


def merge_blocks(parts: Path, blocks: int, data: PairData, n_rows: int, processes: int) -> tuple[np.ndarray, ...]:
    """All blocks -> per-row values; every kept row scored exactly once, or an error saying what went wrong."""
    chosen, rejected = np.full(n_rows, np.nan), np.full(n_rows, np.nan)
    count = np.zeros(n_rows, dtype=np.int64)
    missing_blocks = [b for b in range(blocks) if not (parts / f"block-{b:06d}.npz").exists()]
    if missing_blocks:
        raise RefdpoError(f"{parts}: blocks {missing_blocks[:5]} were never written; run the command again")
    for b in range(blocks):
        with np.load(parts / f"block-{b:06d}.npz") as block:
            rows = block["rows"]
            np.add.at(count, rows, 1)
            chosen[rows], rejected[rows] = block["chosen"], block["rejected"]
    expected = np.zeros(n_rows, dtype=bool)
    expected[data.rows] = True
    duplicates, gaps, extra = int(np.sum(count > 1)), int(np.sum(expected & (count == 0))), int(
        np.sum(~expected & (count > 0)))
    coverage = {"processes": processes, "rows_scored": int(np.sum(count > 0)), "duplicates": duplicates,
                "missing": gaps, "unexpected": extra}
    if duplicates or gaps or extra:
        raise RefdpoError(f"{parts}: coverage check failed: {coverage}; the blocks are kept for inspection")
    return chosen, rejected, coverage


def wait_for_blocks(parts: Path, blocks: int, processes: int, poll_s: float = 2.0, stall_s: float = 1800.0) -> None:
    """The main process waits for the other processes' blocks on the shared folder (no collective timeout, which
    a long scoring job would outlast). Block b is process b % processes's; when every process that still owes
    blocks has scored nothing for `stall_s` seconds, it died or hangs: stop, keeping what is done."""
    logged = False
    while missing := [b for b in range(blocks) if not (parts / f"block-{b:06d}.npz").exists()]:
        if not logged:
            log.info("waiting for the other processes (%d of %d blocks done)", blocks - len(missing), blocks)
            logged = True
        owners = sorted({b % processes for b in missing})
        if all(time.time() - _last_beat(parts, rank) > stall_s for rank in owners):
            raise RefdpoError(f"{parts}: process(es) {', '.join(map(str, owners))} scored nothing for "
                              f"{stall_s / 60:.0f} min and blocks {missing[:5]} are missing; the blocks done are "
                              "kept: run the same command again to continue")
        time.sleep(poll_s)


def score_blocks(scorer, plan: list, blocks: list[int], save_every: int, parts: Path, data: PairData,
                 show: bool, rank: int = 0) -> tuple[int, float]:
    """Score this process's unfinished blocks, each saved as soon as it is done; (tokens, seconds)."""
    todo = [plan[k] for b in blocks for k in range(b * save_every, min((b + 1) * save_every, len(plan)))]
    bar = progress_bar(total=sum(len(idx) for idx, _ in todo), desc="score", unit="pair", dynamic_ncols=True,
               disable=not show)
    tokens, started = 0, time.perf_counter()
    for b in blocks:
        batches = plan[b * save_every:(b + 1) * save_every]
        results = []
        for idx, shared in batches:
            results.append(scorer(idx, shared))
            heartbeat(parts, rank)
            tokens += sum(data.num_tokens(i) for i in idx)
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - started):.0f}", refresh=False)
        indices = np.concatenate([np.asarray(idx) for idx, _ in batches])
        save_block(parts / f"block-{b:06d}.npz", data.rows[indices],
                    np.concatenate([c for c, _ in results]), np.concatenate([r for _, r in results]))
    bar.close()
    return tokens, time.perf_counter() - started
