//! Recall executors compared on realistic shapes: the double-buffered streaming executor
//! (copy of stage i+1 overlapping the transpose of stage i, two threads; stages of 8 and of 32
//! units), the synchronous
//! staged executor (copy then transpose, one buffer) and the synchronous direct transpose.
//!
//! f32 (the CPU decoder's KV type), P = 32, the default model's Hkv = 3, d = 64 and
//! Llama-3.1-8B's Hkv = 8, d = 128; 32..256 (page, head) units per plan, random host pages drawn
//! from a host pool larger than the last-level cache (cold reads, as in a long context).
//! Throughput is the recalled bytes per plan.
//!
//! Run: `cargo bench -p freekv-recall --bench recall`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use freekv_layout::{HostPagePool, PageGeometry, SlotPool};
use freekv_recall::{
    CpuRecallConfig, CpuRecallExecutor, CpuTarget, RecallEntry, RecallExecutor, RecallPlan,
    SharedHost, SyncMode, SyncRecallExecutor,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Host pool size per shape: 128 MiB, well past a 32 MiB L3.
const HOST_BYTES: usize = 128 << 20;
/// The plans of one benchmark together read at least this much, so that cycling through them
/// does not turn into cache hits: every unit count sees cold host pages.
const PLANS_BYTES: usize = 256 << 20;
const STAGE_UNITS: usize = 8;

fn setup(geom: PageGeometry, units: usize, rng: &mut StdRng) -> (CpuTarget<f32>, Vec<RecallPlan>) {
    let page_bytes = geom.page_elems() * 4;
    let n_pages = HOST_BYTES / page_bytes;
    let mut pool = HostPagePool::<f32>::new(geom, None);
    for _ in 0..n_pages {
        let id = pool.alloc().unwrap();
        pool.page_mut(id)
            .unwrap()
            .iter_mut()
            .for_each(|x| *x = rng.random());
    }
    let slots = units.div_ceil(geom.kv_heads);
    let host: SharedHost<f32> = Arc::new(RwLock::new(pool));
    let dest = Arc::new(RwLock::new(SlotPool::<f32>::new(geom, slots).unwrap()));
    let target = CpuTarget::single(host, dest);
    let n_plans = PLANS_BYTES.div_ceil(units * geom.head_unit_elems() * 4);
    let plans = (0..n_plans)
        .map(|_| {
            let mut dests: Vec<(u32, u32)> = (0..slots as u32)
                .flat_map(|s| (0..geom.kv_heads as u32).map(move |h| (s, h)))
                .collect();
            dests.shuffle(rng);
            let mut plan = RecallPlan::new(0);
            for &(slot, kv_head) in dests.iter().take(units) {
                plan.push(RecallEntry {
                    seq: 0,
                    kv_head,
                    host_page: rng.random_range(0..n_pages as u32),
                    slot,
                });
            }
            plan
        })
        .collect();
    (target, plans)
}

fn bench_recall(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(0xBE7C);
    let double = CpuRecallExecutor::<f32>::new(CpuRecallConfig {
        stage_units: STAGE_UNITS,
    })
    .unwrap();
    let double_big = CpuRecallExecutor::<f32>::new(CpuRecallConfig { stage_units: 32 }).unwrap();
    let staged = SyncRecallExecutor::<f32>::new(SyncMode::Staged, STAGE_UNITS).unwrap();
    let direct = SyncRecallExecutor::<f32>::new(SyncMode::Direct, STAGE_UNITS).unwrap();
    for (p, h, d) in [(32, 3, 64), (32, 8, 128)] {
        let geom = PageGeometry::new(p, h, d).unwrap();
        let mut grp = c.benchmark_group(format!("recall_f32_P{p}_H{h}_d{d}"));
        for units in [32usize, 64, 128, 256] {
            let (target, plans) = setup(geom, units, &mut rng);
            grp.throughput(Throughput::Bytes(plans[0].bytes::<f32>(geom)));
            let mut i = 0;
            let mut next = || {
                i = (i + 1) % plans.len();
                plans[i].clone()
            };
            grp.bench_function(BenchmarkId::new("double_buffered", units), |b| {
                b.iter(|| double.recall(next(), &target).unwrap())
            });
            grp.bench_function(BenchmarkId::new("double_buffered_stage32", units), |b| {
                b.iter(|| double_big.recall(next(), &target).unwrap())
            });
            grp.bench_function(BenchmarkId::new("sync_staged", units), |b| {
                b.iter(|| staged.recall(next(), &target).unwrap())
            });
            grp.bench_function(BenchmarkId::new("sync_direct", units), |b| {
                b.iter(|| direct.recall(next(), &target).unwrap())
            });
        }
        grp.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = bench_recall
}
criterion_main!(benches);
