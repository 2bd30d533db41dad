#!/bin/bash
# Issue-5 device call 2 (session 6): where a corrected batch-4 step goes. An `ncu` kernel-time
# trace of two long-generation decode steps of freekv@0.9 (S = 0.92, context 3072, every layer
# sparse; graph nodes profiled one by one, so each kernel's time is its time alone), summed per
# kernel; then the corrective MiB per step of the same configuration beside oracle and
# freekv-spec (the bench's new corrective counter).
# Needs .device/t/cuda_freekv. Run from the repository root: bash docs/device/issue5-s6-run2.sh [deadline s]
DL=${1:-400}; . "$(dirname "$0")/common.sh"
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
t ncu 200 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:3072:60 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=freekv@0.9 FREEKV_BENCH_RUN_SECONDS=100 $NCU --csv --print-units base --metrics gpu__time_duration.sum --launch-skip 20000 --launch-count 1400 $D/cuda_freekv --bench
python3 - "$L/ncu.log" <<'PY'
import csv,sys,collections
rows=[r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
h=rows[0]; rows=rows[1:]
ki=h.index("Kernel Name"); vi=h.index("Metric Value"); ii=h.index("ID")
k=[(int(r[ii]),r[ki].split("(")[0],float(r[vi].replace(",",""))/1e3) for r in rows if len(r)>vi]
tot=collections.defaultdict(float); n=collections.Counter()
for _,name,us in k: tot[name]+=us; n[name]+=1
all_us=sum(tot.values())
print(f"{len(k)} kernels, {all_us:.0f} us in all ({all_us/2:.0f} us per step of 2 if the window is 2 steps)")
for name,us in sorted(tot.items(),key=lambda x:-x[1]):
    print(f"{name:40s} n={n[name]:5d} total {us:9.1f} us  mean {us/n[name]:7.2f} us")
print("one layer in order:")
start=next((i for i,(_,nm,_) in enumerate(k) if nm.startswith("freekv_correction")),0)
for _,nm,us in k[start-6:start+14]: print(f"  {nm:40s} {us:7.2f} us")
PY
t gen4 170 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:3072:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv@0.9,freekv@0.9~serial~cb8,freekv-spec FREEKV_BENCH_RUN_SECONDS=12 FREEKV_BENCH_JSON=$OUT/s6-gen4-corrective.json $D/cuda_freekv --bench
grep "^|" $L/gen4.log | cut -d'|' -f4,5,6,8,9,10,11,15
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
