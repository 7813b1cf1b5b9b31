# Session 21: W4A16 + fusion GPU tests beside compiles, the PDL modes bench, the one-token step bench, the whole GPU suite.
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
nvidia-smi --query-gpu=name --format=csv,noheader
(timeout 170 python3 -m pytest -m gpu -n 4 -q tests/codegen/test_w4a16_wgmma.py tests/codegen/test_w4a16_direct.py tests/codegen/test_tuning.py tests/codegen/test_gemm_kernels.py tests/codegen/test_fusion.py > $OUT/tests.log 2>&1; echo tests rc=$? >> $OUT/tests.log) &
for i in $(seq 0 9); do timeout 150 python3 -m scratch_pdl.warm $i 10 > $OUT/warm$i.log 2>&1 & done
wait
cat $OUT/warm*.log | grep -i "error\|warm" | sort | uniq -c | head -3; grep -i "passed\|failed\|rc=\|Error" $OUT/tests.log | tail -12
echo "t=$SECONDS"
timeout $((240 - SECONDS)) python3 -m scratch_pdl.bench_pdl > $OUT/bench_pdl.log 2>&1; echo bench rc=$?
grep -v "^{" $OUT/bench_pdl.log | tail -40
echo "t=$SECONDS"
timeout 150 python3 benchmarks/bench_decode_step.py --layers 8 > $OUT/decode_step.log 2>&1; echo decode rc=$?
tail -14 $OUT/decode_step.log
echo "t=$SECONDS"
timeout $((560 - SECONDS)) python3 -m pytest -m gpu -n 8 -q tests > $OUT/gpu_suite.log 2>&1; echo suite rc=$?
grep -i "passed\|failed" $OUT/gpu_suite.log | tail -12
