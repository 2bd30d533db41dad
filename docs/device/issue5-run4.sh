#!/bin/bash
# Issue-5 device call 4 (session 5): batch 16 — long generation (1K prompt, 3072 steps, S = 0.92
# calibrated for τ = 0.9) with full / oracle / freekv@0.9 / freekv-spec / arkvale, then long input
# at 32K (S = 0.84 calibrated for τ = 0.8) with the policies that fit an H100 (full and oracle
# hold the 64 GiB history on the device and do not).
# Needs .device/t/cuda_freekv. Run from the repository root: bash docs/device/issue5-run4.sh [deadline s]
DL=${1:-480}; . "$(dirname "$0")/common.sh"
t gen16 290 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:3072 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=full,oracle,freekv@0.9,freekv-spec,arkvale FREEKV_BENCH_RUN_SECONDS=50 FREEKV_BENCH_JSON=$OUT/gen16.json $D/cuda_freekv --bench
grep "^|" $L/gen16.log | cut -d'|' -f2,4,5,6,7,8,9,10,12,13,14
grep -E "ms/step median" $L/gen16.log | sed -E 's/.*bs ([0-9]+) ([^:]+): ([0-9.]+) ms.*over ([0-9]+) steps.* quarters (\[[^]]*\]).*GPU ([0-9.]+) GiB.*/bs\1 \2 \3 n=\4 \5 GPU \6/'
t in16 170 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.84 FREEKV_BENCH_SCENARIOS=long-input:32768:32 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=freekv,freekv-spec,arkvale FREEKV_BENCH_RUN_SECONDS=4 FREEKV_BENCH_JSON=$OUT/in16.json $D/cuda_freekv --bench
grep "^|" $L/in16.log | cut -d'|' -f2,4,5,6,7,8,9,10,12,13,14
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
