#!/usr/bin/env bash
# The core issue's GPU check: one bf16 training run of a random-init ~0.5B Llama with DeepSpeed ZeRO-3 on one
# GPU, through `accelerate launch`, printing the run's throughput and memory from metrics.jsonl.
# Needs: a CUDA GPU, refdpo installed with the deepspeed extra. Usage: bash benchmarks/gpu_zero3_check.sh [OUT]
set -euo pipefail
OUT=${1:-runs/gpu-zero3-check}
PY=${PY:-python}
$PY -m refdpo tiny --out "$OUT/setup" --train_pairs 512 --val_pairs 64 --max_len 1024 \
    --hidden 1024 --layers 24 --heads 16 --kv_heads 8 --intermediate 5504 --vocab_size 32000
$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 \
    --mixed_precision bf16 --dynamo_backend no --use_deepspeed \
    --deepspeed_config_file configs/deepspeed_zero3.json \
    -m refdpo train --model "$OUT/setup/model" --dataset "$OUT/setup/data" --max_len 1024 \
    --batch_size 8 --epochs 1 --max_lr 1e-5 --eval_interval 32 --report_freq 4 --report_to none \
    --output_dir "$OUT/run"
$PY - "$OUT/run/metrics.jsonl" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if "loss" in r][1:]  # the first window includes start-up
val = [r for r in rows if "val_loss" in r]
print(f"steps {rows[-1]['step']}  median tokens/s {statistics.median(r['tokens_per_s'] for r in train):.0f}  "
      f"peak GPU memory {max(r['peak_mem_gb'] for r in train):.1f} GiB  "
      f"val loss {val[0]['val_loss']:.4f} -> {val[-1]['val_loss']:.4f}")
PYEOF
