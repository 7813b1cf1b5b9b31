#!/usr/bin/env bash
# Everything the GPU machine checks, in one call: every `gpu` test, then the benchmarks.
# Usage (on the H200): bash benchmarks/gpu_run.sh OUT_DIR [e2e layers]
# Writes OUT_DIR/gpu_tests.log, e2e.log, kernels.log and results.md (the tables, for RESULTS.md).
set -u
out=${1:-/tmp/llmopt-gpu}
layers=${2:-8}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LLMOPT_RESULTS="$out/results.md"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
timeout 420 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests > "$out/gpu_tests.log" 2>&1
echo "gpu tests exit $?" >> "$out/gpu_tests.log"
tail -15 "$out/gpu_tests.log"
timeout 200 python3 benchmarks/e2e.py --layers "$layers" > "$out/e2e.log" 2>&1
echo "e2e exit $?" >> "$out/e2e.log"
grep -v Warning "$out/e2e.log" | tail -12
timeout 300 python3 benchmarks/kernels.py > "$out/kernels.log" 2>&1
echo "kernels exit $?" >> "$out/kernels.log"
grep -v Warning "$out/kernels.log" | tail -60
