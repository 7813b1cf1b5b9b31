export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
timeout 120 python3 -m pytest -m gpu -n 8 -q tests/codegen/test_w4a16_wgmma.py tests/codegen/test_gemm_kernels.py 2>&1 | tail -3
echo "t=$SECONDS"
timeout $((250 - SECONDS)) python3 -m benchmarks.bench_w4_kernels wgmma > $OUT/bench_w4_kernels.log 2>&1; echo w4k rc=$?
tail -16 $OUT/bench_w4_kernels.log
echo "t=$SECONDS"
timeout $((420 - SECONDS)) python3 -m benchmarks.bench_gemm > $OUT/bench_gemm.log 2>&1; echo gemm rc=$?
grep -v "^$" $OUT/bench_gemm.log | head -45
