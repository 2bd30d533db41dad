#!/bin/bash
# Issue-5 device call (prepared in session 13 for the next session): first compute-sanitizer over
# a freekv decode with session 13's code (issue5-s13-run4.sh, about 15 s), then the issue's long
# generation at batch 16 (1K prompt + 16K generated, S = 0.92, τ 0.9) for three freekv variants
# aimed at the corrective recall that grows with the context (session 13 on the H200: 44 MiB/step
# at 5K, 169 MiB/step at 17.4K, 1.15x oracle at the end): freekv~sp96 and freekv~sp224 (a larger
# victim cache per KV head: 96 or 224 spare slots instead of 32, 4 or 12 GiB more at batch 16;
# without prefetch, which session 13 found ruinous) and freekv~overlap (the corrective path beside
# the unflagged heads' attention), RUNSEC seconds of steps each, with the window counters, against
# oracle and the default freekv of docs/bench/raw/s13-gen16k-bs16-h200.json (H200; on an H100,
# compare with raw/s12-gen16k-bs16.json instead). Carry .device/sanitize and .device/t.
# From the repository root: bash docs/device/issue5-s14-run1.sh [RUNSEC] [deadline s]
RS=${1:-150}; DL=${2:-560}; . "$(dirname "$0")/common.sh"
bash "$(dirname "$0")/issue5-s13-run4.sh"
RS=$(( RS < ($(left) - 30) / 3 ? RS : ($(left) - 30) / 3 ))
t gen16k_s14 $(( $(left) - 5 )) env FREEKV_BENCH_WINDOW_COUNTERS=1 FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=freekv~sp96,freekv~sp224,freekv~overlap FREEKV_BENCH_RUN_SECONDS=$RS FREEKV_BENCH_JSON=$OUT/s14-gen16k-bs16-variants.json $D/cuda_freekv --bench
grep -E "^\|" $L/gen16k_s14.log | tail -3
windows docs/bench/raw/s13-gen16k-bs16-h200.json $OUT/s14-gen16k-bs16-variants.json; means $OUT/s14-gen16k-bs16-variants.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
