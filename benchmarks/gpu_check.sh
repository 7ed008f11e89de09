#!/usr/bin/env bash
# The GPU acceptance check: every GPU path of refdpo on one GPU, one PASS/FAIL/SKIP line per check, every
# figure in OUT/gpu_check.json (see benchmarks/gpu_check.py for the checks and their tolerances).
#   bash benchmarks/gpu_check.sh OUT [--only sdpa,zero3,...] [--size 0.5b|tiny]
# Needs: torch with CUDA, transformers, accelerate; deepspeed, liger-kernel, trl and datasets for their checks
# (flash-attn optional). Wheels in $WHEELS (default .whl/; for a machine with no index, see DEVELOPERS.md) are
# installed into /tmp/site first. Without a GPU it runs what a CPU can: the dry run of the script itself
# (WHEELS=none PY=.venv/bin/python bash benchmarks/gpu_check.sh /tmp/gc --size tiny).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT [gpu_check.py flags]}
shift
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo "FAIL setup: could not install the wheels in $WHEELS/"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    export DS_ACCELERATOR=cuda  # a deepspeed wheel built on a CPU machine would otherwise remember "cpu"
fi
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
