#!/bin/bash
# Issue-5 device call (prepared in session 12 for the next session), call 1 of 2: leaves the
# first part of the default model (SmolLM2-135M-Instruct Q4_1, 98 MB: over one call's 64 MiB
# carry) in /tmp of the warm machine for call 2 (issue5-s13-run2.sh), then, in the time left:
# on a GPU with more than 100 GiB (H200), the long input at batch 16 (32K + 512, S = 0.84,
# τ 0.8) for full / oracle / freekv, which does not fit an H100's 80 GB; otherwise the issue's
# long generation at batch 16 again (session 12: 1.16x oracle at the end, within 1.10x up to
# 13.8K) for freekv, freekv~specall and freekv~overlap, with the recall volumes and the correction rate of
# every window (FREEKV_BENCH_WINDOW_COUNTERS=1), to see what grows with the context. Carry .device/m1 and
# .device/b1 (the stripped bench alone: .device/t with the 56 MiB part would pass the 64 MiB).
# From the repository root: bash docs/device/issue5-s13-run1.sh [deadline s]
DL=${1:-560}; . "$(dirname "$0")/common.sh"
mkdir -p $D && cp .device/b1/cuda_freekv $D/
cp .device/m1/part /tmp/m.part1 && echo "model part 1: $(stat -c %s /tmp/m.part1) bytes in /tmp"
MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${MIB:-0}" -gt 100000 ]; then
    t li16 $(( $(left) - 10 )) env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.84 FREEKV_BENCH_SCENARIOS=long-input:32768:512 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=full,oracle,freekv FREEKV_BENCH_RUN_SECONDS=40 FREEKV_BENCH_JSON=$OUT/s13-long-input-bs16.json $D/cuda_freekv --bench
    grep -E "^\|" $L/li16.log | tail -4
else
    # freekv (session 13: the speculative selection skips the heads flagged at the step),
    # freekv~specall (the speculative selection of every head, as before) and freekv~overlap
    # (the corrective path beside the unflagged heads' attention), a third of the time each
    # (about 13K steps); oracle's windows are session 12's (H100).
    RS=$(( ($(left) - 30) / 3 ))
    t gen16k_bs16 $(( $(left) - 5 )) env FREEKV_BENCH_WINDOW_COUNTERS=1 FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=freekv,freekv~specall,freekv~overlap FREEKV_BENCH_RUN_SECONDS=$RS FREEKV_BENCH_JSON=$OUT/s13-gen16k-bs16.json $D/cuda_freekv --bench
    grep -E "^\|" $L/gen16k_bs16.log | tail -3
    windows docs/bench/raw/s12-gen16k-bs16.json $OUT/s13-gen16k-bs16.json; means $OUT/s13-gen16k-bs16.json
fi
[ -d "$L" ] && tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
