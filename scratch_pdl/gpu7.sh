# Session 21, last budget: the shipped direct kernel with weights before the wait: its GPU tests, the step bench, M = 1 stream.
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
timeout 100 python3 -m pytest -m gpu -n 4 -q tests/codegen/test_w4a16_direct.py > $OUT/tests.log 2>&1; echo tests rc=$?
grep -i "passed\|failed\|Error" $OUT/tests.log | tail -8
echo "t=$SECONDS"
timeout 90 python3 benchmarks/bench_decode_step.py --layers 8 > $OUT/decode_step.log 2>&1; echo decode rc=$?
tail -13 $OUT/decode_step.log
echo "t=$SECONDS"
timeout 90 python3 -m benchmarks.bench_w4_kernels direct --no-check --m 1 > $OUT/bench_direct.log 2>&1; echo direct rc=$?
tail -8 $OUT/bench_direct.log
echo "t=$SECONDS"
