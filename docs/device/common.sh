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

# prof NAME BINARY SCENARIO POLICY: ncu kernel by kernel (gpu__time_duration, clocks left alone)
# over 3 decode steps at batch PROF_BATCH (default 4) through the bench's
# FREEKV_BENCH_PROFILE_STEPS hook; prints calls, µs per step and µs per call by stream and kernel
# ($B: the bench model; PROF_LIMIT and PROF_SECONDS: the time limit and the bench run seconds,
# default 100 and 30).
prof() {
    t "prof_$1" "${PROF_LIMIT:-100}" env FREEKV_BENCH_MODEL=$B FREEKV_BENCH_SCENARIOS="$3" FREEKV_BENCH_BATCHES="${PROF_BATCH:-4}" FREEKV_BENCH_POLICIES="$4" FREEKV_BENCH_PROFILE_STEPS=3 FREEKV_BENCH_RUN_SECONDS="${PROF_SECONDS:-30}" \
        ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum -o "/tmp/prof_$1" -f "$2" --bench
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

# windows JSON...: a long generation's step time per 256-step window against oracle's at the same
# positions (1K prompt), each policy of the files, with its correction rate and recall volumes.
windows() {
python3 - "$@" <<'PY'
import json,sys,os
rows=[r for f in sys.argv[1:] if os.path.exists(f) for r in json.load(open(f))["rows"] if r.get("ms_windows")]
o=next(r for r in rows if r["policy"]=="oracle")["ms_windows"]
for r in rows:
    w=r["ms_windows"]; n=min(len(w),len(o))
    pts=[i for i in (3,7,15,23,31,39,47,55,63) if i<n]+[n-1]
    print(f'{r["policy"]:12s} steps {r["steps_measured"]:5d} corrected {100*(r.get("stats") or {}).get("head_correction_rate",0):.1f}% recall {r.get("recall_mib_per_step") or 0:.1f} MiB/step, corrective {r.get("corrective_mib_per_step") or 0:.1f}; window(context) ms x oracle: '+"  ".join(f'{1024+256*(i+1)}:{w[i]:.2f}/{w[i]/o[i]:.3f}' for i in pts))
    rw,cw,kw=(r.get(k) or [] for k in ("recall_mib_windows","corrective_mib_windows","correction_rate_windows"))
    if cw: print(f'{"":12s} per window (FREEKV_BENCH_WINDOW_COUNTERS) context:recall/corrective MiB per step/corrected: '+"  ".join(f'{1024+256*(i+1)}:{rw[i]:.1f}/{cw[i]:.1f}/{kw[i]:.2f}' for i in pts if i<len(cw)))
PY
}

# onerun LONG_INPUT_GEN MAX_SECONDS MAX_MINUTES: the one-run report, `xtask bench --prebuilt
# .device/bench --gpu-only --no-criterion`: long generation 1K + 2048 (S = 0.92) and long input
# 32K + LONG_INPUT_GEN (S = 0.84), batch 1, 4, 16, policies full / oracle / arkvale / freekv, 14 s
# of steps each; prints the table rows and any skip or error.
onerun() {
    export FREEKV_BENCH_SCENARIOS=long-generation:1024:2048:llama-3.1-8b+persistent=0.92,long-input:32768:$1:llama-3.1-8b+persistent=0.84
    export FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_BATCHES=1,4,16
    export FREEKV_BENCH_POLICIES=full,oracle,arkvale,freekv FREEKV_BENCH_RUN_SECONDS=${RUNSEC:-14}
    export FREEKV_BENCH_MAX_SECONDS=$2
    ./.device/bench/xtask bench --prebuilt .device/bench --gpu-only --no-criterion --out "$OUT/bench" --max-minutes "$3" > "$OUT/xtask.log" 2>&1
    echo "xtask rc=$?"
    grep -E "\| (full|oracle|arkvale|freekv) \|" "$OUT/xtask.log" | cut -d'|' -f3,4,5,6,8,9,10,11,12,13,14,15,16 | head -40
    grep -iE "skipped|stopped|error|failed" "$OUT/xtask.log" | head -10
}

# best_variant GLOB: of the freekv variants (not freekv-spec) in the bench JSON files matching
# GLOB, the one with the lowest mean ratio of median step time to oracle's in the same file
# ("freekv" when none); the ratios go to stderr.
best_variant() {
python3 - "$1" <<'PY'
import json,sys,glob,os,collections
r=collections.defaultdict(list)
for f in sorted(glob.glob(sys.argv[1]), key=os.path.getmtime):
    rows={x["policy"]:x for x in json.load(open(f))["rows"] if x.get("ms_windows")}
    o=rows.get("oracle")
    if not o: continue
    for p,x in rows.items(): r[p].append(x["ms_median"]/o["ms_median"])
c={p:sum(v)/len(v) for p,v in r.items() if p.startswith("freekv") and p!="freekv-spec"}
print("  ".join(f"{p} {v:.3f}x" for p,v in sorted(c.items())), file=sys.stderr)
print(min(c,key=c.get) if c else "freekv")
PY
}

# model_tests: the model's GPU tests (`$D/cuda_freekv_test`), with each test's line, any
# failure and any skip printed (a test that skips passes: until session 12 the default-model
# test skipped unseen in calls that did not carry the model; `default_model_tests` carries it).
model_tests() {
    t model 150 $D/cuda_freekv_test --test-threads=1 --show-output
    grep -E "panicked|FAILED|^test .*(ok|FAILED)$" $L/model.log | head -12
    grep -E "skipped|^default model, freekv" $L/model.log | cut -c1-400
}

# dense_ab NAME BINARY LIMIT RUN_SECONDS: the dense phase of a long generation (1K prompt + 512,
# budget 2K: every step dense) at batch 4, oracle and freekv, with BINARY (a cuda_freekv bench);
# rows to $OUT/s10-dense-NAME.json, the report printed.
dense_ab() {
    t "dense_$1" "$3" env FREEKV_BENCH_MODEL=llama-3.1-8b+persistent=0.92 FREEKV_BENCH_SCENARIOS=long-generation:1024:512 FREEKV_BENCH_BATCHES=4 FREEKV_BENCH_POLICIES=oracle,freekv FREEKV_BENCH_RUN_SECONDS="$4" FREEKV_BENCH_JSON=$OUT/s10-dense-$1.json "$2" --bench
    report $OUT/s10-dense-$1.json
}

# means JSON...: per row, the mean, median and p90 step time (a gap between mean and median is
# the rare slow steps: e.g. a host chunk pinned inside a step), the prefill seconds and the host
# KV GiB.
means() {
python3 - "$@" <<'PY'
import json,sys
for f in sys.argv[1:]:
    for r in json.load(open(f))["rows"]:
        if not r.get("ms_mean"): continue
        print(f"{f.split('/')[-1]:28s} bs{r['batch']} {r['policy']:12s} mean {r['ms_mean']:.3f} median {r['ms_median']:.3f} p90 {r['ms_p90']:.3f} (mean-median {r['ms_mean']-r['ms_median']:+.3f} ms) prefill {r.get('prefill_s') or 0:.2f} s host {r.get('host_kv_gib') or 0:.2f} GiB")
PY
}
