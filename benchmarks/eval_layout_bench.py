"""Evaluation pass time by batch layout: padded rows vs packed rows (each prompt computed once), pairs in file
order vs batches of similar length (refdpo's defaults: packed, by length).

What is timed: `refdpo.core.forward.evaluate_pairs` over every pair of a split, batches of `--batch` pairs, one
process, float32, no gradients, `--threads` torch threads, denormals flushed, allocator tuned as the `refdpo`
entry point does. The four variants alternate, `--rounds` times; medians. All four must give the same
validation loss (within 1e-5): the JSON records each.

Input: a model folder and a RefDPO-format data folder whose split has reference log-probs, e.g. the 12M setup
that `benchmarks/train_bench.py --size 12m --workdir W` leaves in W/setup/12m (its `model/` and `data/`).

Run (from the repository root):
    .venv/bin/python benchmarks/train_bench.py --size 12m --tools refdpo --allocators default --reps 1 \\
        --steps 14 --skip-numerics --workdir /tmp/tbw --out /tmp/tbw/out.json
    .venv/bin/python benchmarks/eval_layout_bench.py --setup /tmp/tbw/setup/12m [--rounds 3] [--batch 8]
Results: a markdown table on stdout and JSON in benchmarks/results/eval_layout_bench.json (`--out`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

VARIANTS = (("padded", False, False), ("padded", True, False), ("packed", False, True), ("packed", True, True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setup", type=Path, required=True, help="folder holding model/ and data/")
    p.add_argument("--split", default="train")
    p.add_argument("--batch", type=int, default=8, help="pairs per evaluation batch (default 8)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_layout_bench.json")
    args = p.parse_args(argv)

    from accelerate import Accelerator

    import refdpo.core.forward as ev
    from refdpo.allocator import tune_allocator
    from refdpo.commands.train_config import TrainConfig
    from refdpo.core.verify import choose_collate
    from refdpo.data import collate_pairs, load_pairs, parse_ref_columns
    from refdpo.io import atomic_write_json
    from refdpo.modeling import load_policy, pad_token_id
    from refdpo.tokenization import load_tokenizer

    tuned = tune_allocator()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    cfg = TrainConfig(model=str(args.setup / "model"), dataset=str(args.setup / "data"), template="tulu",
                      max_len=512, attn_implementation="sdpa", gradient_checkpointing=False).validate()
    tokenizer = load_tokenizer(cfg.model)
    pad_id = pad_token_id(tokenizer)
    data = load_pairs(cfg, args.split, tokenizer, parse_ref_columns(cfg.ref_columns))
    accelerator = Accelerator(cpu=True)
    model = load_policy(cfg, accelerator.device).eval()
    packed = choose_collate(model, data, pad_id, accelerator.device, True)
    by_length = ev.eval_batches

    def file_order(num_pairs, batch_size, world_size=1, rank=0, lengths=None):
        return by_length(num_pairs, batch_size, world_size, rank, None)

    times: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for layout, sort, pack in VARIANTS:
            name = f"{layout}, {'by length' if sort else 'file order'}"
            ev.eval_batches = by_length if sort else file_order  # the one difference between the two orders
            start = time.perf_counter()
            metrics = ev.evaluate_pairs(model, data, cfg.objective, accelerator, args.batch, pad_id, True,
                                        collate=packed if pack else collate_pairs)
            times.setdefault(name, []).append(time.perf_counter() - start)
            losses[name] = metrics["val_loss"]
    ev.eval_batches = by_length
    base = statistics.median(times["padded, file order"])
    rows = [{"variant": k, "seconds_median": statistics.median(v), "seconds": v, "val_loss": losses[k],
             "speedup_vs_padded_file_order": base / statistics.median(v)} for k, v in times.items()]
    tokens = int(data.token_counts().sum())
    print(f"{len(data)} pairs, {tokens:,} tokens, batches of {args.batch}, {args.threads} threads, "
          f"{args.rounds} rounds (medians)\n")
    print("| layout | seconds | x padded, file order | val loss |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds_median']:.2f} | {r['speedup_vs_padded_file_order']:.2f} | "
              f"{r['val_loss']:.6f} |")
    spread = max(losses.values()) - min(losses.values())
    print(f"\nval loss spread across layouts: {spread:.1e} (must be <= 1e-5)")
    atomic_write_json(args.out, {
        "benchmark": "evaluation pass by batch layout (benchmarks/eval_layout_bench.py)",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]), "pairs": len(data), "tokens": tokens,
        "batch": args.batch, "threads": args.threads, "rounds": args.rounds, "allocator_tuned": tuned,
        "packed_layout": str(getattr(packed, "keywords", "padded")), "rows": rows, "val_loss_spread": spread})
    print(f"wrote {args.out}")
    return 0 if spread <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
