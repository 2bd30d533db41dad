#!/bin/bash
# Shared by the docs/device/issue5-run*.sh device calls (source it after setting DL, the deadline
# in seconds): environment, logs under $OUT/logs, `t NAME LIMIT CMD...` (runs CMD with the
# smaller of LIMIT and the time left, logs to $L/NAME.log, prints rc, seconds and the test
# summary) and `calibrate` (the coherence calibration of `+persistent=S`).
export FREEKV_REQUIRE_GPU=1 CUDA_HOME=/usr/local/cuda
D=.device/t; L=$OUT/logs; mkdir -p "$L"; T0=$(date +%s)
left() { echo $(( DL - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t() { local n=$1 lim=$2; shift 2; local l; l=$(left); [ "$l" -lt 20 ] && { echo "$n skipped (time)"; return; }; [ "$lim" -gt "$l" ] && lim=$l; local s; s=$(date +%s); timeout "$lim" "$@" > "$L/$n.log" 2>&1; local rc=$?; echo "$n rc=$rc $(( $(date +%s)-s ))s $(grep -E '^test result' "$L/$n.log" | tail -1)"; }
# calibrate JSON "S1 S2 ..." POLICY RATE FALLBACK: runs `long-input:4096:40` at batch 1 with
# freekv@0.8 and freekv@0.9 on llama-3.1-8b+persistent=S for each S, writes the rows to
# $OUT/JSON and sets $S to the model whose correction rate under POLICY is closest to RATE
# (FALLBACK when the run gave nothing).
calibrate() {
    local json=$1 shares=$2 policy=$3 rate=$4 fallback=$5 m="" s
    for s in $shares; do m="$m,llama-3.1-8b+persistent=$s"; done
    t cal 90 env FREEKV_BENCH_MODEL="${m#,}" FREEKV_BENCH_SCENARIOS=long-input:4096:40 FREEKV_BENCH_BATCHES=1 FREEKV_BENCH_POLICIES=freekv@0.8,freekv@0.9 FREEKV_BENCH_RUN_SECONDS=1 FREEKV_BENCH_JSON="$OUT/$json" $D/cuda_freekv --bench
    grep "^|" "$L/cal.log" | cut -d'|' -f2,5,6,11,14
    S=$(python3 -c '
import json,sys
r=[x for x in json.load(open(sys.argv[1]))["rows"] if x.get("policy")==sys.argv[2] and x.get("stats")]
print(min(r,key=lambda x:abs(x["stats"]["head_correction_rate"]-float(sys.argv[3])))["model"])' "$OUT/$json" "$policy" "$rate" 2>/dev/null || echo "$fallback")
    echo "calibrated ($policy, target $rate): $S"
}
