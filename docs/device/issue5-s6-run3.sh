#!/bin/bash
# Issue-5 device call 3 (session 6): the one-run report. `xtask bench --prebuilt` from the
# bench bundle (`cargo xtask bench-bundle --only cuda_freekv`), GPU part, no criterion: the
# bandwidth probe and `cuda_freekv` on the calibrated synthetic llama-3.1-8b — long generation
# (1K prompt, 2048 generated: 16K does not fit one 10-minute device call at three batch sizes
# and five policies) with S = 0.92 (τ 0.9), then long input (32K prompt, 256 generated) with
# S = 0.84 (τ 0.8), at batch 1, 4 and 16, policies full / oracle / arkvale / freekv /
# freekv-spec, each capped at 22 s of steps.
# Needs .device/bench (and .device/t/{select,cuda_freekv_test}, optional). Run from the repository root: bash docs/device/issue5-s6-run3.sh
export CUDA_HOME=/usr/local/cuda FREEKV_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# The GPU FreeKV tests first (seconds): the overlapped path and the finer flagged split against
# the serial path, bit for bit, and the selections against the CPU selector.
[ -x .device/t/select ] && { timeout 60 .device/t/select --test-threads=1 > "$OUT/select_test.log" 2>&1; echo "select_test rc=$? $(grep -E '^test result' "$OUT/select_test.log")"; }
[ -x .device/t/cuda_freekv_test ] && { timeout 60 .device/t/cuda_freekv_test --test-threads=1 > "$OUT/freekv_test.log" 2>&1; echo "freekv_test rc=$? $(grep -E '^test result' "$OUT/freekv_test.log")"; }
if grep -qE "FAILED|panicked" "$OUT"/*_test.log 2>/dev/null; then grep -E "FAILED|panicked" "$OUT"/*_test.log | head; echo "tests failed: no report"; exit 1; fi
export FREEKV_BENCH_SCENARIOS=long-generation:1024:2048:llama-3.1-8b+persistent=0.92,long-input:32768:256:llama-3.1-8b+persistent=0.84
export FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_BATCHES=1,4,16
export FREEKV_BENCH_POLICIES=full,oracle,arkvale,freekv,freekv-spec FREEKV_BENCH_RUN_SECONDS=22
export FREEKV_BENCH_MAX_SECONDS=${MAXS:-470}
./.device/bench/xtask bench --prebuilt .device/bench --gpu-only --no-criterion --out "$OUT/bench" --max-minutes 8.9 > "$OUT/xtask.log" 2>&1
echo "xtask rc=$?"
grep -E "\| (full|oracle|arkvale|freekv|freekv-spec) \|" "$OUT/xtask.log" | cut -d'|' -f3,4,5,6,8,9,10,11,12,13,14,15,16 | head -40
grep -iE "skipped|stopped|error|failed" "$OUT/xtask.log" | head -10
