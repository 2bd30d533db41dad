#!/bin/bash
# Issue-5 device call 3 (session 5): calibrate the persistent share S for τ = 0.9 (the paper's
# long-generation threshold; published: 58.9 % of KV heads below it), then long generation
# (1K prompt, 4096 steps) at batch 4 and 1 with that model, then the warm-prefill split at 32K.
# Needs .device/t/cuda_freekv (cargo bench --no-run -p freekv-model --bench cuda_freekv).
# Run from the repository root on the device: bash docs/device/issue5-run3.sh [deadline seconds]
DL=${1:-560}; . "$(dirname "$0")/common.sh"
calibrate cal3.json "0.9 0.905 0.91 0.915 0.92 0.925 0.93 0.935" freekv@0.9 0.589 llama-3.1-8b+persistent=0.91
t gen4 300 env FREEKV_BENCH_MODEL=$S FREEKV_BENCH_SCENARIOS=long-generation:1024:4096 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=full,oracle,freekv@0.9,freekv-spec,arkvale FREEKV_BENCH_RUN_SECONDS=110 FREEKV_BENCH_JSON=$OUT/gen4.json $D/cuda_freekv --bench
grep "^|" $L/gen4.log | cut -d'|' -f2,4,5,6,7,8,9,10,12,13,14
grep -E "ms/step median" $L/gen4.log | sed -E 's/.*bs ([0-9]+) ([^:]+): .* quarters (\[[^]]*\]).*GPU ([0-9.]+) GiB.*/bs\1 \2 \3 GPU \4/'
t gen1 150 env FREEKV_BENCH_MODEL=$S FREEKV_BENCH_SCENARIOS=long-generation:1024:4096 FREEKV_BENCH_BATCHES=1 FREEKV_BENCH_POLICIES=oracle,freekv@0.9,arkvale FREEKV_BENCH_RUN_SECONDS=60 FREEKV_BENCH_JSON=$OUT/gen1.json $D/cuda_freekv --bench
grep -E "ms/step median" $L/gen1.log | sed -E 's/.*bs ([0-9]+) ([^:]+): ([0-9.]+) ms.* quarters (\[[^]]*\]).*/bs\1 \2 \3 \4/'
t prefill 60 env FREEKV_BENCH_SCENARIOS=prefill:32768:8 FREEKV_BENCH_BATCHES=1 FREEKV_BENCH_POLICIES=full,freekv FREEKV_BENCH_RUN_SECONDS=1 FREEKV_BENCH_JSON=$OUT/prefill32k.json $D/cuda_freekv --bench
grep -E "ms/step median" $L/prefill.log | sed -E 's/.*bs ([0-9]+) ([^:]+): ([0-9.]+) ms.*GPU ([0-9.]+) GiB.*prefill ([0-9.]+) tok\/s \(again ([0-9.]+)\).*/bs\1 \2 step \3 GPU \4 prefill \5 warm \6 tok\/s/'
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
