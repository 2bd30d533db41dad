#!/bin/bash
# Issue-5 device call 1 (session 8): where the freekv step spends its time beyond oracle's.
# (1) ncu, kernel by kernel (gpu__time_duration, clocks left alone), over 3 decode steps of
#     oracle and freekv at batch 4, in the dense phase (context 1K < budget 2K) and at 8K,
#     through the bench's FREEKV_BENCH_PROFILE_STEPS hook (cuProfilerStart/Stop);
# (2) the spare-slot count at long generation contexts: batch 4, 8K and 16K, x = 32/64/96;
# (3) copies the first part of the default model (too big for one carry) to /tmp for call 2.
# Needs .device/t/cuda_freekv (the stripped bench) and .device/m1/part. From the repository root:
#   bash docs/device/issue5-s8-run1.sh [deadline s]
DL=${1:-520}; . "$(dirname "$0")/common.sh"
cp .device/m1/part /tmp/m.part1 && echo "model part 1: $(stat -c %s /tmp/m.part1) bytes in /tmp"
B=llama-3.1-8b+persistent=0.92 PROF_LIMIT=150 PROF_SECONDS=60
# prof NAME SCENARIO POLICY: common.sh's prof with this call's bench binary.
prof8() { prof "$1" $D/cuda_freekv "$2" "$3"; }
prof8 dense_oracle long-generation:1024:16 oracle
prof8 dense_freekv long-generation:1024:16 freekv
prof8 8k_oracle long-generation:8192:16 oracle
prof8 8k_freekv long-generation:8192:16 freekv
t spare8k 120 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:8192:1280 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv,freekv~sp64,freekv~sp96 FREEKV_BENCH_RUN_SECONDS=12 FREEKV_BENCH_JSON=$OUT/s8-gen8k-spare.json $D/cuda_freekv --bench
report $OUT/s8-gen8k-spare.json
t spare16k 100 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:16384:768 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv,freekv~sp96 FREEKV_BENCH_RUN_SECONDS=8 FREEKV_BENCH_JSON=$OUT/s8-gen16k-spare.json $D/cuda_freekv --bench
report $OUT/s8-gen16k-spare.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
