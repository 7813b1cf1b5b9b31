#!/usr/bin/env bash
# Prepared in session 27 for the next device call, from a checkout of branch direct-m16: the direct kernel at
# M = 9-16 (two x tiles, the Triton kernel as a tuning candidate) was measured only as a probe; this runs its GPU
# tests, the side-by-side benchmark at M = 16, then the whole GPU suite. Merge into main only if all pass.
set -u
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo install failed; exit 1; }
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
timeout -s INT 170 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:benchmark tests/codegen/test_w4a16_direct.py > $OUT/direct_tests.log 2>&1; echo "tests exit $?" >> $OUT/direct_tests.log
tail -4 $OUT/direct_tests.log
timeout 100 python3 -m benchmarks.bench_w4_kernels direct --no-check --m 16 > $OUT/bench_m16.log 2>&1; echo "bench exit $?" >> $OUT/bench_m16.log
grep "^|" $OUT/bench_m16.log | cut -d'|' -f2-12
timeout -s INT 260 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider -p no:benchmark --durations=3 tests > $OUT/suite.log 2>&1; echo "suite exit $?" >> $OUT/suite.log
tail -3 $OUT/suite.log
