# PDL experiment: compile in parallel, then the bench.
export PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
for i in $(seq 0 15); do timeout 200 python3 -m scratch_pdl.warm $i 16 > $OUT/warm$i.log 2>&1 & done
wait
cat $OUT/warm*.log | grep -i "error\|warm" | sort | uniq -c | head -5
echo "t=$SECONDS"
timeout $((540 - SECONDS)) python3 -m scratch_pdl.bench_pdl > $OUT/bench.log 2>&1; echo bench rc=$?
grep -v "^{" $OUT/bench.log | tail -40
