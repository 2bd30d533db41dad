#!/bin/bash
# Issue-5 device call (session 11, call 3). Call 2 (`issue5-s11-run1.sh`) showed that pinning
# the pool's next chunk on a helper thread did not remove freekv's rare slow steps (mean 0.20-0.26
# ms above median, oracle 0.02): page-locking holds driver-global locks, so the decode steps'
# launches wait while another thread pins. Now the chunk ahead is the process's own memory
# (huge pages asked for), faulted in without the driver, then registered in 16 MiB pieces.
# (0) the kernels' mapped-buffer test (new: registered buffers, device reads across pieces) and
#     the recall pool tests; (1) pin_stall.py: the launch stall each way of pinning causes;
# (2) the dense phase and a 16K context, the previous binary (.device/prev, no grow-ahead)
#     against the new one, means against medians.
# From the repository root: bash docs/device/issue5-s11-run3.sh [deadline s]
DL=${1:-200}; . "$(dirname "$0")/common.sh"
t kernels 40 $D/kernels_recall_test mapped_host_buffer --test-threads=1
grep -E "panicked|FAILED|^test .*(ok|FAILED)$" $L/kernels.log | head -5
t recall 40 $D/cuda_recall_test pool --test-threads=1
grep -E "panicked|FAILED|^test .*(ok|FAILED)$" $L/recall.log | head -5
model_tests
t pin 40 python3 docs/device/pin_stall.py; cat $L/pin.log | tail -8
dense() { dense_ab "$1" "$2" 45 4; }
dense new1 $D/cuda_freekv; dense prev1 .device/prev/cuda_freekv; dense new2 $D/cuda_freekv
ctx() { # NAME BINARY
    t "ctx_$1" 60 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:16384:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS=5 FREEKV_BENCH_JSON=$OUT/s11-ctx-$1.json "$2" --bench
}
ctx new $D/cuda_freekv; ctx prev .device/prev/cuda_freekv
means $OUT/s10-dense-*.json $OUT/s11-ctx-*.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
