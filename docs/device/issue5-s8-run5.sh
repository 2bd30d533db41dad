#!/bin/bash
# Issue-5 device call 5 (session 8), right after call 4 on the same warm machine: the default
# model joined from call 4's part and the one carried now (sha256 checked), the GPU tests on
# the final kernels (attention, select, the model tests with the default-model test: 210 freekv
# decode steps against the CPU reference policy), then the one-run report: `xtask bench
# --prebuilt --gpu-only --no-criterion` with long generation (1K prompt, 2048 generated;
# 16K is call 4's, at batch 4) at S = 0.92 (τ 0.9) and long input (32K prompt, 512 generated) at
# S = 0.84 (τ 0.8), batch 1, 4, 16, policies full / oracle / arkvale / freekv, each capped at
# 14 s of steps. Needs .device/m2/part, .device/ref/text_1k.json, .device/t/{select,attention,
# cuda_freekv_test}, .device/bench. From the repository root:
#   bash docs/device/issue5-s8-run5.sh SHA256
. "$(dirname "$0")/common.sh"  # environment, GPU name, onerun
cat /tmp/m.part1 .device/m2/part > /tmp/model.gguf 2>/dev/null
[ "$(sha256sum /tmp/model.gguf | cut -d' ' -f1)" = "$1" ] && echo "default model joined, checksum ok" || { echo "model checksum differs: the default-model test will skip"; rm -f /tmp/model.gguf; }
export FREEKV_MODEL=/tmp/model.gguf FREEKV_REFERENCE_DIR=$PWD/.device/ref
for b in select attention cuda_freekv_test; do
    timeout 100 .device/t/$b --test-threads=1 --nocapture > "$OUT/${b}_test.log" 2>&1
    echo "$b rc=$? $(grep -E '^test result' "$OUT/${b}_test.log")"
done
grep -hE "default model, freekv|skipped" "$OUT"/cuda_freekv_test_test.log | cut -c1-400
if grep -qE "FAILED|panicked" "$OUT"/*_test.log; then grep -hE "FAILED|panicked" "$OUT"/*_test.log | head; echo "tests failed: no report"; exit 1; fi
onerun 512 ${MAXS:-430} 8
