#!/bin/bash
# Issue-5 device call (session 11, call 2; one call because the device time left is short):
# call 1 (`issue5-s11-run1.sh`: the recall and model tests, the grow-ahead A/B in the dense
# phase and at a 16K context), then the one-run report (`xtask bench --prebuilt .device/bench`,
# as `issue5-s10-run2.sh` but 10 s of steps per configuration: RUNSEC) in the time left.
# Carry .device/t, .device/prev and .device/bench. From the repository root:
#   bash docs/device/issue5-s11-run2.sh [deadline s]
DL=${1:-590}; S0=$(date +%s)
bash "$(dirname "$0")/issue5-s11-run1.sh" 200
mv "$OUT/logs.tgz" "$OUT/logs-run1.tgz" 2>/dev/null
. "$(dirname "$0")/common.sh"; T0=$S0
MAXS=$(( $(left) - 25 ))
[ "$MAXS" -gt 120 ] && RUNSEC=${RUNSEC:-10} onerun 512 "$MAXS" "$(( MAXS / 60 ))"
