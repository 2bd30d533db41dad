#!/bin/bash
# Issue-5 device call 3 (session 7): spare slots where they cover a small share of the
# candidates: batch-4 long generation from an 8K context (long-generation:8192:1536, ~270
# candidate pages against 32 + spare; S = 0.92, τ = 0.9), and long input (32K, S = 0.84,
# τ = 0.8) at batch 4, against oracle and the session-6 default.
# Needs .device/t/cuda_freekv. Run from the repository root:
#   bash docs/device/issue5-s7-run3.sh [deadline s]
DL=${1:-560}; . "$(dirname "$0")/common.sh"
t gen8k 250 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:8192:1536 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.9,freekv@0.9~serial~sp32,freekv@0.9~serial~sp48,freekv@0.9~sp32 FREEKV_BENCH_RUN_SECONDS=20 FREEKV_BENCH_JSON=$OUT/s7-gen8k-bs4-spare.json $D/cuda_freekv --bench
report $OUT/s7-gen8k-bs4-spare.json
t li4 200 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.84 FREEKV_BENCH_SCENARIOS=long-input:32768:256 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.8,freekv@0.8~serial~sp32 FREEKV_BENCH_RUN_SECONDS=15 FREEKV_BENCH_JSON=$OUT/s7-li32k-bs4-spare.json $D/cuda_freekv --bench
report $OUT/s7-li32k-bs4-spare.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
