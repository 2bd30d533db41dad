#!/bin/bash
# Issue-5 device call (session 12, call 1): the tests session 11 could not run (the kernels'
# mapped-buffer test with registered pieces of whole granules, the recall pool tests, the model
# tests; as issue5-s11-run4.sh), then the one-run report (`xtask bench --prebuilt .device/bench`,
# as issue5-s10-run2.sh, RUNSEC seconds of steps per configuration, default 12) in the time left.
# Carry .device/t and .device/bench. From the repository root:
#   bash docs/device/issue5-s12-run1.sh [deadline s]
DL=${1:-590}; S0=$(date +%s)
bash "$(dirname "$0")/issue5-s11-run4.sh" 160
mv "$OUT/logs.tgz" "$OUT/logs-tests.tgz" 2>/dev/null
. "$(dirname "$0")/common.sh"; T0=$S0
MAXS=$(( $(left) - 25 ))
[ "$MAXS" -gt 120 ] && RUNSEC=${RUNSEC:-12} onerun 512 "$MAXS" "$(( MAXS / 60 ))"
