#!/bin/bash
# Issue-5 device call (session 10), the short form of issue5-s10-run1.sh for what device time was
# left after eight failed starts: the model tests (the all-dense graph against eager steps, bit
# for bit; reserved SMs), the dense phase (1K + 512, batch 4) with the session-9 binary and the
# new one, then, as time allows, freekv with 16 SMs reserved against the default at 16K.
# From the repository root: bash docs/device/issue5-s10-run3.sh [deadline s]
DL=${1:-300}; . "$(dirname "$0")/common.sh"
M=llama-3.1-8b+persistent=0.92
model_tests
dense() { dense_ab "$1" "$2" 45 3; }
dense new1 $D/cuda_freekv; dense old1 .device/old/cuda_freekv
[ "$(left)" -gt 100 ] && { t rs 80 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:16384:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv,freekv~rs16 FREEKV_BENCH_RUN_SECONDS=4 FREEKV_BENCH_JSON=$OUT/s10-rs.json $D/cuda_freekv --bench; report $OUT/s10-rs.json; }
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
