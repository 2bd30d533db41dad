#!/bin/bash
# Issue-5 device call (session 9): is freekv's remaining gap to oracle the speculative branch
# delaying the products? cuBLAS sizes its decode products for one wave over every SM, so a
# product that starts while a selection or gather block holds an SM waits for it. A/B at a 16K
# context, batch 4 (each line its own process): the default, cuBLAS asked to size for 120 and
# 126 SMs (FREEKV_CUBLAS_SM_TARGET), and the engine's own gemv kernels for 4-row steps
# (FREEKV_GEMV=4). From the repository root: bash docs/device/issue5-s9-run4.sh [deadline s]
DL=${1:-400}; . "$(dirname "$0")/common.sh"
M=llama-3.1-8b+persistent=0.92
ab() { # NAME POLICIES ENV...
    local n=$1 p=$2; shift 2
    t "$n" 60 env "$@" FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:16384:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=$p FREEKV_BENCH_RUN_SECONDS=5 FREEKV_BENCH_JSON=$OUT/s9-sm-$n.json $D/cuda_freekv --bench
}
ab base oracle,freekv,freekv-spec X=1
ab sm120 oracle,freekv FREEKV_CUBLAS_SM_TARGET=120
ab sm126 oracle,freekv FREEKV_CUBLAS_SM_TARGET=126
ab gemv4 oracle,freekv FREEKV_GEMV=4
ab base2 oracle,freekv X=1
python3 - $OUT <<'PY'
import json,sys,glob,os
for f in sorted(glob.glob(sys.argv[1]+"/s9-sm-*.json"), key=os.path.getmtime):
    rows={r["policy"]:r for r in json.load(open(f))["rows"] if r.get("ms_windows")}
    o=rows.get("oracle")
    print(os.path.basename(f), "  ".join(f'{p} {r["ms_median"]:.3f} ms ({r["ms_median"]/o["ms_median"]:.3f}x)' for p,r in rows.items()) if o else "no oracle")
PY
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
