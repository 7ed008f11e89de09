#!/usr/bin/env bash
# Create the virtualenv .venv at the repository root and install refdpo into it (editable, with dev tools).
# torch is installed first, pinned: on a CPU-only machine `torch==2.13.0` takes the local CPU wheel, while an
# unpinned torch would pull gigabytes of CUDA packages. Override with TORCH_SPEC (e.g. a CUDA build's spec).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
