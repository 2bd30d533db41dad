#!/bin/bash
# Issue-5 device call (session 9), everything left in one call (device starts were scarce):
# (0) the model tests (with reserved SMs: the same step results, and an error for a reserve that
#     leaves no SM);
# (1) is freekv's remaining gap the speculative branch delaying the products? cuBLAS sizes its
#     decode products for one wave over every SM, so a product that starts while a selection or
#     gather block holds an SM waits for it. A/B at a 16K context, batch 4, 512 steps each:
#     freekv with products sized for 8, 16 or 32 SMs fewer (`~rsN`), the default, oracle and
#     freekv-spec, then the same in reverse order;
# (2) the issue's long generation (1K prompt, 16K generated, batch 4): oracle and freekv with
#     the best `~rsN` of (1), every step as far as the time allows;
# (3) on an H200 only (oracle keeps 88 GiB of history on the device): long input 32K + 512 at
#     batch 16, full / oracle / freekv.
# From the repository root: bash docs/device/issue5-s9-run5.sh [deadline s]
DL=${1:-585}; . "$(dirname "$0")/common.sh"
M=llama-3.1-8b+persistent=0.92
t model 60 $D/cuda_freekv_test --test-threads=1
grep -E "panicked|FAILED" $L/model.log | head -5
ab() { # NAME POLICIES
    t "$1" 110 env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:16384:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=$2 FREEKV_BENCH_RUN_SECONDS=5 FREEKV_BENCH_JSON=$OUT/s9-rs-$1.json $D/cuda_freekv --bench
}
ab fwd oracle,freekv,freekv~rs8,freekv~rs16,freekv~rs32,freekv-spec
[ "$(left)" -gt 250 ] && ab rev freekv~rs32,freekv~rs16,freekv~rs8,freekv,oracle
BEST=$(best_variant "$OUT/s9-rs-*.json")
echo "best freekv variant at 16K: $BEST"
MEM=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
LI=0; [ "${MEM:-0}" -gt 100000 ] && LI=75
GEN=$(( $(left) - LI - 40 ))
[ "$GEN" -gt 60 ] && t gen16k $GEN env FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,$BEST FREEKV_BENCH_RUN_SECONDS=$(( GEN / 2 - 8 )) FREEKV_BENCH_JSON=$OUT/s9-gen16k-bs4.json $D/cuda_freekv --bench
[ -f $OUT/s9-gen16k-bs4.json ] && windows $OUT/s9-gen16k-bs4.json
if [ "$LI" -gt 0 ] && [ "$(left)" -gt 40 ]; then
    t li16 $(( $(left) - 10 )) env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.84 FREEKV_BENCH_SCENARIOS=long-input:32768:512 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=oracle,$BEST,full FREEKV_BENCH_RUN_SECONDS=8 FREEKV_BENCH_JSON=$OUT/s9-li32k-bs16.json $D/cuda_freekv --bench
    report $OUT/s9-li32k-bs16.json
fi
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
