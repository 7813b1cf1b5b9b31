# PDL: the whole GPU suite (with the new chain tests) beside compiles, the modes bench, then bench_w4_kernels.
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
(timeout 280 python3 -m pytest -m gpu -n 8 -q tests > $OUT/gpu_suite.log 2>&1; echo suite rc=$? >> $OUT/gpu_suite.log) &
for i in $(seq 0 7); do timeout 200 python3 -m scratch_pdl.warm $i 8 > $OUT/warm$i.log 2>&1 & done
wait
cat $OUT/warm*.log | grep -i "error\|warm" | sort | uniq -c | head -3; grep -i "passed\|failed\|rc=" $OUT/gpu_suite.log | tail -12
echo "t=$SECONDS"
timeout $((420 - SECONDS)) python3 -m scratch_pdl.bench_pdl > $OUT/bench_pdl.log 2>&1; echo bench rc=$?
grep -v "^{" $OUT/bench_pdl.log | tail -32
echo "t=$SECONDS"
timeout $((585 - SECONDS)) python3 -m benchmarks.bench_w4_kernels --no-check > $OUT/bench_w4.log 2>&1; echo bench_w4 rc=$?
grep "^|\|###" $OUT/bench_w4.log | cut -d'|' -f1-12,14-15
