//! End to end on the CPU: the host history (`PagedKvCache`), the per-head slot tables
//! (`LayerResidency`), the resident NHD pools (`SlotPool`) and the recall executors, driven like
//! the decoder drives them (prefill, then per step and layer: wait for the layer's recall, append
//! the token, check, select, launch the next recall). After every wait, every resident (slot, head)
//! must hold exactly the host data of the logical page the table says it holds.

use freekv_layout::{Budget, LayerResidency, PageGeometry, PagedKvCache, SlotPool};
use freekv_recall::{
    CpuRecallConfig, CpuRecallExecutor, CpuTarget, RecallExecutor, RecallPlan, SharedHost,
    SharedSlots, SyncMode, SyncRecallExecutor,
};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use std::sync::{Arc, RwLock};

fn check_resident(
    cache: &PagedKvCache,
    layer: usize,
    res: &LayerResidency,
    slots: &SlotPool<f32>,
) -> usize {
    let g = cache.geometry();
    let d = g.head_dim;
    let mut rows = 0;
    for (h, table) in res.heads().iter().enumerate() {
        for sp in table.resident() {
            let keys = cache.keys(layer, sp.page, h).unwrap();
            let vals = cache.values(layer, sp.page, h).unwrap();
            for row in 0..table.page_len(sp.page) {
                assert_eq!(
                    slots.key_row(sp.slot, row, h).unwrap(),
                    &keys[row * d..(row + 1) * d],
                    "layer {layer} head {h} page {} slot {} row {row}: keys differ",
                    sp.page,
                    sp.slot
                );
                assert_eq!(
                    slots.value_row(sp.slot, row, h).unwrap(),
                    &vals[row * d..(row + 1) * d]
                );
                rows += 1;
            }
        }
    }
    rows
}

fn simulate<E>(exec: &E, seed: u64, speculative: bool) -> (u64, usize)
where
    E: RecallExecutor<Target = CpuTarget<f32>>,
{
    let mut rng = StdRng::seed_from_u64(seed);
    let geom = PageGeometry::new(4, 3, 8).unwrap();
    let layers = 2;
    let budget = Budget::new(1, 3, 2, 4).unwrap();
    let cache = Arc::new(RwLock::new(PagedKvCache::new(geom, layers, None).unwrap()));
    let host: SharedHost<f32> = cache.clone();
    let mut res: Vec<LayerResidency> = (0..layers)
        .map(|_| LayerResidency::new(budget, geom.kv_heads).unwrap())
        .collect();
    let pools: Vec<SharedSlots<f32>> = (0..layers)
        .map(|_| {
            let mut p = SlotPool::new(geom, budget.total_pages()).unwrap();
            p.fill(f32::NAN);
            Arc::new(RwLock::new(p))
        })
        .collect();
    let targets: Vec<CpuTarget<f32>> = pools
        .iter()
        .map(|p| CpuTarget::single(host.clone(), p.clone()))
        .collect();
    let n = geom.kv_heads * geom.head_dim;
    let token = |rng: &mut StdRng| -> (Vec<f32>, Vec<f32>) {
        (
            (0..n).map(|_| rng.random_range(-1.0..1.0)).collect(),
            (0..n).map(|_| rng.random_range(-1.0..1.0)).collect(),
        )
    };

    // Prefill: the whole prompt goes to the host; the resident pages are loaded by one recall
    // per layer (sinks, the dense middle, the window, the partial page).
    let prompt = 45;
    let mut prefill_units = 0;
    for l in 0..layers {
        for _ in 0..prompt {
            let (k, v) = token(&mut rng);
            cache.write().unwrap().append(l, &k, &v).unwrap();
        }
        res[l].append_tokens(prompt).unwrap();
        let mut plan = RecallPlan::new(l);
        {
            let c = cache.read().unwrap();
            for (h, t) in res[l].heads().iter().enumerate() {
                let resident: Vec<_> = t.resident().collect();
                plan.push_recalls(0, h, &resident, c.page_table(l).unwrap())
                    .unwrap();
            }
        }
        prefill_units += exec.recall(plan, &targets[l]).unwrap().units;
        check_resident(
            &cache.read().unwrap(),
            l,
            &res[l],
            &pools[l].read().unwrap(),
        );
    }

    let mut pending: Vec<Option<E::Ticket>> = (0..layers).map(|_| None).collect();
    let mut recalled = prefill_units;
    let mut checked_rows = 0usize;
    for step in 0..300 {
        for l in 0..layers {
            if let Some(t) = pending[l].take() {
                recalled += exec.wait(t).unwrap().units;
            }
            // Append the new token to the host history and to the current resident slot.
            let (k, v) = token(&mut rng);
            cache.write().unwrap().append(l, &k, &v).unwrap();
            res[l].append_tokens(1).unwrap();
            let pos = res[l].len_tokens() - 1;
            let (slot, row) = res[l].heads()[0].slot_for_token(pos).unwrap();
            assert_eq!(Some(slot), res[l].current_slot());
            pools[l]
                .write()
                .unwrap()
                .write_token(slot, row, &k, &v)
                .unwrap();
            res[l].check_consistency().unwrap();
            // "Attention" reads the resident set: it must be exactly the host data.
            checked_rows += check_resident(
                &cache.read().unwrap(),
                l,
                &res[l],
                &pools[l].read().unwrap(),
            );

            if !res[l].is_sparse() {
                continue;
            }
            // Select per KV head (random here), update the tables, launch the recall.
            let mut plan = RecallPlan::new(l);
            {
                let c = cache.read().unwrap();
                for h in 0..geom.kv_heads {
                    let t = res[l].head_mut(h).unwrap();
                    let cands: Vec<usize> = t.candidate_pages().collect();
                    let mut sel: Vec<usize> = cands.choose_multiple(&mut rng, 3).copied().collect();
                    sel.shuffle(&mut rng);
                    let diff = t.select(&sel).unwrap();
                    plan.push_diff(0, h, &diff, c.page_table(l).unwrap())
                        .unwrap();
                }
            }
            let ticket = exec.submit(plan, &targets[l]).unwrap();
            if speculative && step % 7 != 0 {
                pending[l] = Some(ticket); // overlaps the next layers, waited next step
            } else {
                recalled += exec.wait(ticket).unwrap().units;
                checked_rows += check_resident(
                    &cache.read().unwrap(),
                    l,
                    &res[l],
                    &pools[l].read().unwrap(),
                );
            }
        }
    }
    for t in pending.into_iter().flatten() {
        recalled += exec.wait(t).unwrap().units;
    }
    (recalled, checked_rows)
}

#[test]
fn double_buffered_executor_keeps_resident_data_exact() {
    let exec = CpuRecallExecutor::<f32>::new(CpuRecallConfig { stage_units: 2 }).unwrap();
    let (recalled, rows) = simulate(&exec, 11, true);
    assert!(recalled > 500, "only {recalled} units recalled");
    assert!(rows > 10_000);
    assert_eq!(exec.totals().units, recalled);
}

#[test]
fn sync_executors_keep_resident_data_exact() {
    for mode in [SyncMode::Staged, SyncMode::Direct] {
        let exec = SyncRecallExecutor::<f32>::new(mode, 4).unwrap();
        let (recalled, _) = simulate(&exec, 12, false);
        assert!(recalled > 500);
    }
}
