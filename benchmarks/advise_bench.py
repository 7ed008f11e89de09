"""`refdpo advise` end to end on a 60k-pair split with three candidate references: wall time from the command
line to the written report (advise.md/.csv/.json and three plots), in a fresh subprocess.

The split is load_bench's UltraFeedback-shaped synthetic split (TRL's conversational format, replies of
100–500 Mistral tokens; generated once into benchmarks/.cache/load_bench and reused), with stored columns added:
the policy's own log-probs ℓ0 = −0.9·(reply bytes) / 4 + N(0, 20²) per reply, and three references, each an
exponential tilt ℓr = ℓ0 + g − c(pair) of it (c keeps both ≤ ℓ0; it cancels in every margin):
  aligned   g = 6·z (z: a hidden per-pair "quality" drawn N(1, 1), + on the chosen reply, − on the rejected)
  noisy     g = 25·ε, ε ~ N(0, 1) per reply
  lengthy   g = 0.02·(reply bytes) (prefers whatever is longer)
Mistral-7B's tokenizer (tests/real_vocab.py, from pinned PyPI files) counts reply tokens on advise's sample.

Run:  .venv/bin/python benchmarks/advise_bench.py [--pairs 60000] [--repeat 3] [--bootstrap 500]
Results: a table on stdout, JSON in benchmarks/results/advise_bench.json. No peer tool makes this
recommendation (TRL, open-instruct, OpenRLHF: none), so there is no ratio: the figure is against the issue's
budget, under 10 s on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import load_bench  # noqa: E402  (its split and tokenizer folder)
from benchutil import cpu_name, wait_for_quiet  # noqa: E402

from refdpo.io import atomic_write_json, write_jsonl  # noqa: E402

REFERENCES = "aligned=aligned_c,aligned_r noisy=noisy_c,noisy_r lengthy=lengthy_c,lengthy_r"


def with_columns(source: Path, target: Path, seed: int) -> None:
    """The split plus the policy's and three references' columns (module docstring)."""
    rng = np.random.default_rng(seed)
    records = [json.loads(line) for line in source.read_text().splitlines()]
    for r in records:
        b = np.array([len(r["chosen"][-1]["content"].encode()), len(r["rejected"][-1]["content"].encode())], float)
        own = -0.9 * b / 4 + rng.normal(0, 20, 2)
        z = rng.normal(1, 1)
        tilts = {"aligned": np.array([3 * z, -3 * z]), "noisy": 25 * rng.normal(size=2), "lengthy": 0.02 * b}
        r["chosen_logprob"], r["rejected_logprob"] = float(min(own[0], 0)), float(min(own[1], 0))
        for name, g in tilts.items():
            shifted = np.minimum(own, 0) + g - max(g.max(), 0)
            r[f"{name}_c"], r[f"{name}_r"] = float(shifted[0]), float(shifted[1])
        del r["ref_chosen_logps"], r["ref_rejected_logps"]
    write_jsonl(target, records)


def run(split: Path, tokenizer: Path, out: Path, bootstrap: int) -> dict:
    """One `refdpo advise` in a fresh process: wall seconds, and the verdicts it wrote."""
    command = [sys.executable, "-m", "refdpo", "advise", "--dataset", str(split.parent), "--split", str(split),
               "--references", *REFERENCES.split(), "--tokenizer", str(tokenizer), "--bootstrap", str(bootstrap),
               "--out", str(out), "--progress", "false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"refdpo advise failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads((out / "advise.json").read_text())
    return {"seconds": seconds, "verdicts": {n: (r["verdict"], r["beta"]) for n, r in report["references"].items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=60_000)
    p.add_argument("--repeat", type=int, default=3, help="runs (the median is reported)")
    p.add_argument("--bootstrap", type=int, default=500, help="advise's --bootstrap (its default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-other-load", type=float, default=0.10,
                   help="before each run, wait until other processes use at most this share of the cores")
    p.add_argument("--idle-wait", type=float, default=120.0, help="seconds to wait for quiet at most")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "advise_bench.json")
    args = p.parse_args(argv)
    workdir = ROOT / "benchmarks" / ".cache" / "advise_bench"
    lb = argparse.Namespace(pairs=args.pairs, tokenizer="mistral", format="trl", seed=args.seed,
                            workdir=ROOT / "benchmarks" / ".cache" / "load_bench")
    tokenizer = load_bench.tokenizer_folder("mistral", lb.workdir)
    source, _ = load_bench.make_split(lb, tokenizer)
    split = workdir / f"advise-{args.pairs}-seed{args.seed}.jsonl"
    if not split.is_file():
        with_columns(source, split, args.seed)
    runs, loads = [], []
    for _ in range(args.repeat):
        _, load = wait_for_quiet(args.max_other_load, args.idle_wait)  # the machine may be shared
        loads.append(load)
        runs.append(run(split, tokenizer, workdir / "report", args.bootstrap))
    seconds = [r["seconds"] for r in runs]
    result = {"pairs": args.pairs, "references": 3, "bootstrap": args.bootstrap, "seconds": seconds,
              "median_s": statistics.median(seconds), "budget_s": 10.0, "other_load_before": loads, "verdicts": runs[-1]["verdicts"],
              "split_bytes": split.stat().st_size, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d")}
    atomic_write_json(args.out, result)
    print(f"| pairs | references | bootstrap draws | wall s (median of {args.repeat}) | runs | budget |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.pairs} | 3 | {args.bootstrap} | {result['median_s']:.2f} | "
          f"{', '.join(f'{s:.2f}' for s in seconds)} | 10 s |")
    print("other processes' share of the cores before each run: "
          + ", ".join("?" if x is None else f"{x:.2f}" for x in loads))
    print("verdicts: " + ", ".join(f"{n} {v} (β {b:.3g})" for n, (v, b) in result["verdicts"].items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
