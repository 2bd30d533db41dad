#!/bin/bash
# Issue-5 device call 4 (session 7): spare slots as a victim cache (pages leaving the top-k stay
# until needed, the lowest-scored overwritten first; no extra recall): the selection and model
# GPU tests, then batch 4 at contexts 4K and 8K (long generation, S = 0.92, τ = 0.9) and long
# input 32K (S = 0.84, τ = 0.8), against oracle and the session-6 default.
# Needs .device/t/{select,cuda_freekv_test,cuda_freekv}. Run from the repository root:
#   bash docs/device/issue5-s7-run4.sh [deadline s]
DL=${1:-560}; . "$(dirname "$0")/common.sh"
t select 120 $D/select --test-threads=1
grep -E "^test .*(FAILED|ok)$|panicked" "$L/select.log" | head -10
t freekv_test 200 $D/cuda_freekv_test --test-threads=1 --nocapture
grep -E "^test |panicked|differs|spare" "$L/freekv_test.log" | head -30
if grep -q "FAILED\|panicked" "$L"/select.log "$L"/freekv_test.log; then echo "tests failed: no bench"; else
t gen4 150 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:3072 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.9,freekv@0.9~sp32,freekv@0.9~serial~sp32 FREEKV_BENCH_RUN_SECONDS=32 FREEKV_BENCH_JSON=$OUT/s7-gen4-victim.json $D/cuda_freekv --bench
report $OUT/s7-gen4-victim.json
t gen8k 130 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:8192:1536 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.9,freekv@0.9~sp32,freekv@0.9~serial~sp32 FREEKV_BENCH_RUN_SECONDS=20 FREEKV_BENCH_JSON=$OUT/s7-gen8k-victim.json $D/cuda_freekv --bench
report $OUT/s7-gen8k-victim.json
t li4 80 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.84 FREEKV_BENCH_SCENARIOS=long-input:32768:256 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.8,freekv@0.8~sp32 FREEKV_BENCH_RUN_SECONDS=15 FREEKV_BENCH_JSON=$OUT/s7-li32k-victim.json $D/cuda_freekv --bench
report $OUT/s7-li32k-victim.json
fi
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
