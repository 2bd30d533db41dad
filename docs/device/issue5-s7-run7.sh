#!/bin/bash
# Issue-5 device call 7 (session 7): the model's GPU tests after the page-mask clear of a
# restarted sequence was ordered after pending speculative selections, with the new test that a
# restarted sequence decodes bit for bit as in a fresh batch (spare slots, graphs and eager).
# Needs .device/t/cuda_freekv_test. Run from the repository root:
#   bash docs/device/issue5-s7-run7.sh [deadline s]
DL=${1:-120}; . "$(dirname "$0")/common.sh"
t freekv_test 60 $D/cuda_freekv_test --test-threads=1
grep -E "^test |panicked|differs" "$L/freekv_test.log" | head -12
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
