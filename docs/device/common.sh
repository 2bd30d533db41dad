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
# Policy strings of the session-6 scripts and of session 7's calls 1-4 were written when
# `freekv` defaulted to the overlapped corrective path without spare slots, and (calls 1-3)
# when `~spN` prefetched into the spare slots: to rerun them as they ran, add `~overlap~sp0`
# (session 6) or `~overlap`, with `~pf` beside each `~spN` of calls 1-3 (session 7).
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
# report JSON: per batch, each policy's first and last-common 256-step window against oracle's,
# with the recall volumes (the session-7 ablations); grouped by scenario and context when a file
# holds several.
report() {
python3 - "$1" <<'PY'
import json,sys
rows=[r for r in json.load(open(sys.argv[1]))["rows"] if r.get("ms_windows")]
for key in sorted({(r.get("scenario",""),r.get("context",0),r["batch"]) for r in rows}):
    sc,ctx,bs=key
    o={r["policy"]:r for r in rows if (r.get("scenario",""),r.get("context",0),r["batch"])==key}
    ref=o.get("oracle")
    if len({(r.get("scenario",""),r.get("context",0)) for r in rows})>1: print(f"{sc} {ctx}:")
    for p,r in o.items():
        w=r["ms_windows"]; n=min(len(w),len(ref["ms_windows"])) if ref else len(w)
        last=w[n-1] if n else float("nan"); ro=ref["ms_windows"][n-1] if ref and n else float("nan")
        print(f"bs{bs} {p:26s} first {w[0]:.2f} last-common {last:.2f} ms = {last/ro:.3f}x oracle, median {r['ms_median']:.2f}, corrective {r.get('corrective_mib_per_step') or 0:.1f} MiB/step, recall {r.get('recall_mib_per_step') or 0:.1f}, units/head/step {r.get('recall_units_per_head_step')}, gpu {r.get('gpu_used_gib'):.2f} GiB")
PY
}
