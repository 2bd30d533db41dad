#!/bin/bash
# Issue-5 device call 6 (session 8), an experiment NOT kept: the selection kernel keeping the
# row's scores in shared memory (freekv_select_rows took 14.63 against 14.9 µs per call under
# ncu: its time is not in the reads of the scores, so the change was dropped). It was:
# the selection kernel keeps the row's scores in shared memory
# (read there by the softmax, the radix top-k and the free-slot order instead of from the global
# scratch). The select tests (bit-exact against the CPU reference; shapes with and without the
# cache), the model tests, racecheck over the select test, the kernel's time under ncu (8K,
# batch 4, freekv), and batch 4 at 8K, oracle and freekv (compare with call 3's 8.51 / 8.91 ms:
# another machine of the same kind). Needs .device/t6/{select,cuda_freekv_test,cuda_freekv}.
DL=${1:-160}; . "$(dirname "$0")/common.sh"
D=.device/t6
t select 40 $D/select --test-threads=1
t freekv_test 40 $D/cuda_freekv_test --test-threads=1
grep -hE "^test result|FAILED|panicked" "$L"/select.log "$L"/freekv_test.log | head -6
if grep -qE "FAILED|panicked" "$L"/*.log; then echo "tests failed: no bench"; exit 1; fi
M=llama-3.1-8b+persistent=0.92
t prof 50 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:8192:16 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=freekv FREEKV_BENCH_PROFILE_STEPS=3 FREEKV_BENCH_RUN_SECONDS=60 \
    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum -k regex:freekv_select_rows -o /tmp/prof -f $D/cuda_freekv --bench
ncu -i /tmp/prof.ncu-rep --csv --page raw --metrics gpu__time_duration.sum 2>&1 | python3 -c '
import csv,sys
rows=list(csv.reader(sys.stdin)); h=rows[0]; ti=h.index("gpu__time_duration.sum"); sc={"nsecond":1e-3,"usecond":1,"msecond":1e3}.get(rows[1][ti],1)
v=[float(r[ti].replace(",",""))*sc for r in rows[2:] if len(r)>ti]
print(f"freekv_select_rows: {len(v)} calls, mean {sum(v)/max(len(v),1):.2f} us")'
t gen 60 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:8192:768 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS=8 FREEKV_BENCH_JSON=$OUT/s8-gen8k-scorecache.json $D/cuda_freekv --bench
report $OUT/s8-gen8k-scorecache.json
