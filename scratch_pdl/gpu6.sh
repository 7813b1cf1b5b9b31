# Session 21, run 2: shipped PDL (direct kernel: weights before the wait; fusion kernels), tests, benches, GPU suite.
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
timeout 120 python3 -m pytest -m gpu -n 4 -q tests/codegen/test_w4a16_direct.py tests/codegen/test_fusion.py > $OUT/tests.log 2>&1; echo tests rc=$?
grep -i "passed\|failed\|Error" $OUT/tests.log | tail -8
echo "t=$SECONDS"
timeout 100 python3 benchmarks/bench_decode_step.py --layers 8 > $OUT/decode_step.log 2>&1; echo decode rc=$?
tail -13 $OUT/decode_step.log
echo "t=$SECONDS"
timeout 100 python3 -m benchmarks.bench_w4_kernels direct --no-check --m 1,8 > $OUT/bench_direct.log 2>&1; echo direct rc=$?
tail -8 $OUT/bench_direct.log
echo "t=$SECONDS"
timeout $((420 - SECONDS)) python3 -m pytest -m gpu -n 8 -q tests > $OUT/gpu_suite.log 2>&1; echo suite rc=$?
grep -i "passed\|failed" $OUT/gpu_suite.log | tail -12
