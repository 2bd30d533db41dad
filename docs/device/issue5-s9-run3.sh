#!/bin/bash
# Issue-5 device call 3 (session 9): the issue's long generation at its own length, batch 4
# (1K prompt, 16K generated, S = 0.92, τ = 0.9) on this session's kernels: oracle and freekv
# (default 32 spare pages) every step, then freekv with 64 spare pages capped at the time left
# (compared at equal positions). From the repository root: bash docs/device/issue5-s9-run3.sh
DL=${1:-575}; . "$(dirname "$0")/common.sh"
M=llama-3.1-8b+persistent=0.92
t gen16k 345 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS=165 FREEKV_BENCH_JSON=$OUT/s9-gen16k-bs4.json $D/cuda_freekv --bench
t gen16k_sp64 200 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=freekv~sp64 FREEKV_BENCH_RUN_SECONDS=$(( $(left) - 30 )) FREEKV_BENCH_JSON=$OUT/s9-gen16k-bs4-sp64.json $D/cuda_freekv --bench
windows $OUT/s9-gen16k-bs4.json $OUT/s9-gen16k-bs4-sp64.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
