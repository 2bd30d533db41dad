#!/bin/bash
# Issue-5 device call 2 (session 10): the one-run report with the all-dense graph —
# `xtask bench --prebuilt --gpu-only --no-criterion`, long generation 1K + 2048 (S = 0.92,
# τ 0.9; its first 1024 steps are all dense) and long input 32K + 512 (S = 0.84, τ 0.8), batch
# 1, 4, 16, policies full / oracle / arkvale / freekv, 14 s of steps each (on an H200 oracle
# fits at batch 16). Needs .device/bench. From the repository root:
#   bash docs/device/issue5-s10-run2.sh
. "$(dirname "$0")/common.sh"  # environment, GPU name, onerun
onerun 512 ${MAXS:-440} 8.5
