#!/usr/bin/env bash
# The GPU-marked checks, for a machine with a GPU (strict: a missing GPU or backend fails, never skips).
#
# Where bitsandbytes is not installed, put its wheel in .whl/ first (for the device tool's machines:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
# and carry .whl). Output goes to $OUT/gpu-tests.log when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# the plugin's entry point must exist for pytester's inner runs: install without network or build isolation
python3 -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/llmload . >/dev/null
export PYTHONPATH=/tmp/llmload${PYTHONPATH:+:$PYTHONPATH}
log=${OUT:-/tmp}/gpu-tests.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 -m pytest tests/test_gpu.py tests/test_hardware.py -p no:cacheprovider \
    --llm-require-gpus -rs -q 2>&1 | tee "$log"
