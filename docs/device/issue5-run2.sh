#!/bin/bash
# Issue-5 device call 2 (session 5): the fixed persistent test, racecheck of a freekv decode with the
# native GEMM (FreeKV kernels at the default 640-token prompt; every kernel at a short prompt), the
# fine coherence calibration (S = 0.81 … 0.89) and the 32K sweep at batch 1 and 4 with it.
# Needs .device/t (cuda_freekv_test, cuda_freekv bench) and .device/sanitize (cargo xtask sanitize --bundle).
# Run from the repository root on the device: bash docs/device/issue5-run2.sh [deadline seconds]
DL=${1:-560}; . "$(dirname "$0")/common.sh"
t persistent 60 $D/cuda_freekv_test --test-threads 1 --nocapture persistent
grep -E "corrected|panicked" $L/persistent.log
t race_fk 130 .device/sanitize/xtask sanitize --prebuilt .device/sanitize --out $L/san_fk --tools racecheck --timeout-s 110 -n 8 --kv freekv --no-kernel-benches
grep "sanitize:" $L/race_fk.log | tail -3
calibrate cal2.json "0.81 0.82 0.83 0.84 0.85 0.86 0.87 0.88 0.89" freekv@0.8 0.12 llama-3.1-8b+persistent=0.85
t sweep 230 env FREEKV_BENCH_MODEL=llama-3.1-8b,$S FREEKV_BENCH_SCENARIOS=long-input:32768:64 FREEKV_BENCH_BATCHES=1,4 FREEKV_BENCH_POLICIES=oracle,freekv,freekv@0.9,freekv-spec,arkvale FREEKV_BENCH_RUN_SECONDS=1.2 FREEKV_BENCH_JSON=$OUT/sweep32k-b.json $D/cuda_freekv --bench
grep "^|" $L/sweep.log | cut -d'|' -f2,4,5,6,8,9,10,11,12,13,14
t race_all 200 .device/sanitize/xtask sanitize --prebuilt .device/sanitize --out $L/san_all --tools racecheck --racecheck-kernels all --timeout-s 180 --prompt-tokens 160 -n 4 --budget 96 --kv freekv --no-kernel-benches
grep "sanitize:" $L/race_all.log | tail -3
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
