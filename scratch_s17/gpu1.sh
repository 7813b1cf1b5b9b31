export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv
(timeout 190 python3 -m pytest -m gpu -n 8 -q tests/codegen/test_w4a16_wgmma.py tests/codegen/test_w4a16_direct.py tests/codegen/test_gemm_kernels.py > $OUT/tests_wgmma.log 2>&1; echo tests rc=$? >> $OUT/tests_wgmma.log) &
for i in 0 1 2 3 4 5 6 7; do timeout 190 python3 -m scratch_s17.warm $i 8 > $OUT/warm$i.log 2>&1 & done
for i in 0 1 2 3 4 5 6 7; do timeout 190 python3 -m scratch_s17.check_b $i 8 > $OUT/check$i.log 2>&1 & done
wait
echo "t=$SECONDS after tests+warm"; tail -25 $OUT/tests_wgmma.log; tail -q -n 2 $OUT/warm*.log
cat $OUT/check*.log | grep -v "^ *warn\|Warning" | tail -20
echo "t=$SECONDS"
timeout $((420 - SECONDS)) python3 -m scratch_s17.bench_old_new 64 16 32 128 > $OUT/bench_old_new.log 2>&1; echo bench rc=$?
grep -v "^{" $OUT/bench_old_new.log | tail -30
echo "t=$SECONDS"
timeout $((475 - SECONDS)) python3 -m pytest -m gpu -n 8 -q tests --ignore=tests/codegen/test_w4a16_wgmma.py --ignore=tests/codegen/test_w4a16_direct.py --ignore=tests/codegen/test_gemm_kernels.py > $OUT/tests_gpu_all.log 2>&1; echo all rc=$?
tail -15 $OUT/tests_gpu_all.log
