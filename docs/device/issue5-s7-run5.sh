#!/bin/bash
# Issue-5 device call 5 (session 7): the GPU tests of the session's state (spare slots on by
# default, serial corrective path), then the one-run report with the new defaults.
# `xtask bench --prebuilt` from the bench bundle (`cargo xtask bench-bundle --only cuda_freekv`),
# GPU part, no criterion: the bandwidth probe and `cuda_freekv` on the calibrated synthetic
# llama-3.1-8b — long generation (1K prompt, 2048 generated; 16K does not fit one device call at
# three batch sizes) with S = 0.92 (τ 0.9), then long input (32K prompt, 256 generated) with
# S = 0.84 (τ 0.8), at batch 1, 4 and 16, policies full / oracle / arkvale / freekv, each capped
# at 14 s of steps (freekv-spec, an ablation, left out for time).
# Needs .device/bench and .device/t/{select,attention,cuda_freekv_test}. Run from the repository
# root: bash docs/device/issue5-s7-run5.sh
. "$(dirname "$0")/common.sh"  # environment, GPU name, onerun
for b in select attention cuda_freekv_test; do
    timeout 90 .device/t/$b --test-threads=1 > "$OUT/${b}_test.log" 2>&1
    echo "$b rc=$? $(grep -E '^test result' "$OUT/${b}_test.log")"
done
if grep -qE "FAILED|panicked" "$OUT"/*_test.log 2>/dev/null; then grep -E "FAILED|panicked" "$OUT"/*_test.log | head; echo "tests failed: no report"; exit 1; fi
onerun 256 ${MAXS:-400} 7.6
