//! Every executor delivers exactly the planned units in NHD order (against the reference
//! transpose), rejects invalid plans before writing anything, handles empty plans, reports
//! execution-time failures, and shuts down without hanging or leaking buffers.

use freekv_layout::{
    HostPagePool, LayoutError, PageGeometry, PageId, SlotPool, hnd_unit_to_nhd_slice,
};
use freekv_recall::{
    CpuRecallConfig, CpuRecallExecutor, CpuTarget, HostPages, RecallEntry, RecallError,
    RecallExecutor, RecallPlan, SharedHost, SharedSlots, SyncMode, SyncRecallExecutor,
};
use half::bf16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

trait Elem: Copy + Default + PartialEq + std::fmt::Debug + Send + Sync + 'static {
    fn random(rng: &mut StdRng) -> Self;
    fn poison() -> Self;
    fn bits(self) -> u32;
}

impl Elem for f32 {
    fn random(rng: &mut StdRng) -> Self {
        rng.random_range(-8.0..8.0)
    }
    fn poison() -> Self {
        f32::NAN.copysign(-1.0) // compared bitwise below
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

impl Elem for bf16 {
    fn random(rng: &mut StdRng) -> Self {
        bf16::from_f32(rng.random_range(-8.0..8.0))
    }
    fn poison() -> Self {
        bf16::from_bits(0xFFC1)
    }
    fn bits(self) -> u32 {
        self.to_bits() as u32
    }
}

fn bits_eq<T: Elem>(a: &[T], b: &[T]) -> bool {
    // NaN poison must compare equal to itself: compare the bit patterns.
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.bits() == y.bits())
}

struct World<T> {
    geom: PageGeometry,
    pools: Vec<Arc<RwLock<HostPagePool<T>>>>,
    pages: Vec<Vec<PageId>>,
    slots: Vec<SharedSlots<T>>,
    target: CpuTarget<T>,
}

fn world<T: Elem>(rng: &mut StdRng, geom: PageGeometry, seqs: usize, n_slots: usize) -> World<T> {
    let mut pools = Vec::new();
    let mut pages = Vec::new();
    let mut slots = Vec::new();
    for _ in 0..seqs {
        let mut pool = HostPagePool::<T>::new(geom, None);
        let n = rng.random_range(3..40);
        let mut ids = Vec::new();
        for _ in 0..n {
            let id = pool.alloc().unwrap();
            pool.page_mut(id)
                .unwrap()
                .iter_mut()
                .for_each(|x| *x = T::random(rng));
            ids.push(id);
        }
        // Release a few so that ids with holes exist.
        for _ in 0..2 {
            let i = rng.random_range(0..ids.len());
            pool.release(ids.swap_remove(i)).unwrap();
        }
        pools.push(Arc::new(RwLock::new(pool)));
        pages.push(ids);
        let mut sp = SlotPool::<T>::new(geom, n_slots).unwrap();
        sp.fill(T::poison());
        slots.push(Arc::new(RwLock::new(sp)));
    }
    let hosts: Vec<SharedHost<T>> = pools
        .iter()
        .map(|p| Arc::clone(p) as SharedHost<T>)
        .collect();
    let target = CpuTarget {
        hosts,
        slots: slots.clone(),
    };
    World {
        geom,
        pools,
        pages,
        slots,
        target,
    }
}

fn random_plan<T>(rng: &mut StdRng, w: &World<T>, max_units: usize) -> RecallPlan {
    let mut dests = Vec::new();
    for seq in 0..w.slots.len() {
        let n_slots = w.slots[seq].read().unwrap().slots();
        for head in 0..w.geom.kv_heads {
            for slot in 0..n_slots {
                dests.push((seq, head, slot));
            }
        }
    }
    dests.shuffle(rng);
    let n = rng.random_range(1..=max_units.min(dests.len()));
    let mut plan = RecallPlan::new(rng.random_range(0..32));
    for &(seq, head, slot) in &dests[..n] {
        let ids = &w.pages[seq];
        plan.push(RecallEntry {
            seq: seq as u32,
            kv_head: head as u32,
            host_page: ids[rng.random_range(0..ids.len())],
            slot: slot as u32,
        });
    }
    plan
}

/// The expected resident pools after `plan`, built with the reference transpose.
fn expected<T: Elem>(w: &World<T>, plan: &RecallPlan) -> Vec<SlotPool<T>> {
    let mut out: Vec<SlotPool<T>> = w.slots.iter().map(|s| s.read().unwrap().clone()).collect();
    for e in plan.entries() {
        let pool = w.pools[e.seq as usize].read().unwrap();
        let unit = pool.head_unit(e.host_page, e.kv_head as usize).unwrap();
        let page = out[e.seq as usize].page_mut(e.slot as usize).unwrap();
        hnd_unit_to_nhd_slice(w.geom, e.kv_head as usize, unit, page).unwrap();
    }
    out
}

/// Object-safe driver so every executor runs through the same test loop.
trait Exec<T> {
    fn name(&self) -> String;
    fn run(
        &self,
        plan: RecallPlan,
        target: &CpuTarget<T>,
    ) -> Result<freekv_recall::RecallStats, RecallError>;
}

impl<T: Elem> Exec<T> for CpuRecallExecutor<T> {
    fn name(&self) -> String {
        RecallExecutor::name(self).into()
    }
    fn run(
        &self,
        plan: RecallPlan,
        target: &CpuTarget<T>,
    ) -> Result<freekv_recall::RecallStats, RecallError> {
        self.recall(plan, target)
    }
}

impl<T: Elem> Exec<T> for SyncRecallExecutor<T> {
    fn name(&self) -> String {
        RecallExecutor::name(self).into()
    }
    fn run(
        &self,
        plan: RecallPlan,
        target: &CpuTarget<T>,
    ) -> Result<freekv_recall::RecallStats, RecallError> {
        self.recall(plan, target)
    }
}

fn all_executors<T: Elem>() -> Vec<Box<dyn Exec<T>>> {
    vec![
        Box::new(CpuRecallExecutor::<T>::new(CpuRecallConfig { stage_units: 1 }).unwrap()),
        Box::new(CpuRecallExecutor::<T>::new(CpuRecallConfig { stage_units: 3 }).unwrap()),
        Box::new(CpuRecallExecutor::<T>::new(CpuRecallConfig::default()).unwrap()),
        Box::new(SyncRecallExecutor::<T>::new(SyncMode::Staged, 4).unwrap()),
        Box::new(SyncRecallExecutor::<T>::new(SyncMode::Direct, 4).unwrap()),
    ]
}

fn delivers_random_plans<T: Elem>(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let shapes = [(32, 3, 64), (32, 8, 128), (4, 2, 8), (5, 1, 3)];
    for exec in all_executors::<T>() {
        for (p, h, d) in shapes {
            let geom = PageGeometry::new(p, h, d).unwrap();
            let seqs = rng.random_range(1..4);
            let n_slots = rng.random_range(1..12);
            let w = world::<T>(&mut rng, geom, seqs, n_slots);
            for round in 0..6 {
                let plan = random_plan(&mut rng, &w, 64);
                let want = expected(&w, &plan);
                let units = plan.len() as u64;
                let bytes = plan.bytes::<T>(geom);
                let stats = exec.run(plan, &w.target).unwrap();
                assert_eq!(stats.units, units, "{}", exec.name());
                assert_eq!(stats.bytes, bytes);
                assert_eq!(stats.jobs, 1);
                for (s, want) in want.iter().enumerate() {
                    let got = w.slots[s].read().unwrap();
                    assert!(
                        bits_eq(got.as_slice(), want.as_slice()),
                        "{} shape {p}x{h}x{d} round {round} sequence {s}: resident pool differs",
                        exec.name()
                    );
                }
            }
        }
    }
}

#[test]
fn random_plans_are_delivered_exactly_f32() {
    delivers_random_plans::<f32>(1);
}

#[test]
fn random_plans_are_delivered_exactly_bf16() {
    delivers_random_plans::<bf16>(2);
}

#[test]
fn pipelined_submissions_in_order() {
    // Many plans in flight at once (different layers), plus two plans writing the same
    // destination: the later submission wins.
    let mut rng = StdRng::seed_from_u64(3);
    let geom = PageGeometry::new(8, 2, 16).unwrap();
    let exec = CpuRecallExecutor::<f32>::new(CpuRecallConfig { stage_units: 2 }).unwrap();
    let layers: Vec<World<f32>> = (0..6).map(|_| world(&mut rng, geom, 2, 6)).collect();
    let mut tickets = Vec::new();
    let mut wants = Vec::new();
    for w in &layers {
        let plan = random_plan(&mut rng, w, 20);
        wants.push(expected(w, &plan));
        tickets.push(exec.submit(plan, &w.target).unwrap());
    }
    // Wait in reverse order.
    for t in tickets.into_iter().rev() {
        assert!(t.id() < 6);
        exec.wait(t).unwrap();
    }
    for (w, want) in layers.iter().zip(&wants) {
        for (s, want) in want.iter().enumerate() {
            assert!(bits_eq(
                w.slots[s].read().unwrap().as_slice(),
                want.as_slice()
            ));
        }
    }
    let w = &layers[0];
    let e = |page| RecallEntry {
        seq: 0,
        kv_head: 1,
        host_page: page,
        slot: 2,
    };
    let mut a = RecallPlan::new(0);
    a.push(e(w.pages[0][0]));
    let mut b = RecallPlan::new(0);
    b.push(e(w.pages[0][1]));
    let ta = exec.submit(a, &w.target).unwrap();
    let tb = exec.submit(b.clone(), &w.target).unwrap();
    tb.wait().unwrap();
    assert!(ta.is_done());
    ta.wait().unwrap();
    let want = expected(w, &b);
    assert!(bits_eq(
        w.slots[0].read().unwrap().as_slice(),
        want[0].as_slice()
    ));
    let totals = exec.totals();
    assert_eq!(totals.jobs, 8);
    assert!(totals.units > 0 && totals.bytes == totals.units * geom.head_unit_elems() as u64 * 4);
}

#[test]
fn empty_plans_complete_and_touch_nothing() {
    let mut rng = StdRng::seed_from_u64(4);
    let geom = PageGeometry::new(4, 2, 4).unwrap();
    let w = world::<f32>(&mut rng, geom, 2, 3);
    let before = w.slots[0].read().unwrap().clone();
    for exec in all_executors::<f32>() {
        let stats = exec.run(RecallPlan::new(3), &w.target).unwrap();
        assert_eq!((stats.units, stats.bytes, stats.jobs), (0, 0, 1));
    }
    // Even against an empty target.
    let empty = CpuTarget::<f32> {
        hosts: Vec::new(),
        slots: Vec::new(),
    };
    let exec = CpuRecallExecutor::<f32>::new(CpuRecallConfig::default()).unwrap();
    let t = exec.submit(RecallPlan::new(0), &empty).unwrap();
    assert!(t.is_done());
    assert_eq!(t.wait().unwrap().units, 0);
    assert!(bits_eq(
        w.slots[0].read().unwrap().as_slice(),
        before.as_slice()
    ));
}

#[test]
fn invalid_plans_are_rejected_before_any_write() {
    let mut rng = StdRng::seed_from_u64(5);
    let geom = PageGeometry::new(4, 2, 4).unwrap();
    let w = world::<f32>(&mut rng, geom, 2, 3);
    let good = RecallEntry {
        seq: 1,
        kv_head: 1,
        host_page: w.pages[1][0],
        slot: 2,
    };
    let released = (0..64u32)
        .find(|id| w.pools[0].read().unwrap().page(*id).is_err())
        .unwrap();
    let cases: Vec<(Vec<RecallEntry>, &str)> = vec![
        (
            vec![good, RecallEntry { seq: 2, ..good }],
            "sequence 2 out of range",
        ),
        (
            vec![good, RecallEntry { kv_head: 2, ..good }],
            "kv head 2 out of range",
        ),
        (
            vec![good, RecallEntry { slot: 3, ..good }],
            "slot 3 out of range",
        ),
        (
            vec![
                good,
                RecallEntry {
                    seq: 0,
                    host_page: released,
                    ..good
                },
            ],
            "is not allocated",
        ),
        (
            vec![
                good,
                RecallEntry {
                    host_page: 1_000_000,
                    ..good
                },
            ],
            "is not allocated",
        ),
        (
            vec![
                good,
                RecallEntry {
                    host_page: w.pages[1][1],
                    ..good
                },
            ],
            "two entries write",
        ),
    ];
    let before: Vec<SlotPool<f32>> = w.slots.iter().map(|s| s.read().unwrap().clone()).collect();
    for exec in all_executors::<f32>() {
        for (entries, msg) in &cases {
            let mut plan = RecallPlan::new(0);
            entries.iter().for_each(|e| plan.push(*e));
            let err = exec.run(plan, &w.target).unwrap_err();
            assert!(matches!(err, RecallError::InvalidPlan(_)), "{err}");
            assert!(
                err.to_string().contains(msg),
                "{}: expected {msg:?}: {err}",
                exec.name()
            );
        }
        // Mismatched target shapes.
        let mut plan = RecallPlan::new(0);
        plan.push(good);
        let lopsided = CpuTarget {
            hosts: w.target.hosts.clone(),
            slots: w.target.slots[..1].to_vec(),
        };
        let err = exec.run(plan.clone(), &lopsided).unwrap_err();
        assert!(
            err.to_string()
                .contains("2 host sources but 1 resident pools"),
            "{err}"
        );
        let other = PageGeometry::new(4, 2, 8).unwrap();
        let wrong: SharedSlots<f32> = Arc::new(RwLock::new(SlotPool::new(other, 3).unwrap()));
        let mixed = CpuTarget {
            hosts: w.target.hosts.clone(),
            slots: vec![w.target.slots[0].clone(), wrong],
        };
        let err = exec.run(plan, &mixed).unwrap_err();
        assert!(err.to_string().contains("differ"), "{err}");
    }
    for (s, b) in w.slots.iter().zip(&before) {
        assert!(bits_eq(s.read().unwrap().as_slice(), b.as_slice()));
    }
}

/// A host source that fails after a given number of unit reads: validation passes, execution
/// fails mid-plan.
struct Flaky {
    inner: HostPagePool<f32>,
    reads_left: AtomicUsize,
}

impl HostPages<f32> for Flaky {
    fn geometry(&self) -> PageGeometry {
        self.inner.geometry()
    }
    fn page_capacity(&self) -> usize {
        self.inner.capacity_pages()
    }
    fn head_unit(&self, page: PageId, head: usize) -> Result<&[f32], LayoutError> {
        let left = self.reads_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(LayoutError::BadPage(page));
        }
        self.reads_left.store(left - 1, Ordering::SeqCst);
        self.inner.head_unit(page, head)
    }
}

#[test]
fn failures_during_execution_are_reported_and_the_executor_recovers() {
    let geom = PageGeometry::new(4, 2, 4).unwrap();
    let mut inner = HostPagePool::<f32>::new(geom, None);
    let ids: Vec<PageId> = (0..8).map(|_| inner.alloc().unwrap()).collect();
    let plan_len = 6;
    let flaky = Arc::new(RwLock::new(Flaky {
        inner,
        // Validation reads each unit once, then the copy fails at the 4th unit.
        reads_left: AtomicUsize::new(plan_len + 3),
    }));
    let slots: SharedSlots<f32> = Arc::new(RwLock::new(SlotPool::new(geom, 8).unwrap()));
    let target = CpuTarget::single(flaky.clone() as SharedHost<f32>, slots.clone());
    let mut plan = RecallPlan::new(0);
    for (i, &id) in ids.iter().take(plan_len).enumerate() {
        plan.push(RecallEntry {
            seq: 0,
            kv_head: 0,
            host_page: id,
            slot: i as u32,
        });
    }
    let execs: Vec<Box<dyn Exec<f32>>> = all_executors();
    for exec in execs {
        flaky
            .read()
            .unwrap()
            .reads_left
            .store(plan_len + 3, Ordering::SeqCst);
        let err = exec.run(plan.clone(), &target).unwrap_err();
        assert!(
            matches!(err, RecallError::Layout(LayoutError::BadPage(_))),
            "{}: {err}",
            exec.name()
        );
        // The same executor still works afterwards.
        flaky
            .read()
            .unwrap()
            .reads_left
            .store(usize::MAX, Ordering::SeqCst);
        let stats = exec.run(plan.clone(), &target).unwrap();
        assert_eq!(stats.units, plan_len as u64);
    }
}

/// Run `f` on a thread and fail (instead of hanging the test run) if it takes longer than 30 s;
/// a panic inside `f` is propagated as is.
fn within_deadline(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let handle = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(()) => handle.join().unwrap(),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within 30 s (hang)")
        }
    }
}

#[test]
fn drop_while_idle_releases_everything() {
    within_deadline("drop while idle", || {
        let mut rng = StdRng::seed_from_u64(6);
        let geom = PageGeometry::new(4, 2, 4).unwrap();
        let w = world::<f32>(&mut rng, geom, 1, 4);
        let exec = CpuRecallExecutor::<f32>::new(CpuRecallConfig::default()).unwrap();
        let plan = random_plan(&mut rng, &w, 4);
        exec.recall(plan, &w.target).unwrap();
        drop(exec);
        // Only the world's own references remain: the executor kept none.
        assert_eq!(Arc::strong_count(&w.slots[0]), 2); // `slots` + `target.slots`
        assert_eq!(Arc::strong_count(&w.pools[0]), 2); // `pools` + `target.hosts`
        // An executor that never ran anything.
        drop(CpuRecallExecutor::<bf16>::new(CpuRecallConfig::default()).unwrap());
    });
}

#[test]
fn drop_while_busy_neither_hangs_nor_leaks() {
    within_deadline("drop while busy", || {
        let mut rng = StdRng::seed_from_u64(7);
        let geom = PageGeometry::new(32, 8, 128).unwrap();
        let w = world::<f32>(&mut rng, geom, 2, 16);
        let exec = CpuRecallExecutor::<f32>::new(CpuRecallConfig { stage_units: 1 }).unwrap();
        let mut tickets = Vec::new();
        for _ in 0..40 {
            let plan = random_plan(&mut rng, &w, 256);
            tickets.push(exec.submit(plan, &w.target).unwrap());
        }
        drop(exec);
        let (mut ok, mut stopped) = (0, 0);
        for t in tickets {
            match t.wait() {
                Ok(_) => ok += 1,
                Err(RecallError::Stopped(_)) => stopped += 1,
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!(ok + stopped, 40);
        assert!(
            stopped > 0,
            "the executor finished 40 large plans before drop returned?"
        );
        for s in &w.slots {
            assert_eq!(Arc::strong_count(s), 2);
        }
        for p in &w.pools {
            assert_eq!(Arc::strong_count(p), 2);
        }
    });
}

#[test]
fn zero_stage_units_is_an_error() {
    assert!(CpuRecallExecutor::<f32>::new(CpuRecallConfig { stage_units: 0 }).is_err());
    assert!(SyncRecallExecutor::<f32>::new(SyncMode::Staged, 0).is_err());
}
