# PDL, last budget: the W4A16 GPU tests beside compiles, then the modes bench until t = 200 s.
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
(timeout 110 python3 -m pytest -m gpu -n 4 -q tests/codegen/test_w4a16_wgmma.py tests/codegen/test_w4a16_direct.py tests/codegen/test_tuning.py > $OUT/tests.log 2>&1; echo tests rc=$? >> $OUT/tests.log) &
for i in $(seq 0 9); do timeout 110 python3 -m scratch_pdl.warm $i 10 > $OUT/warm$i.log 2>&1 & done
wait
cat $OUT/warm*.log | grep -i "error\|warm" | sort | uniq -c | head -3; grep -i "passed\|failed\|rc=\|Error" $OUT/tests.log | tail -12
echo "t=$SECONDS"
timeout $((200 - SECONDS)) python3 -m scratch_pdl.bench_pdl > $OUT/bench_pdl.log 2>&1; echo bench rc=$?
grep -v "^{" $OUT/bench_pdl.log | tail -30; grep "^{" $OUT/bench_pdl.log
