#!/bin/bash
# The issue-5 device call planned in session 4 (not yet run: no device machine could be started).
# Build here first, then carry .device/t and .device/sanitize:
#   cargo test --release --no-run -p freekv-kernels --test gemm_native --test gemm --test probe --test init
#   cargo test --release --no-run -p freekv-model --lib --test cuda_decoder --test cuda_freekv
#   cargo bench --no-run -p freekv-kernels --bench gemm; cargo bench --no-run -p freekv-model --bench cuda_freekv
#   copy + strip them into .device/t as gemm_native, gemm_test, probe, init, model_lib, cuda_decoder,
#   cuda_freekv_test, gemm_bench, cuda_freekv; cargo xtask sanitize --bundle
# Run from the repository root on the device: bash docs/device/issue5-run.sh [deadline seconds]
# One device call: GEMM/init/model tests, coherence calibration (4K), 32K sweep at batch 4 with
# the calibrated share, racecheck of a freekv decode (native GEMM, every kernel), gemm bench.
DL=${1:-575}; . "$(dirname "$0")/common.sh"
t gemm_native 100 $D/gemm_native --test-threads 1 --nocapture
t gemm_test 40 $D/gemm_test --test-threads 1
t probe 40 $D/probe --test-threads 1
t init 40 $D/init --test-threads 1
t model_lib 60 $D/model_lib --test-threads 1 cuda
t cuda_decoder 90 $D/cuda_decoder --test-threads 1 --nocapture
t persistent 60 $D/cuda_freekv_test --test-threads 1 --nocapture persistent
grep -E "FAILED|panicked" $L/*.log | head -8
grep -E "rel|seed" $L/gemm_native.log | head -6; grep -iE "native" $L/cuda_decoder.log | head -4; grep -E "corrected" $L/persistent.log
t racecheck 160 .device/sanitize/xtask sanitize --prebuilt .device/sanitize --out $L/san --tools racecheck --racecheck-kernels all --timeout-s 140 -n 8 --kv freekv --no-kernel-benches
tail -12 $L/racecheck.log
calibrate cal.json "0.8 0.9 0.95 0.98" freekv@0.8 0.12 llama-3.1-8b+persistent=0.95
t sweep 170 env FREEKV_BENCH_MODEL=llama-3.1-8b,$S FREEKV_BENCH_SCENARIOS=long-input:32768:64 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv,freekv-spec,arkvale FREEKV_BENCH_RUN_SECONDS=1.5 FREEKV_BENCH_JSON=$OUT/sweep32k.json $D/cuda_freekv --bench
grep "^|" $L/sweep.log | cut -d'|' -f2,5,6,8,9,10,11,14
t gemm_bench 60 $D/gemm_bench --bench --warm-up-time 0.2 --measurement-time 0.5
grep -B2 -A20 -i "tflop" $L/gemm_bench.log | tail -22
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
