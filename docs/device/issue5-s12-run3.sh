#!/bin/bash
# Issue-5 device call (session 12): compute-sanitizer over a freekv decode with the final code
# (all-dense graph, host-pool chunks registered ahead, the correction flags read back through an
# event): `xtask sanitize --prebuilt .device/sanitize` memcheck (leak check), racecheck (FreeKV
# kernels instrumented, native GEMM) and synccheck on `freekv generate --device cuda --kv freekv`
# (synthetic smollm2-135m, 640-token prompt, budget 256, 16 tokens), no kernel benches; then,
# in the time left, the 16K generation at batch BS (issue5-s12-run2.sh). Carry .device/sanitize
# and .device/t. From the repository root: bash docs/device/issue5-s12-run3.sh BS [deadline s]
BS=${1:-1}; DL=${2:-590}; S0=$(date +%s)
./.device/sanitize/xtask sanitize --prebuilt .device/sanitize --out "$OUT/sanitize" --kv freekv --model synthetic:smollm2-135m --no-kernel-benches --timeout-s 120 > "$OUT/sanitize.log" 2>&1
echo "sanitize rc=$? $(( $(date +%s) - S0 ))s"; tail -12 "$OUT/sanitize.log"
LEFT=$(( DL - ($(date +%s) - S0) ))
# oracle and freekv each get just under half the time left, less prefill and start-up
[ "$LEFT" -gt 120 ] && bash "$(dirname "$0")/issue5-s12-run2.sh" "$BS" $(( LEFT / 2 - 25 )) "$LEFT"
