"""LM-head log-prob memory and time: refdpo's chunked head vs the plain float32 full-logits path.

What is measured: the peak memory and the time of one forward + backward of the summed response log-probs
through the LM head, for M = T response positions (batch 1) of hidden size d (`--hidden`, default 1024) and a
vocabulary of V rows, in float32, by two implementations on the same seeded inputs:

  refdpo  `refdpo.core.lm_head.chunked_target_logprobs(hidden, weight, targets, chunk_elements=...)`: logits in
          tiles of [rows, vocabulary columns] (`refdpo.core.lm_head.tile_shape`: 2 MiB on CPU, 64 MiB on GPU, unless
          `--chunk-elements`), float32 log-sum-exp, each tile's logits recomputed in backward.
  full    `logits = hidden @ weight.T` ([M, V] float32), then
          `torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)`; `logits` goes out of scope
          before backward (only what autograd saves is kept: the leanest form of the plain path).

For both, loss = sum of the token log-probs and `loss.backward()` sends gradients to `hidden` [M, d] and
`weight` [V, d] (the LM head), both leaves with requires_grad. Inputs: hidden ~ N(0, 1), weight ~ N(0, 0.02^2)
(a real head's scale), targets uniform over the vocabulary, all from `--seed`.

How: every (method, V, T) runs in a fresh subprocess of this script (`--worker`), so that its peak RSS is its
own. The worker calls `refdpo.allocator.tune_allocator()` (what the `refdpo` entry point does in every process;
applied to both methods, and whether it took effect is recorded), `torch.set_flush_denormal(True)` and, with
`--threads`, `torch.set_num_threads`. It builds the inputs, runs one untimed warm-up forward + backward and sets the gradients to None (as training loops do with
`zero_grad(set_to_none=True)`: each pass creates them). On CPU it then hands the memory the
allocator kept from the warm-up back to the kernel (glibc `malloc_trim(0)`; otherwise pages the warm-up left
mapped would be reused unseen and the peak would look smaller than the computation needs), records the
baseline RSS, resets the high-water mark (writing "5" to /proc/self/clear_refs restarts VmHWM from the current
RSS), runs `--reps` timed forward + backward passes (gradients zeroed between them, outside the timing) and
reads VmHWM from /proc/self/status (also after each pass, untimed, into the JSON: growth after the first pass
is memory the allocator kept from one pass to the next, e.g. heap fragmentation, not memory a pass needs).
  peak extra MB  VmHWM - baseline RSS: what the computation needs beyond the inputs and the weight, including
                 the gradients of weight [V, d] and hidden [M, d] it returns.
  activations MB peak extra minus those gradients ((V + M) x d x 4 bytes), which every method must produce:
                 the memory of the head computation itself (logits, softmax, their gradients, tiles). The
                 acceptance ratio is on this; the ratio including the gradients is reported beside it.
  abs peak MB    VmHWM itself (the whole process: Python, torch, inputs, weight, gradients).
On CUDA (`--device cuda`) the same with `torch.cuda.memory_allocated()` as the baseline,
`reset_peak_memory_stats()` / `max_memory_allocated()` for the peak (abs peak = max_memory_allocated), and
`torch.cuda.synchronize()` around each timed pass. Time: `time.perf_counter()` per pass, the median reported
(the first timed pass on CPU also faults back in the memory that was trimmed; every pass is in the JSON).
"other load" is the share of the machine's cores that other processes kept busy during the timed passes
(from /proc/stat): on a shared machine a contended pass is slower for reasons neither method controls.
MB = 2^20 bytes.

Numerics: once, in its own subprocess, at V=8192, T=256 (d = `--hidden`), each method's summed log-prob and
its gradients are compared with a float64 computation (`hidden.double() @ weight.double().T`, log_softmax,
gather): |sum - sum64| <= 1e-4 * max(1, |sum64| / 100), and max|grad - grad64| / max|grad64| <= 1e-5 for the
gradient of `hidden` (and of `weight`, also checked). refdpo is checked with its default tiles and with two
tilings whose last tile is ragged: 96 rows x 1000 columns, and 256 x 3 (2,731 column tiles, whose
log-sum-exps are combined)

Acceptance targets (printed with the table): at V=128k (131072), T=1024, refdpo's head activation memory at
most 25% of full's and its time at most 1.2x full's.

Run (from the repository root):
    .venv/bin/python benchmarks/logprob_head_bench.py [--vocab 32768,131072] [--tokens 1024,2048]
        [--hidden 1024] [--reps 3] [--device cpu|cuda] [--threads N] [--chunk-elements N]
Results: a markdown table on stdout and JSON in benchmarks/results/logprob_head_bench.json (`--out`).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from benchutil import cpu_busy_s, cpu_name, reset_peak_rss, status_kb  # noqa: E402 (its own folder)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

METHODS = ("full", "refdpo")  # the order each grid point runs them in
CHECK_SHAPE = (8192, 256)  # (V, T) of the numerics check
CHECK_TILES = ((96, 1000), (256, 3))  # refdpo checked again with tiles of [rows, columns]: both ragged
SUM_TOL = 1e-4  # nats, relative to max(1, |sum| / 100)
GRAD_TOL = 1e-5  # max abs error relative to the largest reference gradient entry
TARGET_SHAPE = (131072, 1024)  # (V, T) of the acceptance targets
TARGET_MEMORY = 0.25  # refdpo peak extra / full peak extra, at most
TARGET_TIME = 1.2  # refdpo time / full time, at most
RESULT_TAG = "RESULT "  # the worker's last stdout line: this tag, then its JSON


# ------------------------------------------------------------------------------------------------ in a worker

def _malloc_trim() -> bool | None:
    """glibc: give free heap memory (every arena) back to the kernel; None where there is no malloc_trim."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def make_inputs(vocab: int, tokens: int, hidden_size: int, seed: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [T, d] ~ N(0, 1), weight [V, d] ~ N(0, 0.02^2), targets [T]; leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g).mul_(0.02)
    targets = torch.randint(vocab, (tokens,), generator=g)
    return (hidden.to(device).requires_grad_(), weight.to(device).requires_grad_(), targets.to(device))


def full_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: all [M, V] float32 logits, log_softmax, gather."""
    logits = hidden @ weight.t()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def refdpo_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    chunk_elements: int | None = None, tile: tuple[int, int] | None = None) -> torch.Tensor:
    from refdpo.core.lm_head import chunked_target_logprobs

    return chunked_target_logprobs(hidden, weight, targets, chunk_elements=chunk_elements, tile=tile)


def _method(name: str, chunk_elements: int | None):
    if name == "full":
        return full_logprobs
    return lambda h, w, t: refdpo_logprobs(h, w, t, chunk_elements)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setup_worker(spec: dict) -> tuple[bool, torch.device]:
    from refdpo.allocator import tune_allocator

    tuned = tune_allocator()  # before any tensor exists, as the refdpo entry point does
    torch.set_flush_denormal(True)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return tuned, torch.device(spec["device"])


def measure(spec: dict) -> dict:
    """One (method, V, T): peak memory and per-pass times of --reps forward + backward passes."""
    import refdpo.core.lm_head as lp

    tuned, device = _setup_worker(spec)
    vocab, tokens, chunk_elements = spec["vocab"], spec["tokens"], spec["chunk_elements"]
    fn = _method(spec["method"], chunk_elements)
    hidden, weight, targets = make_inputs(vocab, tokens, spec["hidden"], spec["seed"], device)

    def zero_grads() -> None:  # as training loops do (optimizer.zero_grad(set_to_none=True)): each pass makes them
        weight.grad = hidden.grad = None

    logp = fn(hidden, weight, targets)  # untimed warm-up
    logp.sum().backward()
    logprob_sum = float(logp.detach().double().sum())
    grad_hidden_abs_sum = float(hidden.grad.double().abs().sum())
    del logp
    zero_grads()
    _sync(device)

    info: dict = {"allocator_tuned": tuned, "threads": torch.get_num_threads()}
    reset, baseline_kb = False, None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        info["rss_after_warmup_mb"] = (status_kb("VmRSS") or 0) / 1024
        info["malloc_trim"] = _malloc_trim()
        baseline_kb = status_kb("VmRSS")
        reset = reset_peak_rss()

    seconds, peak_by_rep = [], []
    busy0, cpu0, wall0 = cpu_busy_s(), time.process_time(), time.perf_counter()
    for rep in range(spec["reps"]):
        if rep:
            zero_grads()
        _sync(device)
        t0 = time.perf_counter()
        fn(hidden, weight, targets).sum().backward()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        # The high-water mark so far (untimed): growth after the first pass is memory the allocator kept.
        if device.type == "cuda":
            peak_by_rep.append((torch.cuda.max_memory_allocated(device) - baseline) / 2**20)
        elif reset and baseline_kb is not None:
            peak_by_rep.append(((status_kb("VmHWM") or baseline_kb) - baseline_kb) / 1024)
    wall, cpu, busy1 = time.perf_counter() - wall0, time.process_time() - cpu0, cpu_busy_s()
    info["peak_extra_mb_after_each_pass"] = peak_by_rep
    # The gradients of weight [V, d] and hidden [M, d] that every method must return (float32).
    info["gradients_mb"] = (vocab + tokens) * spec["hidden"] * 4 / 2**20

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        info.update(baseline_mb=baseline / 2**20, abs_peak_mb=peak / 2**20, peak_extra_mb=(peak - baseline) / 2**20,
                    memory="cuda allocated", gpu=torch.cuda.get_device_name(device))
    else:
        peak_kb = status_kb("VmHWM") if reset else None
        ok = peak_kb is not None and baseline_kb is not None
        info.update(baseline_mb=baseline_kb / 1024 if baseline_kb is not None else None,
                    abs_peak_mb=peak_kb / 1024 if peak_kb is not None else None,
                    peak_extra_mb=(peak_kb - baseline_kb) / 1024 if ok else None, memory="process RSS")
    if info.get("peak_extra_mb") is not None:
        info["activations_mb"] = info["peak_extra_mb"] - info["gradients_mb"]
    other = None
    if busy0 is not None and busy1 is not None and wall > 0:
        other = max(0.0, (busy1 - busy0 - cpu) / (wall * (os.cpu_count() or 1)))
    tile = lp.tile_shape(tokens, vocab, device, chunk_elements) if spec["method"] == "refdpo" else None
    return {**{k: spec[k] for k in ("method", "vocab", "tokens", "hidden", "device")},
            "seconds": seconds, "seconds_median": statistics.median(seconds), "cpu_seconds": cpu,
            "other_load": other, **info,
            "tile": list(tile) if tile else None,
            "tiles": -(-tokens // tile[0]) * -(-vocab // tile[1]) if tile else None,
            "logprob_sum": logprob_sum, "grad_hidden_abs_sum": grad_hidden_abs_sum}


def check_numerics(spec: dict) -> dict:
    """Each method's summed log-prob and gradients against float64, at a small size."""
    tuned, device = _setup_worker(spec)
    vocab, tokens = spec["vocab"], spec["tokens"]
    hidden, weight, targets = make_inputs(vocab, tokens, spec["hidden"], spec["seed"], device)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.t(), dim=-1).gather(1, targets[:, None]).squeeze(1).sum()
    ref.backward()
    ref_sum = float(ref)
    sum_tol = SUM_TOL * max(1.0, abs(ref_sum) / 100)

    def rel_err(grad: torch.Tensor, ref_grad: torch.Tensor) -> float:
        return float((grad.double() - ref_grad).abs().max() / ref_grad.abs().max())

    variants = {"full": full_logprobs, "refdpo": refdpo_logprobs}
    for tile in CHECK_TILES:
        variants[f"refdpo ({tile[0]}x{tile[1]} tiles)"] = partial(refdpo_logprobs, tile=tile)
    results = {}
    for name, fn in variants.items():
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        logp = fn(h, w, targets)
        total = float(logp.detach().double().sum())
        logp.sum().backward()
        r = {"sum": total, "sum_abs_err": abs(total - ref_sum), "grad_hidden_rel_err": rel_err(h.grad, h64.grad),
             "grad_weight_rel_err": rel_err(w.grad, w64.grad)}
        r["ok"] = (r["sum_abs_err"] <= sum_tol and r["grad_hidden_rel_err"] <= GRAD_TOL
                   and r["grad_weight_rel_err"] <= GRAD_TOL)
        results[name] = r
    return {"vocab": vocab, "tokens": tokens, "hidden": spec["hidden"], "device": spec["device"],
            "allocator_tuned": tuned, "reference": "float64: log_softmax(hidden.double() @ weight.double().T)",
            "sum64": ref_sum, "sum_tol": sum_tol, "grad_rel_tol": GRAD_TOL,
            "grad_rel_err_definition": "max|grad - grad64| / max|grad64|", "methods": results,
            "ok": all(r["ok"] for r in results.values())}


def worker_main(spec: dict) -> int:
    result = check_numerics(spec) if spec["kind"] == "check" else measure(spec)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ the parent

def run_worker(spec: dict) -> dict:
    """Run one worker in a fresh process; its result, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {**spec, "error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1][len(RESULT_TAG):])


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=_ints, default=[32768, 131072], help="vocabulary sizes V (default 32768,131072)")
    p.add_argument("--tokens", type=_ints, default=[1024, 2048],
                   help="response positions T, batch 1 (default 1024,2048)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size d (default 1024)")
    p.add_argument("--reps", type=int, default=3, help="timed forward + backward passes per worker (default 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    p.add_argument("--chunk-elements", type=int, default=None,
                   help="refdpo's logits per tile (default: refdpo.core.lm_head.tile_shape's, 2^19 on CPU, 2^24 on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "logprob_head_bench.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch")
    if not args.vocab or not args.tokens:
        p.error("--vocab and --tokens need at least one value")
    args.reps = max(1, args.reps)
    return args


def machine_info(args: argparse.Namespace, threads: int | None) -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": threads,
            "REFDPO_TUNE_MALLOC": os.environ.get("REFDPO_TUNE_MALLOC")}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(measurements: list[dict]) -> dict[str, dict]:
    """Per (V, T): refdpo / full for peak extra memory and median time, and the log-prob sums' difference."""
    by_key = {(m["vocab"], m["tokens"], m["method"]): m for m in measurements if "error" not in m}
    ratios = {}
    for v, t in dict.fromkeys((m["vocab"], m["tokens"]) for m in measurements):
        full, ref = by_key.get((v, t, "full")), by_key.get((v, t, "refdpo"))
        if full and ref:
            ratios[f"V={v},T={t}"] = {
                "vocab": v, "tokens": t,
                "memory_vs_full": _ratio(ref.get("activations_mb"), full.get("activations_mb")),
                "memory_with_gradients_vs_full": _ratio(ref["peak_extra_mb"], full["peak_extra_mb"]),
                "time_vs_full": _ratio(ref["seconds_median"], full["seconds_median"]),
                "logprob_sum_abs_diff": abs(ref["logprob_sum"] - full["logprob_sum"])}
    return ratios


def print_table(measurements: list[dict], ratios: dict[str, dict], device: str) -> None:
    absolute = "abs peak GPU alloc MB" if device == "cuda" else "abs peak RSS MB"
    print(f"\n| V | T | method | time s (median) | head activations MB | peak extra incl. gradients MB | {absolute} "
          "| activations vs full | incl. gradients vs full | time vs full |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in measurements:
        if "error" in m:
            print(f"| {m['vocab']} | {m['tokens']} | {m['method']} | failed: {m['error']} | | | | | | |")
            continue
        r = ratios.get(f"V={m['vocab']},T={m['tokens']}", {}) if m["method"] == "refdpo" else {}
        cells = [_fmt(r.get(k), ".2f") if r else "" for k in ("memory_vs_full", "memory_with_gradients_vs_full",
                                                               "time_vs_full")]
        print(f"| {m['vocab']} | {m['tokens']} | {m['method']} | {m['seconds_median']:.3f} | "
              f"{_fmt(m.get('activations_mb'), '.0f')} | {_fmt(m['peak_extra_mb'], '.0f')} | "
              f"{_fmt(m['abs_peak_mb'], '.0f')} | " + " | ".join(cells) + " |")


def acceptance(ratios: dict[str, dict], hidden: int) -> dict:
    v, t = TARGET_SHAPE
    r = ratios.get(f"V={v},T={t}")
    out = {"vocab": v, "tokens": t, "hidden": hidden, "memory_target": TARGET_MEMORY, "time_target": TARGET_TIME}
    if r is None:
        print(f"acceptance targets at V={v}, T={t}: not measured (not in this grid, or a worker failed)")
        return {**out, "measured": False}
    mem, tim = r["memory_vs_full"], r["time_vs_full"]
    out.update(measured=True, memory_vs_full=mem, time_vs_full=tim,
               memory_met=None if mem is None else mem <= TARGET_MEMORY,
               time_met=None if tim is None else tim <= TARGET_TIME)

    def verdict(met: bool | None) -> str:
        return "n/a" if met is None else ("met" if met else "NOT met")

    print(f"acceptance at V={v}, T={t}, d={hidden}: refdpo head activation memory {_fmt(mem, '.2f')}x full "
          f"(target <= {TARGET_MEMORY:.2f}x: {verdict(out['memory_met'])}); "
          f"time {_fmt(tim, '.2f')}x full (target <= {TARGET_TIME:.1f}x: {verdict(out['time_met'])})")
    return out


def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the results from other users
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = {"hidden": args.hidden, "device": args.device, "threads": args.threads, "seed": args.seed}
    from refdpo.core.lm_head import tile_shape

    chunk_elements = args.chunk_elements
    print("refdpo tiles [rows, columns]: " + ", ".join(
        f"{tile_shape(t, v, torch.device(args.device), chunk_elements)} at V={v}, T={t}"
        for v in args.vocab for t in args.tokens), flush=True)

    v, t = CHECK_SHAPE
    check = run_worker({**base, "kind": "check", "vocab": v, "tokens": t})
    if "error" in check:
        print(f"numerics check FAILED to run: {check['error']}")
        check["ok"] = False
    else:
        print(f"numerics check at V={v}, T={t}, d={args.hidden} vs float64 (sum64 {check['sum64']:.4f}, "
              f"sum tol {check['sum_tol']:.2g}, grad rel tol {GRAD_TOL:.0e}): {'ok' if check['ok'] else 'FAILED'}")
        for name, r in check["methods"].items():
            print(f"  {name:<24} |sum err| {r['sum_abs_err']:.2e}  grad hidden rel {r['grad_hidden_rel_err']:.2e}  "
                  f"grad weight rel {r['grad_weight_rel_err']:.2e}  {'ok' if r['ok'] else 'FAILED'}")

    measurements = []
    for v in args.vocab:
        for t in args.tokens:
            for method in METHODS:
                spec = {**base, "kind": "measure", "method": method, "vocab": v, "tokens": t, "reps": args.reps,
                        "chunk_elements": args.chunk_elements}
                m = run_worker(spec)
                measurements.append(m)
                if "error" in m:
                    print(f"V={v} T={t} {method}: FAILED ({m['error']})", flush=True)
                    continue
                load = f", other load {100 * m['other_load']:.0f}%" if m["other_load"] is not None else ""
                print(f"V={v} T={t} {method:<6} {m['seconds_median']:.3f}s (median of {len(m['seconds'])}), "
                      f"peak extra {_fmt(m['peak_extra_mb'], '.0f')} MB{load}", flush=True)

    ratios = summarise(measurements)
    print_table(measurements, ratios, args.device)
    ok = [m for m in measurements if "error" not in m]
    threads = ok[0]["threads"] if ok else args.threads
    tuned = sorted({m["allocator_tuned"] for m in ok})
    print(f"\nd={args.hidden}, float32, {args.device}, {threads} threads, {args.reps} timed passes per worker, "
          f"tune_allocator() in effect: {', '.join(map(str, tuned)) or 'n/a'}")
    for key, r in ratios.items():
        print(f"{key}: |refdpo - full| log-prob sum {r['logprob_sum_abs_diff']:.2e}")
    targets = acceptance(ratios, args.hidden)
    print(f"numerics check: {'ok' if check['ok'] else 'FAILED'}")

    out = {"benchmark": "LM-head log-prob forward + backward, peak memory and time "
                        "(benchmarks/logprob_head_bench.py)",
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
           "machine": machine_info(args, threads),
           "config": {"vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden, "dtype": "float32",
                      "device": args.device, "reps": args.reps, "threads": args.threads, "seed": args.seed,
                      "chunk_elements": chunk_elements, "methods": list(METHODS),
                      "memory_unit": "MB = 2^20 bytes"},
           "numerics_check": check, "measurements": measurements, "ratios": ratios, "acceptance": targets}
    write_json(args.out, out)
    print(f"wrote {args.out}")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(json.loads(sys.argv[2])))
    sys.exit(main())
