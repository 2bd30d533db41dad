#!/bin/bash
# Issue-5 device call 1 (session 8): where the freekv step spends its time beyond oracle's.
# (1) ncu, kernel by kernel (gpu__time_duration, clocks left alone), over 3 decode steps of
#     oracle and freekv at batch 4, in the dense phase (context 1K < budget 2K) and at 8K,
#     through the bench's FREEKV_BENCH_PROFILE_STEPS hook (cuProfilerStart/Stop);
# (2) the spare-slot count at long generation contexts: batch 4, 8K and 16K, x = 32/64/96;
# (3) copies the first part of the default model (too big for one carry) to /tmp for call 2.
# Needs .device/t/cuda_freekv (the stripped bench) and .device/m1/part. From the repository root:
#   bash docs/device/issue5-s8-run1.sh [deadline s]
DL=${1:-520}; . "$(dirname "$0")/common.sh"
cp .device/m1/part /tmp/m.part1 && echo "model part 1: $(stat -c %s /tmp/m.part1) bytes in /tmp"
prof() { # NAME SCENARIO POLICY
    t "prof_$1" 150 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS="$2" FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES="$3" FREEKV_BENCH_PROFILE_STEPS=3 FREEKV_BENCH_RUN_SECONDS=60 \
        ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum -o "/tmp/prof_$1" -f $D/cuda_freekv --bench
    ncu -i "/tmp/prof_$1.ncu-rep" --csv --page raw --metrics gpu__time_duration.sum > "$L/prof_$1.csv" 2>&1
    python3 - "$L/prof_$1.csv" "$1" <<'PY'
import csv,sys,collections
rows=list(csv.reader(open(sys.argv[1])))
h=rows[0]; ki=h.index("Kernel Name"); si=h.index("Stream"); ti=h.index("gpu__time_duration.sum")
unit=rows[1][ti]; scale={"nsecond":1e-3,"usecond":1,"msecond":1e3}.get(unit,1)
agg=collections.defaultdict(lambda:[0,0.0])
for r in rows[2:]:
    if len(r)<=ti: continue
    try: v=float(r[ti].replace(",",""))*scale
    except ValueError: continue
    k=(r[si],r[ki].split("(")[0][:48]); agg[k][0]+=1; agg[k][1]+=v
tot=sum(v[1] for v in agg.values())/3
print(f"== {sys.argv[2]}: {tot:.0f} us of kernels per step (3 steps), by stream and kernel: calls/step, us/step, us/call")
for (s,k),(n,v) in sorted(agg.items(),key=lambda x:-x[1][1]):
    print(f"  s{s:>3} {k:48s} {n/3:6.1f} {v/3:8.1f} {v/max(n,1):7.2f}")
PY
}
prof dense_oracle long-generation:1024:16 oracle
prof dense_freekv long-generation:1024:16 freekv
prof 8k_oracle long-generation:8192:16 oracle
prof 8k_freekv long-generation:8192:16 freekv
t spare8k 120 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:8192:1280 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv,freekv~sp64,freekv~sp96 FREEKV_BENCH_RUN_SECONDS=12 FREEKV_BENCH_JSON=$OUT/s8-gen8k-spare.json $D/cuda_freekv --bench
report $OUT/s8-gen8k-spare.json
t spare16k 100 env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:16384:768 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv,freekv~sp96 FREEKV_BENCH_RUN_SECONDS=8 FREEKV_BENCH_JSON=$OUT/s8-gen16k-spare.json $D/cuda_freekv --bench
report $OUT/s8-gen16k-spare.json
tar czf $OUT/logs.tgz -C $OUT logs && rm -rf $L
