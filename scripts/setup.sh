#!/usr/bin/env bash
# Create the virtualenv .venv at the repository root and install refdpo into it (editable, with dev tools and
# DeepSpeed, so that the tests run FSDP2 and ZeRO-2/3 on CPU processes).
# torch is installed first, pinned: on a CPU-only machine `torch==2.13.0` takes the local CPU wheel, while an
# unpinned torch would pull gigabytes of CUDA packages. Override with TORCH_SPEC (e.g. a CUDA build's spec).
# DeepSpeed is a source distribution whose build imports torch: it is built against the torch just installed
# (no build isolation, which would fetch an unpinned torch) with no ops compiled (DS_BUILD_OPS=0; on a GPU
# DeepSpeed compiles an op when first used). EXTRAS without deepspeed skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
DEEPSPEED_SPEC=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
EXTRAS=${EXTRAS:-dev,deepspeed}
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
"${PIP[@]}" "$TORCH_SPEC"
if [[ ",$EXTRAS," == *",deepspeed,"* ]]; then
    "${PIP[@]}" setuptools wheel py-cpuinfo packaging
    DS_BUILD_OPS=0 "${PIP[@]}" --no-build-isolation "$DEEPSPEED_SPEC"
fi
"${PIP[@]}" -e ".[$EXTRAS]"
