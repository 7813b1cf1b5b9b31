#!/usr/bin/env bash
# Everything the GPU machine checks, in one call: the `gpu` tests, then the benchmarks.
# Usage (on the H200): bash benchmarks/gpu_run.sh OUT_DIR [e2e layers]
set -u
out=${1:-/tmp/llmopt-gpu}
layers=${2:-8}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LLMOPT_RESULTS="$out/results.md"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
timeout 150 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_triton_backend.py tests/codegen/test_fusion.py tests/compress 2>&1 | tail -25 | tee "$out/gpu_tests.log"
timeout 220 python3 benchmarks/e2e.py --layers "$layers" 2>&1 | grep -v Warning | tee "$out/e2e.log"
