#!/bin/bash
# Issue-5 device call (session 9): is freekv's remaining gap to oracle the speculative branch
# delaying the products? cuBLAS sizes its decode products for one wave over every SM, so a
# product that starts while a selection or gather block holds an SM waits for it. A/B at a 16K
# context, batch 4: freekv with cuBLAS sized for 8, 16 or 32 SMs fewer than the device has
# (`~rsN`, GpuKvOptions::reserve_sms) beside the default, oracle and freekv-spec; the same in the
# reverse order; then the engine's own gemv kernels for 4-row steps (FREEKV_GEMV=4). From the repository root: bash docs/device/issue5-s9-run4.sh [deadline s]
DL=${1:-400}; . "$(dirname "$0")/common.sh"
M=llama-3.1-8b+persistent=0.92
ab() { # NAME POLICIES ENV...
    local n=$1 p=$2; shift 2
    t "$n" 110 env "$@" FREEKV_BENCH_MODEL=$M FREEKV_BENCH_SCENARIOS=long-generation:16384:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=$p FREEKV_BENCH_RUN_SECONDS=5 FREEKV_BENCH_JSON=$OUT/s9-sm-$n.json $D/cuda_freekv --bench
}
ab rs oracle,freekv,freekv~rs8,freekv~rs16,freekv~rs32,freekv-spec X=1
ab rs_rev freekv~rs32,freekv~rs16,freekv~rs8,freekv,oracle X=1
ab gemv4 oracle,freekv,freekv~rs16 FREEKV_GEMV=4
python3 - $OUT <<'PY'
import json,sys,glob,os
for f in sorted(glob.glob(sys.argv[1]+"/s9-sm-*.json"), key=os.path.getmtime):
    rows={r["policy"]:r for r in json.load(open(f))["rows"] if r.get("ms_windows")}
    o=rows.get("oracle")
    print(os.path.basename(f), "  ".join(f'{p} {r["ms_median"]:.3f} ms ({r["ms_median"]/o["ms_median"]:.3f}x)' for p,r in rows.items()) if o else "no oracle")
PY
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
