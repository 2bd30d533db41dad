#!/bin/bash
# Issue-5 device call (session 10, call 1):
# (0) the model tests (new: `all_dense_steps_have_their_own_graph`, the all-dense graph
#     against eager steps bit for bit);
# (1) the all-dense graph: the dense phase (1K prompt + 512, budget 2K: every step dense) at
#     batch 4, oracle and freekv with the session-9 binary (.device/old) and the new one, in
#     both orders — freekv was 1.05x oracle there with the speculative branch's empty launches;
# (2) session 9's run5 A/B at a 16K context, batch 4: freekv with products sized for 8/16/32 SMs
#     fewer (`~rsN`), the default, oracle and freekv-spec;
# (3) the issue's long generation (1K prompt + 16K, batch 4): oracle and the best freekv
#     variant of (2), as many steps as time allows.
# From the repository root: bash docs/device/issue5-s10-run1.sh [deadline s]
DL=${1:-585}; . "$(dirname "$0")/common.sh"
M=llama-3.1-8b+persistent=0.92
model_tests
dense() { dense_ab "$1" "$2" 60 4; }
dense old1 .device/old/cuda_freekv; dense new1 $D/cuda_freekv
dense new2 $D/cuda_freekv; dense old2 .device/old/cuda_freekv
ab() { # NAME POLICIES
    t "$1" 110 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:16384:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=$2 FREEKV_BENCH_RUN_SECONDS=5 FREEKV_BENCH_JSON=$OUT/s10-rs-$1.json $D/cuda_freekv --bench
    report $OUT/s10-rs-$1.json
}
ab fwd oracle,freekv,freekv~rs8,freekv~rs16,freekv~rs32,freekv-spec
[ "$(left)" -gt 250 ] && ab rev freekv~rs32,freekv~rs16,freekv~rs8,freekv,oracle
BEST=$(best_variant "$OUT/s10-rs-*.json")
echo "best freekv variant at 16K: $BEST"
GEN=$(( $(left) - 25 ))
[ "$GEN" -gt 60 ] && t gen16k $GEN env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,$BEST FREEKV_BENCH_RUN_SECONDS=$(( GEN / 2 - 8 )) FREEKV_BENCH_JSON=$OUT/s10-gen16k-bs4.json $D/cuda_freekv --bench
[ -f $OUT/s10-gen16k-bs4.json ] && windows $OUT/s10-gen16k-bs4.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
