#!/usr/bin/env bash
# What the GPU machine checks, in calls that each fit the device tool's 10-minute limit.
# Usage (on the H200): bash benchmarks/gpu_run.sh OUT_DIR [tests|kernels|targets|all] [e2e layers]
#   tests:   every `gpu` test, then benchmarks/e2e.py and bench_decode_step.py  (about 9 minutes)
#   kernels: benchmarks/bench_kernels.py (GEMM, attention, norm, 2:4)  (about 5 minutes)
#   targets: the issue-4 targets, fastest first: prefill attention, e2e prefill, the W4A16 decode kernels (M = 1-16,
#            then M = 64), each under its own time limit, so a short call keeps what finished
# Writes OUT_DIR/gpu_tests.log, e2e.log, decode_step.log, kernels.log, attention.log, w4_direct.log, w4_wgmma.log and
# results.md (the tables, for RESULTS.md).
set -u
out=${1:-/tmp/llmopt-gpu}
stage=${2:-all}
layers=${3:-8}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 LLMOPT_RESULTS="$out/results.md"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
if [ "$stage" = tests ] || [ "$stage" = all ]; then
  timeout 380 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests > "$out/gpu_tests.log" 2>&1
  echo "gpu tests exit $?" >> "$out/gpu_tests.log"
  tail -15 "$out/gpu_tests.log"
  timeout 170 python3 benchmarks/e2e.py --layers "$layers" > "$out/e2e.log" 2>&1
  echo "e2e exit $?" >> "$out/e2e.log"
  grep -v Warning "$out/e2e.log" | tail -12
  timeout 90 python3 benchmarks/bench_decode_step.py --layers "$layers" > "$out/decode_step.log" 2>&1
  echo "decode step exit $?" >> "$out/decode_step.log"
  tail -14 "$out/decode_step.log"
fi
if [ "$stage" = targets ]; then
  timeout 120 python3 -m benchmarks.bench_attention --tables prefill > "$out/attention.log" 2>&1
  echo "attention exit $?" >> "$out/attention.log"
  tail -12 "$out/attention.log"
  timeout 170 python3 benchmarks/e2e.py --layers "$layers" > "$out/e2e.log" 2>&1
  echo "e2e exit $?" >> "$out/e2e.log"
  grep -v Warning "$out/e2e.log" | tail -12
  timeout 150 python3 -m benchmarks.bench_w4_kernels direct --no-check > "$out/w4_direct.log" 2>&1
  echo "w4 direct exit $?" >> "$out/w4_direct.log"
  tail -20 "$out/w4_direct.log"
  timeout 120 python3 -m benchmarks.bench_w4_kernels wgmma --no-check --m 64 > "$out/w4_wgmma.log" 2>&1
  echo "w4 wgmma exit $?" >> "$out/w4_wgmma.log"
  tail -8 "$out/w4_wgmma.log"
fi
if [ "$stage" = kernels ] || [ "$stage" = all ]; then
  timeout 500 python3 benchmarks/bench_kernels.py > "$out/kernels.log" 2>&1
  echo "kernels exit $?" >> "$out/kernels.log"
  grep -v Warning "$out/kernels.log" | tail -60
fi
