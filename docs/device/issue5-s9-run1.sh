#!/bin/bash
# Issue-5 device call 1 (session 9): the faster selection kernels.
# (1) the selection and correction tests (bit-exact against the CPU reference) and the model
#     tests on the new kernels (fewer radix passes, the attended top-k ranked within the wanted
#     pages, warp-aggregated histogram counts, the 8-lane cosine);
# (2) ncu, kernel by kernel, over 3 decode steps at a 16K context, batch 4: freekv with the
#     session-8 binary (.device/old) and the new one, oracle with the new one;
# (3) ncu source counters (SASS, warp stalls) of one freekv_select_rows launch;
# (4) the step time at 16K, batch 4, oracle and freekv, old and new binaries in one call.
# From the repository root: bash docs/device/issue5-s9-run1.sh [deadline s]
DL=${1:-560}; . "$(dirname "$0")/common.sh"
B=llama-3.1-8b+persistent=0.92
t select 120 $D/select --test-threads=1
t model 200 $D/cuda_freekv_test --test-threads=1
prof old_freekv .device/old/cuda_freekv long-generation:16384:16 freekv
prof new_freekv $D/cuda_freekv long-generation:16384:16 freekv
prof new_oracle $D/cuda_freekv long-generation:16384:16 oracle
t src 100 env FREEKV_BENCH_MODEL=$B FREEKV_BENCH_SCENARIOS=long-generation:16384:16 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=freekv FREEKV_BENCH_PROFILE_STEPS=1 FREEKV_BENCH_RUN_SECONDS=30 \
    ncu --profile-from-start off --clock-control none --kernel-name freekv_select_rows --launch-skip 40 --launch-count 1 --section SourceCounters --section WarpStateStats -o /tmp/src -f $D/cuda_freekv --bench
ncu -i /tmp/src.ncu-rep --page source --csv --print-source sass > $OUT/src_select_rows.csv 2> $L/src_page.err
ncu -i /tmp/src.ncu-rep --page details > $OUT/src_details.txt 2>&1
for v in old new; do
    bin=$D/cuda_freekv; [ $v = old ] && bin=.device/old/cuda_freekv
    t ab_$v 90 env FREEKV_BENCH_MODEL=$B FREEKV_BENCH_SCENARIOS=long-generation:16384:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS=6 FREEKV_BENCH_JSON=$OUT/s9-ab16k-$v.json $bin --bench
    echo "== $v"; report $OUT/s9-ab16k-$v.json
done
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
