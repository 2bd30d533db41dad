#!/bin/bash
# Issue-5 device call (session 11, call 1): the host KV pool pins its next chunk ahead on a
# helper thread (`HostPoolConfig::grow_ahead`). Session 11's first call found freekv's mean
# step 0.28-0.31 ms above its median over a long generation, oracle's 0.02: cuMemHostAlloc of
# a 128 MiB chunk (~75 ms) inside a step at a page boundary, every 256 steps at batch 4.
# (0) the recall tests (new: `pool_grows_ahead_within_the_limit`) and the model tests;
# (1) the dense phase (1K + 512, batch 4) with the previous binary (.device/prev) and the new
#     one, in both orders: means against medians;
# (2) a 16K context (16K prompt + 512, batch 4): oracle and freekv, previous and new binary.
# From the repository root: bash docs/device/issue5-s11-run1.sh [deadline s]
DL=${1:-300}; . "$(dirname "$0")/common.sh"
t recall 60 $D/cuda_recall_test --test-threads=1
grep -E "panicked|FAILED|^test .*(ok|FAILED)$" $L/recall.log | grep -E "pool|FAILED|panicked" | head -8
model_tests
dense() { dense_ab "$1" "$2" 45 4; }
dense prev1 .device/prev/cuda_freekv; dense new1 $D/cuda_freekv
dense new2 $D/cuda_freekv; dense prev2 .device/prev/cuda_freekv
ctx() { # NAME BINARY
    t "ctx_$1" 70 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:16384:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS=5 FREEKV_BENCH_JSON=$OUT/s11-ctx-$1.json "$2" --bench
}
ctx new $D/cuda_freekv; ctx prev .device/prev/cuda_freekv
means $OUT/s10-dense-*.json $OUT/s11-ctx-*.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
