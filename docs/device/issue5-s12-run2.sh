#!/bin/bash
# Issue-5 device call (session 12, calls 2-3): the issue's long generation (1K prompt + 16K
# generated, S = 0.92, τ = 0.9) for oracle and the default freekv at batch BS, RUNSEC seconds of
# steps each (a run stops at 16384 steps or at RUNSEC; the windows compare equal positions), with
# the final code (host-pool chunks registered ahead). Carry .device/t. From the repository root:
#   bash docs/device/issue5-s12-run2.sh BS RUNSEC [deadline s]
BS=$1; RS=$2; DL=${3:-590}; . "$(dirname "$0")/common.sh"
t "gen16k_bs$BS" $(( DL - 10 )) env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=$BS FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS=$RS FREEKV_BENCH_JSON=$OUT/s12-gen16k-bs$BS.json $D/cuda_freekv --bench
grep -E "^\|" $L/gen16k_bs$BS.log | tail -4
windows $OUT/s12-gen16k-bs$BS.json; means $OUT/s12-gen16k-bs$BS.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
