//! Property tests: the resident page tables stay consistent over thousands of random steps
//! (appends, selections through both diff paths, evictions, corrupted diffs, resets), and agree
//! with an independent set-based model of what must be resident.

use freekv_layout::{Budget, LayerResidency, SlotDiff, SlotPage, SlotTable};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;

/// The independent model: per head, the set of resident logical pages.
struct Shadow {
    budget: Budget,
    pages: usize,
    heads: Vec<BTreeSet<usize>>,
}

impl Shadow {
    fn new(budget: Budget, kv_heads: usize) -> Self {
        Self {
            budget,
            pages: 0,
            heads: vec![BTreeSet::new(); kv_heads],
        }
    }

    fn open_pages(&mut self, new_pages: usize) {
        let nb = self.budget.total_pages();
        let nw = self.budget.window_pages();
        for p in self.pages..new_pages {
            for h in &mut self.heads {
                h.insert(p);
                if p >= nb {
                    h.remove(&(p - nw));
                }
            }
        }
        self.pages = new_pages.max(self.pages);
    }

    fn always_resident(&self, page: usize) -> bool {
        let ns = self.budget.sink_pages();
        page < ns || page + self.budget.window_pages() >= self.pages
    }

    fn keep_only_fixed(&mut self, head: usize) {
        let keep: BTreeSet<usize> = self.heads[head]
            .iter()
            .copied()
            .filter(|&p| self.always_resident(p))
            .collect();
        self.heads[head] = keep;
    }

    fn reset(&mut self) {
        self.pages = 0;
        self.heads.iter_mut().for_each(BTreeSet::clear);
    }
}

fn resident_set(t: &SlotTable) -> BTreeSet<usize> {
    t.resident().map(|sp| sp.page).collect()
}

fn random_selection(rng: &mut StdRng, t: &SlotTable) -> Vec<usize> {
    let cands: Vec<usize> = t.candidate_pages().collect();
    let k = t.budget().retrieved_pages();
    // Mostly a full top-k (what selection produces), sometimes fewer.
    let n = if rng.random_bool(0.85) {
        k.min(cands.len())
    } else {
        rng.random_range(0..=k.min(cands.len()))
    };
    let mut sel: Vec<usize> = cands.choose_multiple(rng, n).copied().collect();
    sel.shuffle(rng);
    sel
}

/// A page-level diff in freekv-select's semantics: only as many victims as needed, in an
/// arbitrary (score) order; `to_recall` in any order.
fn page_level_diff(
    rng: &mut StdRng,
    t: &SlotTable,
    selected: &[usize],
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let resident: Vec<usize> = t.middle().map(|sp| sp.page).collect();
    let kept: Vec<usize> = selected
        .iter()
        .copied()
        .filter(|p| resident.contains(p))
        .collect();
    let mut to_recall: Vec<usize> = selected
        .iter()
        .copied()
        .filter(|p| !resident.contains(p))
        .collect();
    to_recall.shuffle(rng);
    let free = t.budget().retrieved_pages() - resident.len();
    let needed = to_recall.len().saturating_sub(free);
    let mut unselected: Vec<usize> = resident
        .iter()
        .copied()
        .filter(|p| !selected.contains(p))
        .collect();
    unselected.shuffle(rng);
    unselected.truncate(needed);
    (kept, to_recall, unselected)
}

fn corrupt(rng: &mut StdRng, d: &SlotDiff, t: &SlotTable) -> SlotDiff {
    let mut d = d.clone();
    let nb = t.budget().total_pages();
    let n = t.num_pages();
    let rand_sp = |rng: &mut StdRng| SlotPage {
        page: rng.random_range(0..n + 2),
        slot: rng.random_range(0..nb + 2),
    };
    for _ in 0..rng.random_range(1..=3) {
        let lists = [&mut d.kept, &mut d.recalls, &mut d.victims];
        let which = rng.random_range(0..3);
        let list = lists.into_iter().nth(which).unwrap();
        match rng.random_range(0..5) {
            0 if !list.is_empty() => {
                let i = rng.random_range(0..list.len());
                list[i].slot = rng.random_range(0..nb + 2);
            }
            1 if !list.is_empty() => {
                let i = rng.random_range(0..list.len());
                list[i].page = rng.random_range(0..n + 2);
            }
            2 if !list.is_empty() => {
                let i = rng.random_range(0..list.len());
                let x = list[i];
                list.push(x);
            }
            3 if !list.is_empty() => {
                let i = rng.random_range(0..list.len());
                list.remove(i);
            }
            _ => list.push(rand_sp(rng)),
        }
    }
    d
}

#[derive(Default, Debug)]
struct Counts {
    steps: usize,
    selections: usize,
    recalls: usize,
    placed: usize,
    corrupted_rejected: usize,
    corrupted_accepted: usize,
    sparse_steps: usize,
}

fn run(seed: u64, steps: usize) -> Counts {
    let mut rng = StdRng::seed_from_u64(seed);
    let budget = Budget::new(
        rng.random_range(0..4),
        rng.random_range(1..7),
        rng.random_range(1..5),
        rng.random_range(1..6),
    )
    .unwrap();
    let kv_heads = rng.random_range(1..5);
    let mut res = LayerResidency::new(budget, kv_heads).unwrap();
    let mut shadow = Shadow::new(budget, kv_heads);
    let mut c = Counts::default();
    for step in 0..steps {
        c.steps += 1;
        let action = rng.random_range(0..1000);
        if action < 550 {
            res.append_tokens(1).unwrap();
        } else if action < 620 {
            res.append_tokens(rng.random_range(0..3 * budget.page_size() + 2))
                .unwrap();
        } else if res.is_sparse() && action < 830 {
            let h = rng.random_range(0..kv_heads);
            let t = res.head_mut(h).unwrap();
            let sel = random_selection(&mut rng, t);
            let d = t.select(&sel).unwrap();
            c.selections += 1;
            c.recalls += d.recalls.len();
            // The middle now holds exactly the selection.
            let mid: BTreeSet<usize> = t.middle().map(|sp| sp.page).collect();
            assert_eq!(
                mid,
                sel.iter().copied().collect(),
                "seed {seed} step {step}"
            );
            // Recalled pages were not resident before, kept ones were.
            for sp in &d.recalls {
                assert!(!shadow.heads[h].contains(&sp.page));
            }
            for sp in &d.kept {
                assert!(shadow.heads[h].contains(&sp.page));
            }
            shadow.keep_only_fixed(h);
            shadow.heads[h].extend(sel);
        } else if res.is_sparse() && action < 930 {
            let h = rng.random_range(0..kv_heads);
            let t = res.head_mut(h).unwrap();
            let sel = random_selection(&mut rng, t);
            let (kept, to_recall, victims) = page_level_diff(&mut rng, t, &sel);
            let d = t.place(&kept, &to_recall, &victims).unwrap();
            t.apply(&d).unwrap();
            c.placed += 1;
            for p in &victims {
                shadow.heads[h].remove(p);
            }
            shadow.heads[h].extend(to_recall);
            for p in &sel {
                assert!(
                    t.slot_of(*p).is_some(),
                    "seed {seed} step {step}: {p} not resident"
                );
            }
        } else if res.is_sparse() && action < 975 {
            let h = rng.random_range(0..kv_heads);
            let t = res.head_mut(h).unwrap();
            let sel = random_selection(&mut rng, t);
            let good = t.diff(&sel).unwrap();
            let bad = corrupt(&mut rng, &good, t);
            let before = t.clone();
            match t.apply(&bad) {
                Err(_) => {
                    assert_eq!(
                        *t, before,
                        "seed {seed} step {step}: failed apply changed the table"
                    );
                    c.corrupted_rejected += 1;
                }
                Ok(()) => {
                    c.corrupted_accepted += 1;
                    for sp in &bad.victims {
                        shadow.heads[h].remove(&sp.page);
                    }
                    shadow.heads[h].extend(bad.recalls.iter().map(|sp| sp.page));
                }
            }
        } else if action < 990 {
            let h = rng.random_range(0..kv_heads);
            let t = res.head_mut(h).unwrap();
            let ev = t.evict_middle();
            for sp in &ev {
                assert!(!shadow.always_resident(sp.page));
            }
            shadow.keep_only_fixed(h);
        } else if action < 992 {
            res.reset();
            shadow.reset();
        } else {
            // A selection before the layer is sparse, or out of range, must fail cleanly.
            let h = rng.random_range(0..kv_heads);
            let t = res.head_mut(h).unwrap();
            let before = t.clone();
            let n = t.num_pages();
            let bogus = vec![rng.random_range(0..n + 3)];
            if t.select(&bogus).is_ok() {
                assert!(t.candidate_pages().contains(&bogus[0]) && before.is_sparse());
                shadow.keep_only_fixed(h);
                shadow.heads[h].extend(bogus);
            } else {
                assert_eq!(*t, before);
            }
        }
        shadow.open_pages(res.num_pages());
        if res.is_sparse() {
            c.sparse_steps += 1;
        }
        if let Err(e) = res.check_consistency() {
            panic!("seed {seed} step {step} ({budget}, {kv_heads} heads): {e}");
        }
        for (h, t) in res.heads().iter().enumerate() {
            assert_eq!(
                resident_set(t),
                shadow.heads[h],
                "seed {seed} step {step} head {h}: resident set differs from the model"
            );
            // Sinks + window resident, and at most nb pages resident.
            for p in t.sink_pages().chain(t.window_pages()) {
                assert!(t.slot_of(p).is_some());
            }
            assert!(t.resident().count() <= budget.total_pages());
            assert!(
                t.middle()
                    .all(|sp| budget.middle_slots().contains(&sp.slot))
            );
            if let Some(slot) = t.current_slot() {
                assert_eq!(Some(slot), res.current_slot());
            }
        }
    }
    c
}

#[test]
fn tables_stay_consistent_over_random_steps() {
    let mut total = Counts::default();
    for seed in 0..24u64 {
        let c = run(0x5107_7AB1E ^ seed, 3000);
        total.steps += c.steps;
        total.selections += c.selections;
        total.recalls += c.recalls;
        total.placed += c.placed;
        total.corrupted_rejected += c.corrupted_rejected;
        total.corrupted_accepted += c.corrupted_accepted;
        total.sparse_steps += c.sparse_steps;
    }
    eprintln!("{total:?}");
    // The random walk must actually exercise every path.
    assert!(total.sparse_steps > total.steps / 2, "{total:?}");
    assert!(total.selections > 1000, "{total:?}");
    assert!(total.recalls > 1000, "{total:?}");
    assert!(total.placed > 500, "{total:?}");
    assert!(total.corrupted_rejected > 200, "{total:?}");
}

#[test]
fn paper_default_budget_long_run() {
    // P = 32, ns = 16, k = 32, nw = 16 (B = 2048): 64K tokens, a selection every step once sparse.
    let budget = Budget::from_tokens(2048, 512, 512, 32).unwrap();
    let mut res = LayerResidency::new(budget, 2).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    res.append_tokens(3000).unwrap();
    let mut recalled = 0usize;
    for _ in 0..4000 {
        res.append_tokens(rng.random_range(1..20)).unwrap();
        for h in 0..2 {
            let t = res.head_mut(h).unwrap();
            let cands: Vec<usize> = t.candidate_pages().collect();
            let sel: Vec<usize> = cands.choose_multiple(&mut rng, 32).copied().collect();
            assert_eq!(sel.len(), 32);
            recalled += t.select(&sel).unwrap().recalls.len();
        }
        res.check_consistency().unwrap();
    }
    assert!(recalled > 0);
    assert_eq!(res.num_pages(), res.len_tokens().div_ceil(32));
}
