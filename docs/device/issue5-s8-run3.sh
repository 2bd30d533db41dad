#!/bin/bash
# Issue-5 device call 3 (session 8): the compacted masked attention (each KV head's attended
# pages listed in shared memory; splits planned for the budget, not the physical slots) and the
# compute stream's raised priority (FREEKV_STREAM_PRIORITY, node priorities kept in the graph).
# Tests (attention: masked launch bit-equal to a table of the attended pages; select; the model
# tests), racecheck over the odd-group attention test, ncu of freekv at 8K (kernel times), then
# batch 4 long generation: dense phase (1K) and 8K, priority on and off, with freekv-spec
# (no correction) to split the cost. Needs .device/t/{attention,select,cuda_freekv_test,
# cuda_freekv}. From the repository root: bash docs/device/issue5-s8-run3.sh [deadline s]
DL=${1:-430}; . "$(dirname "$0")/common.sh"
t attention 120 $D/attention --test-threads=1
t select 60 $D/select --test-threads=1
t freekv_test 120 $D/cuda_freekv_test --test-threads=1 --nocapture
grep -hE "^test .*(FAILED|ok)$|panicked" "$L"/attention.log "$L"/select.log "$L"/freekv_test.log | grep -v " ok$" | head
if grep -qE "FAILED|panicked" "$L"/*.log; then echo "tests failed: no bench"; tar czf $OUT/logs.tgz -C $OUT logs; exit 1; fi
t racecheck 100 compute-sanitizer --tool racecheck --racecheck-report all $D/attention --test-threads=1 decode_large_and_odd_groups
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|test result" "$L/racecheck.log" | head -5
M=llama-3.1-8b+persistent=0.92
t prof 90 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:8192:16 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=freekv FREEKV_BENCH_PROFILE_STEPS=3 FREEKV_BENCH_RUN_SECONDS=60 \
    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum -o /tmp/prof -f $D/cuda_freekv --bench
ncu -i /tmp/prof.ncu-rep --csv --page raw --metrics gpu__time_duration.sum 2>&1 | python3 -c '
import csv,sys,collections
rows=list(csv.reader(sys.stdin)); h=rows[0]; ki=h.index("Kernel Name"); si=h.index("Stream"); ti=h.index("gpu__time_duration.sum")
sc={"nsecond":1e-3,"usecond":1,"msecond":1e3}.get(rows[1][ti],1); a=collections.defaultdict(lambda:[0,0.0])
for r in rows[2:]:
    try: v=float(r[ti].replace(",",""))*sc
    except (ValueError,IndexError): continue
    k=(r[si],r[ki].split("(")[0][:40]); a[k][0]+=1; a[k][1]+=v
for (s,k),(n,v) in sorted(a.items(),key=lambda x:-x[1][1])[:12]: print(f"  s{s:>3} {k:40s} {n/3:5.1f}/step {v/3:7.1f} us/step {v/n:6.2f} us")'
for pr in on off; do
  t gen_$pr 110 env FREEKV_STREAM_PRIORITY=$pr FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:1024:768,long-generation:8192:1024 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv,freekv-spec FREEKV_BENCH_RUN_SECONDS=8 FREEKV_BENCH_JSON=$OUT/s8-gen-prio-$pr.json $D/cuda_freekv --bench
  echo "priority $pr:"; report $OUT/s8-gen-prio-$pr.json
done
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
