#!/bin/bash
# Issue-5 device call 6 (session 7): the GPU tests of the final state (after the review
# refactors), then compute-sanitizer on the new kernel code as far as the time left allows:
# racecheck over the spare-slot selection test (shared-memory hazards of the lazy, score-ordered
# slot diff and the page mask) and memcheck over the tiny-model test (spare slots on by default).
# Needs .device/t/{select,attention,cuda_freekv_test}. Run from the repository root:
#   bash docs/device/issue5-s7-run6.sh [deadline s]
DL=${1:-200}; . "$(dirname "$0")/common.sh"
t select 60 $D/select --test-threads=1
t attention 40 $D/attention --test-threads=2
t freekv_test 40 $D/cuda_freekv_test --test-threads=1
grep -hE "FAILED|panicked" "$L"/*.log | head
CS=/usr/local/cuda/bin/compute-sanitizer
t racecheck 70 $CS --tool racecheck --racecheck-report hazard $D/select --test-threads=1 select_with_spare_slots
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|test result" "$L/racecheck.log" | head -5
t memcheck 60 $CS --tool memcheck $D/cuda_freekv_test --test-threads=1 tiny_model
grep -E "ERROR SUMMARY|test result" "$L/memcheck.log" | head -5
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
