#!/bin/bash
# Issue-5 device call 2 (session 7): spare slots with the serial corrective path (one attention
# launch, the corrective gather now small) against the overlapped one, at batch 4
# (long-generation:1024:3072) and batch 16 (long-generation:1024:1536), S = 0.92, τ = 0.9.
# Needs .device/t/cuda_freekv. Run from the repository root:
#   bash docs/device/issue5-s7-run2.sh [deadline s]
DL=${1:-580}; . "$(dirname "$0")/common.sh"
t gen4 200 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:3072 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.9~sp32,freekv@0.9~serial~sp32,freekv@0.9~serial~sp48,freekv@0.9~serial~sp16 FREEKV_BENCH_RUN_SECONDS=32 FREEKV_BENCH_JSON=$OUT/s7-gen4-serial-spare.json $D/cuda_freekv --bench
report $OUT/s7-gen4-serial-spare.json
t gen16 240 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:1536 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=oracle,freekv@0.9,freekv@0.9~sp32,freekv@0.9~serial~sp32 FREEKV_BENCH_RUN_SECONDS=30 FREEKV_BENCH_JSON=$OUT/s7-gen16-spare.json $D/cuda_freekv --bench
report $OUT/s7-gen16-spare.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
