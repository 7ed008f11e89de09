"""Distributed engines on this machine's CPUs, launched as a GPU user types it: 2 gloo processes under DDP,
FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 each train with the engine asked for (recorded, with the tiled LM head),
equal to one process; a SIGKILL then --resume equals the uninterrupted run; checkpoints hold the weights once;
a launch that would run another engine, or independent processes, is refused in one line."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, kill_at_checkpoint, max_diff, read_metrics, run_cli, weights

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]
# One xdist worker runs these in order (`pytest -n 2 --dist loadgroup`): the module's fixtures once, launches
# never two at a time.
pytestmark = pytest.mark.xdist_group("launches")

ENGINES = {  # the flags a user types, and what the run must record
    "ddp": (["--multi_gpu"], {"distributed_type": "MULTI_CPU"}),
    "fsdp2": (["--use_fsdp", "--fsdp_version", "2"], {"distributed_type": "FSDP", "fsdp_version": 2}),
    "zero2": (["--use_deepspeed", "--zero_stage", "2"], {"distributed_type": "DEEPSPEED", "zero_stage": 2}),
    "zero3": (["--use_deepspeed", "--zero_stage", "3"], {"distributed_type": "DEEPSPEED", "zero_stage": 3}),
}
STEPS = 12  # 96 pairs, 8 per step: 4 per process on two, 8 on one
TOL = 1e-5  # float32: per-step losses, validation losses, final weights


def common(setup: Path) -> list[str]:
    return ["train", "--model", str(setup / "model"), "--dataset", str(setup / "data"), "--max_train_pairs", "96",
            "--max_val_pairs", "20", "--epochs", "1", "--max_lr", "1e-3", "--eval_interval", "4",
            "--save_interval", "2", "--report_freq", "1", "--report_to", "none", "--no-gradient_checkpointing",
            "--seed", "0", "--no-progress"]


def launch(flags: list[str], args: list[str], port: int, log: Path, env: dict | None = None,
           processes: int = 2) -> subprocess.Popen:
    """`accelerate launch FLAGS -m refdpo ARGS`, output to `log`, in its own process group (so that a test can
    kill it whole). The environment is this one's without ACCELERATE_USE_CPU, plus `env`."""
    cmd = [*LAUNCH, *flags, "--num_processes", str(processes), "--main_process_port", str(port), "-m", "refdpo",
           *args]
    full_env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    full_env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=full_env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def one(tiny_setup, tmp_path_factory) -> Path:
    """The reference: one process, 8 pairs per step."""
    run = tmp_path_factory.mktemp("one") / "run"
    result = run_cli(common(tiny_setup) + ["--batch_size", "8", "--output_dir", str(run)])
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def assert_same_run(run: Path, ref: Path, loss_tol: float = TOL, weight_tol: float = TOL, rel: float = 0) -> None:
    (s1, e1), (s2, e2) = read_metrics(ref), read_metrics(run)
    assert [s["step"] for s in s2] == [s["step"] for s in s1] == list(range(1, STEPS + 1))
    assert [e["step"] for e in e2] == [e["step"] for e in e1] == [0, 4, 8, 12]
    for a, b in zip(s1 + e1, s2 + e2):
        for key in ("loss", "margin", "logp_chosen", "val_loss", "val_logp_rejected", "pairs", "val_pairs"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=loss_tol, rel=rel), (key, a["step"])
    assert max_diff(weights(run), weights(ref)) < weight_tol  # also: the same keys (tied weights once)


def state_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in (checkpoint / "state").rglob("*") if f.is_file())


def assert_weights_once(run: Path, engine: str, processes: int = 2) -> None:
    """The resumable state holds the optimizer (DeepSpeed: with its float32 master copy), not the weights
    again: no model file in it, and at most 1.1x the optimizer's bytes plus what files cost whatever their size
    (128 KiB: RNG states, DeepSpeed's zero_to_fp32.py, DCP metadata; 3 KiB per tensor each process stores)."""
    last = (run / "last").resolve()
    exported = weights(run)
    params = sum(t.numel() for t in exported.values())
    optimizer = (12 if engine.startswith("zero") else 8) * params  # Adam's two moments (+ master), float32
    assert not list((last / "state").rglob("*model*.safetensors"))
    assert not list((last / "state").rglob("pytorch_model_fsdp*"))
    overhead = 128 * 1024 + 3 * 1024 * 3 * len(exported) * processes
    assert state_bytes(last) <= 1.1 * optimizer + overhead, (state_bytes(last), optimizer)


@pytest.mark.slow
@pytest.mark.parametrize("engine, use_cpu", [(e, False) for e in ENGINES] + [(e, True) for e in ("ddp", "fsdp2",
                                                                                                "zero3")],
                         ids=lambda v: v if isinstance(v, str) else ("ACCELERATE_USE_CPU" if v else ""))
def test_two_processes_train_with_the_engine_asked_for_and_equal_one_process(tiny_setup, one, tmp_path, engine,
                                                                             use_cpu):
    """Each launch as typed, and the ACCELERATE_USE_CPU forms (ZeRO-2 shares ZeRO-3's launch path)."""
    flags, expected = ENGINES[engine]
    run = tmp_path / "run"
    port = 29510 + 10 * list(ENGINES).index(engine) + use_cpu
    log = tmp_path / "log"
    out = finish(launch(flags, common(tiny_setup) + ["--batch_size", "4", "--output_dir", str(run)], port, log,
                        env={"ACCELERATE_USE_CPU": "true"} if use_cpu else None), log)
    recorded = json.loads((run / "summary.json").read_text())["engine"]
    assert {k: recorded[k] for k in expected} == expected and recorded["num_processes"] == 2
    assert recorded["lm_head"] == "tiled"  # the start-up check took the tiled head under this engine
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["engine"] == recorded and "engine: " + expected["distributed_type"] in out
    assert_same_run(run, one)
    assert_weights_once(run, engine)


def test_one_process_checkpoint_holds_the_weights_once(one):
    assert_weights_once(one, "ddp", processes=1)


@pytest.mark.slow
def test_deepspeed_config_file_two_processes_equal_one_process(tiny_setup, tmp_path):
    """The seed's ZeRO-3 JSON (bf16): 2 processes against 1 process with the same file (the 1-process ZeRO-3
    smoke run), within bf16 rounding."""
    flags = ["--use_deepspeed", "--deepspeed_config_file", "configs/deepspeed_zero3.json"]
    log = tmp_path / "log"
    finish(launch(flags, common(tiny_setup) + ["--batch_size", "8", "--output_dir", str(tmp_path / "one")], 29600,
                  log, processes=1), log)
    finish(launch(flags, common(tiny_setup) + ["--batch_size", "4", "--output_dir", str(tmp_path / "two")], 29601,
                  log), log)
    for run, processes in ((tmp_path / "one", 1), (tmp_path / "two", 2)):
        recorded = json.loads((run / "summary.json").read_text())["engine"]
        assert (recorded["zero_stage"], recorded["mixed_precision"], recorded["num_processes"]) == (3, "bf16",
                                                                                                  processes)
    # bf16 keeps 8 bits: an ulp of a weight near 1 (the norms) is 2^-7; summed log-probs (~130 nats) move by a
    # few 1e-3 between batchings (measured: 3e-3).
    assert_same_run(tmp_path / "two", tmp_path / "one", loss_tol=2e-3, weight_tol=2 ** -6, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(tiny_setup, one, tmp_path, engine):
    flags, _ = ENGINES[engine]
    run = tmp_path / "run"
    args = common(tiny_setup) + ["--batch_size", "4", "--output_dir", str(run)]
    port = 29700 + 10 * list(ENGINES).index(engine)
    log = tmp_path / "log"
    kill_at_checkpoint(launch(flags, args, port, log), run, 4)  # the launcher and both training processes
    assert not (run / "summary.json").exists()
    killed_at = json.loads((run / "last" / "trainer_state.json").read_text())["global_step"]
    assert 4 <= killed_at < STEPS
    finish(launch(flags, args + ["--resume"], port + 1, log), log)
    assert_same_run(run, one)


# --------------------------------------------------------------------------------------------- refusals


def refused(args: list[str], env: dict) -> str:
    result = run_cli(args, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
     "refdpo train: error: FSDP was asked for (ACCELERATE_USE_FSDP=true) but this run would be NO, 1 process on "
     "cpu, no: refusing to train with another engine than the one asked for (start it with `accelerate launch`)"),
    ({"ACCELERATE_USE_FSDP": "true"},
     "refdpo train: error: FSDP1 is not supported: resuming it loses the optimizer state (accelerate loads it "
     "before the optimizer has any); launch with --fsdp_version 2 (configs/fsdp.yaml)"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"},
     "refdpo train: error: DeepSpeed was asked for (ACCELERATE_USE_DEEPSPEED=true) but this process was not "
     "started by a launcher: run `accelerate launch --use_deepspeed ... -m refdpo train ...`"),
    ({"WORLD_SIZE": "2"},
     "refdpo train: error: WORLD_SIZE is 2 but this process group has 1 process: the processes would train "
     "independently into one run folder; start them with `accelerate launch --num_processes 2 -m refdpo train "
     "...`"),
], ids=["engine_not_in_effect", "fsdp1", "deepspeed_without_launcher", "world_size"])
def test_a_launch_that_would_run_otherwise_is_refused_in_one_line(tiny_setup, tmp_path, env, message):
    run = tmp_path / "run"
    assert refused(common(tiny_setup) + ["--batch_size", "8", "--output_dir", str(run)], env) == message
    assert not run.exists()


def test_two_runs_writing_one_folder_are_refused(tiny_setup, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as holder:  # another run, alive, holding the folder
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("4242\n")
        holder.flush()
        line = refused(common(tiny_setup) + ["--max_train_pairs", "8", "--max_val_pairs", "8", "--batch_size", "8",
                                             "--output_dir", str(run)], {})
    assert line == (f"refdpo train: error: {run} is being written by another run (pid 4242): two runs would "
                    "overwrite each other's checkpoints; wait for it to end, or pick another --output_dir")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
