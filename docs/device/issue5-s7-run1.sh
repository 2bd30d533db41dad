#!/bin/bash
# Issue-5 device call 1 (session 7): spare middle slots (`GpuKvOptions::spare_pages`). GPU
# tests of the selection with spare slots (lazy diff, page mask) and of the per-head page mask
# of the decode attention, the model test (the same selections as the CPU reference and the
# same attended tokens with spare slots, fewer corrective units), then, if they pass, the
# batch-4 long-generation ablation of the spare count (S = 0.92, τ = 0.9) beside oracle.
# Needs .device/t/{select,attention,cuda_freekv_test,cuda_freekv}. Run from the repository root:
#   bash docs/device/issue5-s7-run1.sh [deadline s]
DL=${1:-580}; . "$(dirname "$0")/common.sh"
#t select 120 $D/select --test-threads=1
grep -E "^test .*(FAILED|ok)$|panicked" "$L/select.log" | head -20
#t attention 120 $D/attention --test-threads=2
grep -E "^test .*(FAILED|ok)$|panicked" "$L/attention.log" | head -20
t freekv_test 200 $D/cuda_freekv_test --test-threads=1 --nocapture
grep -E "^test |panicked|differs|spare|freekv τ" "$L/freekv_test.log" | head -30
if grep -q "FAILED\|panicked" "$L"/select.log "$L"/attention.log "$L"/freekv_test.log; then
    echo "tests failed: no ablation"
else
t gen4 260 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:3072 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.9,freekv@0.9~sp8,freekv@0.9~sp16,freekv@0.9~sp32 FREEKV_BENCH_RUN_SECONDS=32 FREEKV_BENCH_JSON=$OUT/s7-gen4-spare.json $D/cuda_freekv --bench
grep "^|" $L/gen4.log | cut -d'|' -f4,5,6,8,9,10,14
python3 - "$OUT/s7-gen4-spare.json" <<'PY'
import json,sys
rows=[r for r in json.load(open(sys.argv[1]))["rows"] if r.get("ms_windows")]
o={r["policy"]:r for r in rows}
ref=o.get("oracle")
for p,r in o.items():
    w=r["ms_windows"]; n=min(len(w),len(ref["ms_windows"])) if ref else len(w)
    last=w[n-1] if n else float("nan"); ro=ref["ms_windows"][n-1] if ref and n else float("nan")
    cm=r.get("corrective_mib_per_step")
    print(f"{p:24s} windows {[round(x,2) for x in w]} last-common {last:.2f} ms = {last/ro:.3f}x oracle corrective MiB/step {cm}")
PY
fi
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
