"""A resumable checkpoint's size on disk, by engine: does it hold the weights once?

What is measured: one `refdpo train` run per engine (one process, then FSDP2 and DeepSpeed ZeRO-2/3 on two
gloo processes, launched as a GPU user would), float32, 2 optimizer steps, of a random-init Llama built by
`refdpo tiny` (default hidden 512, 8 layers, 16k vocabulary: 33.6M parameters, so that files' fixed costs are
small). For the `last` checkpoint: the exported model, `state/`, the whole folder, and the ratio of the folder
to what a resumable checkpoint cannot do without: the weights (4 bytes per parameter) plus the optimizer
state (AdamW's two moments, 8 bytes; DeepSpeed's optimizer also keeps its float32 master copy, 12 bytes).

Run (from the repository root): .venv/bin/python benchmarks/checkpoint_size.py [--hidden 512 --layers 8]
Results: a markdown table on stdout and JSON in benchmarks/results/checkpoint_size.json (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
ENGINES = {"one process": ([], 8), "FSDP2": (["--use_fsdp", "--fsdp_version", "2"], 4),
           "ZeRO-2": (["--use_deepspeed", "--zero_stage", "2"], 4),
           "ZeRO-3": (["--use_deepspeed", "--zero_stage", "3"], 4)}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def parameters(checkpoint: Path) -> int:
    """Parameters in the export, from the safetensors headers (nothing loaded)."""
    import math

    from safetensors import safe_open

    total = 0
    for path in checkpoint.glob("model*.safetensors"):
        with safe_open(path, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (no __iter__)
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "checkpoint_size.json")
    args = p.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="checkpoint_size_") as tmp:
        setup = Path(tmp) / "setup"
        subprocess.run([sys.executable, "-m", "refdpo", "tiny", "--out", str(setup), "--train_pairs", "16",
                        "--val_pairs", "8", "--hidden", str(args.hidden), "--layers", str(args.layers),
                        "--heads", "8", "--kv_heads", "4", "--intermediate", str(3 * args.hidden),
                        "--vocab_size", str(args.vocab)], check=True, env=env, cwd=ROOT, capture_output=True)
        for k, (engine, (flags, batch)) in enumerate(ENGINES.items()):
            run = Path(tmp) / f"run{k}"
            train = ["-m", "refdpo", "train", "--model", str(setup / "model"), "--dataset", str(setup / "data"),
                     "--val_split", "", "--epochs", "1", "--batch_size", str(batch), "--report_to", "none",
                     "--no-progress", "--no-gradient_checkpointing", "--output_dir", str(run)]
            cmd = [*LAUNCH, *flags, "--main_process_port", str(29650 + k), *train] if flags \
                else [sys.executable, *train]
            result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stdout[-2000:], result.stderr[-3000:])
                return 1
            last = (run / "last").resolve()
            export = sum(f.stat().st_size for f in last.glob("model*.safetensors"))
            params = parameters(last)
            optimizer = (12 if "ZeRO" in engine else 8) * params
            needed = 4 * params + optimizer
            rows.append({"engine": engine, "parameters": params, "recorded": json.loads((run / "summary.json").read_text())["engine"],
                         "export_bytes": export, "state_bytes": folder_bytes(last / "state"),
                         "folder_bytes": folder_bytes(last), "weights_plus_optimizer_bytes": needed,
                         "ratio": folder_bytes(last) / needed})
    print(f"\n{rows[0]['export_bytes'] / 2**20:.1f} MiB of float32 weights; MiB on disk:\n")
    print("| engine | export | state/ | checkpoint folder | weights + optimizer | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['export_bytes'] / 2**20:.1f} | {r['state_bytes'] / 2**20:.1f} | "
              f"{r['folder_bytes'] / 2**20:.1f} | {r['weights_plus_optimizer_bytes'] / 2**20:.1f} | "
              f"{r['ratio']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "checkpoint size (benchmarks/checkpoint_size.py)",
                                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                                    "command": " ".join(["benchmarks/checkpoint_size.py", *sys.argv[1:]]),
                                    "model": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["ratio"] <= 1.1 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
