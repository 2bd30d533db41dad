#!/bin/bash
# Issue-5 device call 1 (session 6): the head-filtered decode attention and the overlapped
# corrective path against the serial one (GPU tests), then the batch-4 long-generation ablation
# of the corrective path (S = 0.92, τ = 0.9): serial with 8 gather blocks (the session-5 path),
# serial with 32, overlapped with 8, overlapped with 32 (the new default), beside oracle and
# freekv-spec, in one run.
# Needs .device/t/{attention,cuda_freekv_test,cuda_freekv}. Run from the repository root:
#   bash docs/device/issue5-s6-run1.sh [deadline s]
DL=${1:-540}; . "$(dirname "$0")/common.sh"
t attention 90 $D/attention --test-threads=2
grep -E "^test .*(FAILED|ok)$|panicked" "$L/attention.log" | head -20
t freekv_test 200 $D/cuda_freekv_test --test-threads=1 --nocapture
grep -E "^test |panicked|differs|freekv τ" "$L/freekv_test.log" | head -20
t gen4 300 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:3072 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.9~serial~cb8,freekv@0.9~serial,freekv@0.9~cb8,freekv@0.9,freekv-spec FREEKV_BENCH_RUN_SECONDS=40 FREEKV_BENCH_JSON=$OUT/s6-gen4-ablation.json $D/cuda_freekv --bench
grep "^|" $L/gen4.log | cut -d'|' -f4,5,6,8,9,10,14
python3 - "$OUT/s6-gen4-ablation.json" <<'PY'
import json,sys
rows=[r for r in json.load(open(sys.argv[1]))["rows"] if r.get("ms_windows")]
o={r["policy"]:r for r in rows}
ref=o.get("oracle")
for p,r in o.items():
    w=r["ms_windows"]; n=min(len(w),len(ref["ms_windows"])) if ref else len(w)
    last=w[n-1] if n else float("nan"); ro=ref["ms_windows"][n-1] if ref and n else float("nan")
    print(f"{p:24s} windows {[round(x,2) for x in w]} last-common {last:.2f} ms = {last/ro:.3f}x oracle")
PY
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
