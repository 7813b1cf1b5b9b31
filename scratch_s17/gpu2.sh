set -x
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
timeout 300 python3 -m pytest -m gpu -n 8 -q tests > $OUT/tests_gpu_all.log 2>&1; echo rc=$?
tail -15 $OUT/tests_gpu_all.log
timeout 250 python3 -m benchmarks.bench_w4_kernels wgmma > $OUT/bench_w4_kernels.log 2>&1; echo rc=$?
tail -30 $OUT/bench_w4_kernels.log
