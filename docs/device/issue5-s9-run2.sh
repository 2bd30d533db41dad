#!/bin/bash
# Issue-5 device call 2 (session 9), the runs the issue asks for that session 8 could not make:
# (1) long input, 32K prompt + 512 generated, batch 16: full / oracle / freekv (oracle keeps
#     the whole history on the device: 88 GiB, so this needs an H200);
# (2) long generation, 1K prompt + 16K generated, batch 1: oracle and freekv, every step.
# S = 0.84 (τ 0.8) for long input and 0.92 (τ 0.9) for long generation, as the one-run report.
# From the repository root: bash docs/device/issue5-s9-run2.sh [deadline s]
DL=${1:-570}; . "$(dirname "$0")/common.sh"
t li16 150 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.84 FREEKV_BENCH_SCENARIOS=long-input:32768:512 FREEKV_BENCH_BATCHES=16 FREEKV_BENCH_POLICIES=full,oracle,freekv FREEKV_BENCH_RUN_SECONDS=20 FREEKV_BENCH_JSON=$OUT/s9-li32k-bs16.json $D/cuda_freekv --bench
report $OUT/s9-li32k-bs16.json
t gen16k_bs1 400 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:16384 FREEKV_BENCH_BATCHES=1 FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS=190 FREEKV_BENCH_JSON=$OUT/s9-gen16k-bs1.json $D/cuda_freekv --bench
report $OUT/s9-gen16k-bs1.json
python3 - "$OUT/s9-gen16k-bs1.json" <<'PY'
import json,sys
rows={r["policy"]:r for r in json.load(open(sys.argv[1]))["rows"] if r.get("ms_windows")}
o,f=rows.get("oracle"),rows.get("freekv")
if o and f:
    n=min(len(o["ms_windows"]),len(f["ms_windows"])); w=o.get("window_steps",256)
    for i in list(range(0,n,8))+[n-1]:
        print(f"context {1024+(i+1)*w:6d}: oracle {o['ms_windows'][i]:.2f} freekv {f['ms_windows'][i]:.2f} ms = {f['ms_windows'][i]/o['ms_windows'][i]:.3f}x")
PY
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
