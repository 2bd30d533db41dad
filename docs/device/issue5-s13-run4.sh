#!/bin/bash
# Issue-5 device call (prepared in session 13, whose device time ran out first): compute-sanitizer
# over a freekv decode with session 13's code (the speculative selection skips the heads flagged
# at the step): `xtask sanitize --prebuilt .device/sanitize` memcheck (leak check), racecheck
# (FreeKV kernels instrumented, native GEMM) and synccheck on `freekv generate --device cuda
# --kv freekv` (synthetic smollm2-135m, 640-token prompt, budget 256, 16 tokens), no kernel
# benches. Carry .device/sanitize. From the repository root: bash docs/device/issue5-s13-run4.sh
S0=$(date +%s)
./.device/sanitize/xtask sanitize --prebuilt .device/sanitize --out "$OUT/sanitize" --kv freekv --model synthetic:smollm2-135m --no-kernel-benches --timeout-s 60 > "$OUT/sanitize.log" 2>&1
echo "sanitize rc=$? $(( $(date +%s) - S0 ))s"; tail -12 "$OUT/sanitize.log"
