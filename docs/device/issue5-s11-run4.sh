#!/bin/bash
# Issue-5 device call (session 11, call 4): the tests after registered pieces became whole
# granules (call 3's kernels test found that a device-side copy spanning two registrations is
# an invalid argument): the kernels' mapped-buffer test, the recall pool tests, the model tests.
# From the repository root: bash docs/device/issue5-s11-run4.sh [deadline s]
DL=${1:-80}; . "$(dirname "$0")/common.sh"
t kernels 30 $D/kernels_recall_test --test-threads=1
grep -E "panicked|FAILED|^test .*(ok|FAILED)$" $L/kernels.log | head -12
t recall 30 $D/cuda_recall_test --test-threads=1
grep -E "panicked|FAILED|^test .*(ok|FAILED)$" $L/recall.log | head -8
model_tests
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
