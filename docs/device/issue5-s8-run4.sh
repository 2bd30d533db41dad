#!/bin/bash
# Issue-5 device call 4 (session 8): the issue's long generation at its own length, batch 4:
# a 1K prompt, 16K generated tokens (S = 0.92, τ = 0.9), oracle and freekv (defaults: victim
# cache of k spare pages, serial correction), plus freekv with 96 spare pages capped at 100 s
# (compared at equal positions); each policy's step time per 256-step window. Also copies the
# first part of the default model to /tmp for call 5. Needs .device/b1/cuda_freekv (the stripped
# bench) and .device/m1/part. From the repository root: bash docs/device/issue5-s8-run4.sh
DL=${1:-560}; . "$(dirname "$0")/common.sh"
D=.device/b1
cp .device/m1/part /tmp/m.part1 && echo "model part 1: $(stat -c %s /tmp/m.part1) bytes in /tmp"
M=llama-3.1-8b+persistent=0.92
t gen16k 345 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS=160 FREEKV_BENCH_JSON=$OUT/s8-gen16k-bs4.json $D/cuda_freekv --bench
t gen16k_sp96 130 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=freekv~sp96 FREEKV_BENCH_RUN_SECONDS=100 FREEKV_BENCH_JSON=$OUT/s8-gen16k-bs4-sp96.json $D/cuda_freekv --bench
windows $OUT/s8-gen16k-bs4.json $OUT/s8-gen16k-bs4-sp96.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
