"""The GPU acceptance check: every GPU path of refdpo run once on one GPU, one PASS/FAIL/SKIP line per check.

Run by `benchmarks/gpu_check.sh` (which installs the carried wheels first); from the repository root:
    python benchmarks/gpu_check.py --out DIR [--only sdpa,zero3,...] [--size 0.5b]

Checks (a random-init Llama built by `refdpo tiny`: `0.5b` is hidden 1024, 24 layers, 16 heads / 8 KV heads,
MLP 5504, 32k vocabulary, 0.5B parameters; its synthetic pairs scored by the model itself with `refdpo score`):

  sdpa         `python -m refdpo train` in bf16 mixed precision (autocast) with sdpa attention: the baseline
  flash        the same with flash_attention_2 (packed varlen rows), when flash-attn is installed
  liger        the same with --liger (Liger's RMSNorm, SwiGLU and RoPE kernels)
  compile      the same with --compile (each decoder layer through torch.compile)
  zero3        `accelerate launch --config_file configs/zero3.yaml --num_processes 1` (DeepSpeed ZeRO-3)
  fsdp2        `accelerate launch --config_file configs/fsdp.yaml --num_processes 1` (FSDP2)
  train_bench  benchmarks/train_bench.py at 0.5B in bf16: refdpo vs TRL vs the floor, tokens/s, memory, MFU
  score_bench  benchmarks/score_bench.py on the GPU in bf16: refdpo vs a naive loop vs TRL's precompute
  head         benchmarks/logprob_head_bench.py at V = 128k: the tiled head vs full float32 logits

A training check passes when the run exits 0, records the engine it was asked for (summary.json), took the
tiled LM head, logged every step with finite losses, starts at the reference's loss (policy = reference at
step 0: ln 2 within START_TOL) and, for the variants, follows the sdpa run step by step within bf16 tolerance
(|loss - sdpa's| <= LOSS_ATOL + LOSS_RTOL * sdpa's, every step; ZeRO-3: see VAL_ATOL). The six training runs go at once (the GPU has
room for all); their tokens/s are therefore not throughput figures — the benchmarks, run one at a time after
them, are. A benchmark passes when it exits 0 and its own numerics check holds.

Everything goes to --out: gpu_check.json (every figure), gpu_check.log (the PASS/FAIL lines), and the three
benchmarks' JSON. Per-run logs stay in --workdir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"0.5b": dict(hidden=1024, layers=24, heads=16, kv_heads=8, intermediate=5504, vocab_size=32000),
         "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab_size=0)}
TRAIN_CHECKS = ("sdpa", "flash", "liger", "compile", "zero3", "fsdp2")
BENCH_CHECKS = ("head", "train_bench", "score_bench")  # run in this order, fastest first
CHECKS = TRAIN_CHECKS + BENCH_CHECKS
GPU_ONLY = {"flash", "liger", "compile", "train_bench"}
START_TOL = 0.05  # |step-1 loss - ln 2|: references scored in bf16 weights, training under bf16 autocast
LOSS_ATOL, LOSS_RTOL = 0.02, 0.05  # bf16 variants against the sdpa run, every step
# DeepSpeed's bf16 mode is other arithmetic: forward and backward on bf16 weights (fp32 master copy in the
# optimizer). On the H200 its first steps moved less than the sdpa run's (step 3 loss 0.49 against 0.14), then it
# caught up (final val loss 0.112 against 0.120). Likely cause, seen on a CPU: an update below bf16's resolution
# (lr 1e-5 on weights of ~0.02) waits in the master copy (that run's step 3 equals a bf16-weights run's, 0.69275
# against 0.69271, where float32 weights give 0.69124). So ZeRO-3 is checked to train as well: its final
# validation loss within VAL_ATOL of sdpa's, or below.
FOLLOWS_SDPA = ("flash", "liger", "compile", "fsdp2")
VAL_ATOL = 0.05
TRAIN_PAIRS, VAL_PAIRS, BATCH = 128, 32, 8


def _env(**extra: str) -> dict:
    env = dict(os.environ, **extra, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    """Run `cmd` from the repository root, output to `log`; (exit code, seconds), 124 on timeout."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def build_setup(args, work: Path) -> Path:
    setup = work / "setup"
    size = SIZES[args.size]
    cmd = [sys.executable, "-m", "refdpo", "tiny", "--out", str(setup), "--train_pairs", str(TRAIN_PAIRS),
           "--val_pairs", str(VAL_PAIRS), "--max_len", "1024"]
    for key, value in size.items():
        cmd += [f"--{key}", str(value)]
    rc, seconds = _run(cmd, work / "setup.log", args.timeout)
    if rc != 0:
        raise SystemExit(f"FAIL setup: refdpo tiny exited {rc} after {seconds:.0f}s\n{_tail(work / 'setup.log')}")
    print(f"setup: {setup} in {seconds:.0f}s ({json.loads((setup / 'tiny.json').read_text())['parameters']:,} "
          "parameters)", flush=True)
    return setup


def train_command(name: str, setup: Path, run_dir: Path, cuda: bool, port: int) -> list[str] | None:
    """The command a user would type for this check; None when it cannot run here."""
    common = ["-m", "refdpo", "train", "--model", str(setup / "model"), "--dataset", str(setup / "data"),
              "--batch_size", str(BATCH), "--epochs", "1", "--max_lr", "1e-5", "--warmup_ratio", "0.1",
              "--report_freq", "1", "--eval_interval", "1000", "--report_to", "none", "--no-progress",
              "--output_dir", str(run_dir)]
    precision = ["--mixed_precision", "bf16" if cuda else "no"]
    plain = [sys.executable, *common, *precision]
    if name == "sdpa":
        return plain + ["--attn_implementation", "sdpa"]
    if name == "flash":
        return plain + ["--attn_implementation", "flash_attention_2"]
    if name == "liger":
        return plain + ["--attn_implementation", "sdpa", "--liger"]
    if name == "compile":
        return plain + ["--attn_implementation", "sdpa", "--compile"]
    config = {"zero3": "configs/zero3.yaml", "fsdp2": "configs/fsdp.yaml"}[name]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "1",
              "--main_process_port", str(port)]
    if not cuda:
        launch += ["--cpu", "--mixed_precision", "no"]
    return launch + [*common, "--attn_implementation", "sdpa"]


EXPECTED_ENGINE = {"zero3": ("DEEPSPEED", "zero_stage", 3), "fsdp2": ("FSDP", "fsdp_version", 2)}


def read_run(run_dir: Path) -> dict:
    metrics = []
    if (run_dir / "metrics.jsonl").exists():
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    train = [r for r in metrics if "loss" in r]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return {"losses": [r["loss"] for r in train],
            "tokens_per_s": sorted(r["tokens_per_s"] for r in train[1:])[len(train[1:]) // 2] if len(train) > 1
            else None,
            "peak_mem_gb": max((r["peak_mem_gb"] for r in train), default=None),
            "val_loss": [r["val_loss"] for r in metrics if "val_loss" in r],
            "engine": summary.get("engine"), "steps": summary.get("steps")}


def judge_train(name: str, rc: int, seconds: float, run: dict, base: dict | None) -> tuple[str, str, dict]:
    """(PASS/FAIL, reason, figures) for one training check."""
    losses, engine = run["losses"], run["engine"] or {}
    figures = {"seconds": round(seconds, 1), "exit": rc, **run}
    if rc != 0:
        return "FAIL", f"exited {rc}", figures
    problems = []
    expected_steps = -(-TRAIN_PAIRS // BATCH)
    if len(losses) != expected_steps or not all(math.isfinite(x) for x in losses):
        problems.append(f"{len(losses)} finite losses logged, expected {expected_steps}")
    if name in EXPECTED_ENGINE:
        kind, key, value = EXPECTED_ENGINE[name]
        if engine.get("distributed_type") != kind or engine.get(key) != value:
            problems.append(f"engine {engine} is not {kind} {key}={value}")
    if engine.get("lm_head") != "tiled":
        problems.append(f"LM head: {engine.get('lm_head')!r}, not the tiled head")
    if run.get("packed") is False:
        problems.append("trained on padded rows: the start-up check refused packing")
    if name == "compile" and not run.get("inductor_kernels"):
        problems.append("inductor wrote no kernels: the layers were not compiled")
    if name == "compile" and base is not None and losses == base["losses"]:
        # Inductor's kernels round differently from eager ones: equal to the last bit means eager layers (as
        # when a checkpoint around compiled layers made dynamo skip them).
        problems.append("training losses equal sdpa's to the last bit: the layers ran eagerly")
    if losses and abs(losses[0] - math.log(2)) > START_TOL:
        problems.append(f"step-1 loss {losses[0]:.4f} is not ln 2 within {START_TOL}")
    if base is not None and name != "sdpa" and base["losses"] and losses:
        diffs = [abs(a - b) for a, b in zip(losses, base["losses"])]
        worst = max(range(len(diffs)), key=lambda i: diffs[i] - LOSS_RTOL * abs(base["losses"][i]))
        figures["max_loss_diff_vs_sdpa"] = max(diffs)
        if name in FOLLOWS_SDPA and diffs[worst] > LOSS_ATOL + LOSS_RTOL * abs(base["losses"][worst]):
            problems.append(f"step {worst + 1} loss {losses[worst]:.4f} vs sdpa {base['losses'][worst]:.4f}")
        if name not in FOLLOWS_SDPA and run["val_loss"] and base["val_loss"] \
                and run["val_loss"][-1] > base["val_loss"][-1] + VAL_ATOL:
            problems.append(f"final val loss {run['val_loss'][-1]:.4f} vs sdpa {base['val_loss'][-1]:.4f}")
    detail = (f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no losses")
    if "max_loss_diff_vs_sdpa" in figures:
        detail += f", max |loss - sdpa| {figures['max_loss_diff_vs_sdpa']:.4f}"
    if run["val_loss"]:
        detail += f", val loss {run['val_loss'][-1]:.4f}"
    detail += f", {engine.get('distributed_type', '?')} head {engine.get('lm_head', '?')}, {seconds:.0f}s"
    if name == "compile":
        detail += f", {run.get('inductor_kernels')} inductor kernels, {run.get('graph_breaks')} graph breaks"
    return ("FAIL", "; ".join(problems) + f" ({detail})", figures) if problems else ("PASS", detail, figures)


def run_training_checks(names: list[str], setup: Path, work: Path, args, cuda: bool, report) -> None:
    """All training checks at once (one process each), then judged against the sdpa run."""
    procs = {}
    # --compile's evidence that inductor compiled: the kernels it writes to its cache (a fresh folder).
    inductor_cache = work / "inductor-cache"
    for k, name in enumerate(names):
        run_dir = work / "runs" / name
        cmd = train_command(name, setup, run_dir, cuda, 29500 + 17 * k)
        log = open(work / f"{name}.log", "w")  # noqa: SIM115 (closed below, after the process ends)
        env = _env(TORCHINDUCTOR_CACHE_DIR=str(inductor_cache), TORCH_LOGS="graph_breaks") \
            if name == "compile" else _env()
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                       log, time.perf_counter(), cmd)
    results = {}
    for name, (proc, log, t0, cmd) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = 124
        log.close()
        results[name] = (rc, time.perf_counter() - t0, read_run(work / "runs" / name), cmd)
        text = (work / f"{name}.log").read_text(errors="replace")
        results[name][2]["packed"] = "running without packing" not in text
        if name == "compile":
            results[name][2].update(inductor_kernels=len(list(inductor_cache.rglob("*.py"))),
                                    graph_breaks=text.count("Graph break"))
    base = results.get("sdpa", (None, None, None, None))[2]
    if base is None and (work / "runs" / "sdpa" / "summary.json").exists():
        base = read_run(work / "runs" / "sdpa")  # from an earlier invocation (--only without sdpa)
    for name, (rc, seconds, run, cmd) in results.items():
        verdict, detail, figures = judge_train(name, rc, seconds, run, base)
        figures["command"] = " ".join(cmd)
        if verdict == "FAIL":
            figures["log_tail"] = _errors(work / f"{name}.log") + "\n...\n" + _tail(work / f"{name}.log", 25)
            print(figures["log_tail"], flush=True)
        report(name, verdict, detail, figures)


def _errors(path: Path, most: int = 12) -> str:
    """The log's first lines that name an error or a warning (the cause, before a launcher's traceback)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join([line for line in lines if "Error" in line or "WARNING" in line][:most])


def bench_command(name: str, work: Path, out: Path, cuda: bool) -> list[str]:
    py = [sys.executable]
    device = ["--device", "cuda" if cuda else "cpu"]
    if name == "train_bench":
        return py + ["benchmarks/train_bench.py", "--size", "0.5b", "--reps", "1", "--steps", "6", "--warmup", "2",
                     "--allocators", "default", "--idle-wait", "5", "--workdir", str(work / "train_bench"),
                     "--out", str(out / "train_bench.json"), *device]
    if name == "score_bench":
        return py + ["benchmarks/score_bench.py", "--size", "40m", "--vocab", "128256", "--pairs", "256",
                     "--reps", "2", "--idle-wait", "5", "--out", str(out / "score_bench.json"), *device]
    return py + ["benchmarks/logprob_head_bench.py", "--vocab", "131072", "--tokens", "1024,4096", "--reps", "3",
                 "--out", str(out / "logprob_head_bench.json"), *device]


def judge_bench(name: str, rc: int, seconds: float, out: Path) -> tuple[str, str, dict]:
    path = out / {"train_bench": "train_bench.json", "score_bench": "score_bench.json",
                  "head": "logprob_head_bench.json"}[name]
    figures = {"seconds": round(seconds, 1), "exit": rc, "json": path.name}
    if rc != 0 or not path.exists():
        return "FAIL", f"exited {rc} after {seconds:.0f}s", figures
    data = json.loads(path.read_text())
    if name == "score_bench":
        ratios = {k: round(v["speedup"], 2) for k, v in data["ratios"].items()}
        ok = data["agreement"].get("refdpo_vs_naive_within_tol", False)
        tools = {t: {"tokens_per_s": round(v["tokens_per_s"]), "peak_gpu_mb": v.get("peak_gpu_mb")}
                 for t, v in data["tools"].items()}
        figures.update(ratios=ratios, agreement=data["agreement"], tools=tools)
        return ("PASS" if ok else "FAIL"), f"{ratios}, {tools}, agreement {data['agreement']}", figures
    if name == "train_bench":
        tools = next(iter(data["summary"].values()))["default"]["tools"]
        figures["tools"] = {t: {k: v.get(k) for k in ("tokens_per_s", "mfu", "peak_gpu_mb", "step_seconds")}
                            for t, v in tools.items()}
        figures.update(numerics=data.get("numerics"), failed=data.get("failed"))
        numerics = next(iter(data.get("numerics", {}).values()), {})
        agree = all(v.get("agree", True) for v in numerics.values() if isinstance(v, dict))
        ratio = (tools["refdpo"]["tokens_per_s"] / tools["trl"]["tokens_per_s"]
                 if "refdpo" in tools and "trl" in tools else None)
        figures["refdpo_over_trl"] = ratio
        line = ", ".join(f"{t} {v['tokens_per_s']:.0f} tok/s MFU {100 * (v['mfu'] or 0):.0f}% "
                         f"{(v['peak_gpu_mb'] or 0) / 1024:.1f} GiB" for t, v in tools.items())
        ok = data.get("complete") and not data.get("failed") and agree and "refdpo" in tools
        verdict = "PASS" if ok else "FAIL"
        return verdict, f"{line}; refdpo/TRL {ratio or float('nan'):.2f}x; numerics agree {agree}", figures
    acceptance = data.get("acceptance", {})
    figures.update(ratios=data.get("ratios"), acceptance=acceptance, numerics_check=data.get("numerics_check"))
    detail = "; ".join(f"{k}: memory {v['memory_vs_full']:.3f}x, time {v['time_vs_full']:.2f}x of full"
                       for k, v in data.get("ratios", {}).items())
    return "PASS", detail, figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json/.log and benchmark JSON")
    p.add_argument("--workdir", type=Path, default=None, help="models, runs and logs (default OUT/work)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--size", choices=sorted(SIZES), default="0.5b", help="model of the training checks")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per check (default 300)")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    only = [c for c in args.only.split(",") if c]
    if unknown := set(only) - set(CHECKS):
        p.error(f"unknown checks: {', '.join(sorted(unknown))}")
    out = args.out.resolve()
    work = (args.workdir or out / "work").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    summary_path = out / "gpu_check.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"checks": {}}
    summary["machine"] = _machine(cuda)
    lines = []

    def report(name: str, verdict: str, detail: str, figures: dict) -> None:
        line = f"{verdict} {name}: {detail}"
        print(line, flush=True)
        lines.append(line)
        summary["checks"][name] = {"verdict": verdict, "detail": detail, **figures}
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")  # after every check: a timeout keeps it
        with open(out / "gpu_check.log", "a") as f:
            f.write(line + "\n")

    runnable = []
    for name in only:
        if name in GPU_ONLY and not cuda:
            report(name, "SKIP", "needs a CUDA GPU", {})
        elif name == "flash" and not _has_flash_attn():
            report(name, "SKIP", "flash-attn is not installed (no wheel for this torch/CUDA could be carried)", {})
        elif name == "liger" and not _importable("liger_kernel"):
            report(name, "SKIP", "liger-kernel is not installed", {})
        elif name in ("zero3",) and not _importable("deepspeed"):
            report(name, "FAIL", "deepspeed is not installed", {})
        else:
            runnable.append(name)
    train = [n for n in runnable if n in TRAIN_CHECKS]
    if train:
        setup = build_setup(args, work)
        run_training_checks(train, setup, work, args, cuda, report)
    for name in [n for n in runnable if n in BENCH_CHECKS]:
        if cuda:
            torch.cuda.empty_cache()
        rc, seconds = _run(bench_command(name, work, out, cuda), work / f"{name}.log", args.timeout)
        verdict, detail, figures = judge_bench(name, rc, seconds, out)
        if verdict == "FAIL":
            figures["log_tail"] = _errors(work / f"{name}.log") + "\n...\n" + _tail(work / f"{name}.log", 25)
            print(figures["log_tail"], flush=True)
        report(name, verdict, detail, figures)
    failed = [line for line in lines if line.startswith("FAIL")]
    print(f"{len(lines) - len(failed)} of {len(lines)} checks passed or skipped; figures in {summary_path}")
    return 1 if failed else 0


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _has_flash_attn() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def _machine(cuda: bool) -> dict:
    import platform

    import torch
    import transformers

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    for module in ("accelerate", "deepspeed", "liger_kernel", "trl", "datasets", "flash_attn", "peft"):
        try:
            info[module] = __import__(module).__version__
        except Exception as e:  # missing, or broken on import: say which
            info[module] = f"unavailable ({type(e).__name__})"
    if cuda:
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


if __name__ == "__main__":
    sys.exit(main())
