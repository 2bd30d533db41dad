#!/bin/bash
# Issue-5 device call 4 (session 6): the selection kernel with its score keys in registers and
# its softmax tail computed by the whole block (bit-exact tests first), its kernel time under
# ncu beside the correction and scoring kernels (compare with call 2: select_rows 16.4 µs,
# correction 9.1 µs, score 7.5 µs), then the batch-4 long-generation step of oracle and freekv.
# Result: tests passed, but select_rows 16.5 µs, correction 9.4 µs, freekv@0.9 9.07 ms against
# oracle 8.01 — no gain, so that selection-kernel change was reverted (commit "Revert
# "selection kernel: …""); the script stays as the record of the experiment.
# Needs .device/t/{select,cuda_freekv_test,cuda_freekv}. Run from the repository root:
#   bash docs/device/issue5-s6-run4.sh [deadline s]
DL=${1:-170}; . "$(dirname "$0")/common.sh"
t select 60 $D/select --test-threads=1
t freekv_test 40 $D/cuda_freekv_test --test-threads=1
if grep -qE "FAILED|panicked" "$L"/select.log "$L"/freekv_test.log; then grep -hE "FAILED|panicked" "$L"/*.log | head; tar czf $OUT/logs.tgz -C $OUT logs; exit 1; fi
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
t ncu 60 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:3072:12 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=freekv@0.9 FREEKV_BENCH_RUN_SECONDS=100 $NCU --csv --print-units base --metrics gpu__time_duration.sum --kernel-name regex:"freekv_(select_rows|correction|score)" --launch-skip 800 --launch-count 160 $D/cuda_freekv --bench
python3 - "$L/ncu.log" <<'PY'
import csv,sys,collections
rows=[r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
h=rows[0]; rows=rows[1:]
ki=h.index("Kernel Name"); vi=h.index("Metric Value")
tot=collections.defaultdict(list)
for r in rows: tot[r[ki].split("(")[0]].append(float(r[vi].replace(",",""))/1e3)
for k,v in tot.items(): print(f"{k:24s} n={len(v):4d} mean {sum(v)/len(v):6.2f} us")
PY
t gen4 50 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:3072:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.9 FREEKV_BENCH_RUN_SECONDS=7 FREEKV_BENCH_JSON=$OUT/s6-gen4-select-regs.json $D/cuda_freekv --bench
grep "^|" $L/gen4.log | cut -d'|' -f4,5,6,8,11,15
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
