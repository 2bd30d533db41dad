#!/bin/bash
# Issue-5 device call (session 13, call 4): the issue's long generation at batch 16 (1K prompt +
# 16K generated, S = 0.92, τ 0.9) for three freekv variants, RUNSEC seconds of steps each (about
# 14K steps on an H200), with the window counters; oracle and the default freekv of the same
# GPU kind are in docs/bench/raw/s13-gen16k-bs16-h200.json (call 3: the corrective recall grows
# from 44 MiB/step at 5K to 169 MiB/step at 17K at a constant 52 % correction rate).
# freekv~specall: the speculative selection of the flagged heads too (before session 13);
# freekv~pf: the speculative selection recalls the top-(k + spare) by q_{t-1} into the 32 spare
# slots; freekv~sp96~pf: the same with 96 spare slots. Carry .device/t. From the repository root:
#   bash docs/device/issue5-s13-run3.sh RUNSEC [deadline s]
RS=$1; DL=${2:-500}; . "$(dirname "$0")/common.sh"
t gen16k_var $(( DL - 10 )) env FREEKV_BENCH_WINDOW_COUNTERS=1 FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=freekv~specall,freekv~pf,freekv~sp96~pf FREEKV_BENCH_RUN_SECONDS=$RS FREEKV_BENCH_JSON=$OUT/s13-gen16k-bs16-variants.json $D/cuda_freekv --bench
grep -E "^\|" $L/gen16k_var.log | tail -3
windows docs/bench/raw/s13-gen16k-bs16-h200.json $OUT/s13-gen16k-bs16-variants.json; means $OUT/s13-gen16k-bs16-variants.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
