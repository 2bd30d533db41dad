#!/bin/bash
# Issue-5 device call (session 12): the tests session 11 could not run (issue5-s11-run4.sh: the
# kernels' mapped-buffer test with registered pieces of whole granules, the recall pool tests,
# the model tests), then compute-sanitizer over a freekv decode with the final code (the first
# part of issue5-s12-run3.sh, no 16K generation). Carry .device/t and .device/sanitize.
# From the repository root: bash docs/device/issue5-s12-run4.sh
bash "$(dirname "$0")/issue5-s11-run4.sh" 160
mv "$OUT/logs.tgz" "$OUT/logs-tests.tgz" 2>/dev/null
bash "$(dirname "$0")/issue5-s12-run3.sh" 1 130
