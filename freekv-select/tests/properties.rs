//! Seeded random property loops: determinism, independence from evaluation order, agreement of
//! the O(n) top-k with a full sort, and the invariants of selection diffs.

use freekv_layout::PageGeometry;
use freekv_select::{
    GroupPolicy, HeadSummaries, PageSummaries, Selection, Selector, SelectorConfig, SummaryKind,
    diff_selection, group_scores, page_score, rank_key, score_pages, selection_overlap, top_k,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn random_summaries(rng: &mut StdRng, geom: PageGeometry, pages: usize) -> PageSummaries {
    let mut s = PageSummaries::new(SummaryKind::MinMax, geom);
    for _ in 0..pages {
        let blocks: Vec<Vec<f32>> = (0..geom.kv_heads)
            .map(|_| {
                (0..geom.page_size * geom.head_dim)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = blocks.iter().map(Vec::as_slice).collect();
        s.push_page(&refs).unwrap();
    }
    s
}

/// Reference ranking: full sort by (score desc, page asc) with IEEE equality for ties.
fn reference_top_k(scores: &[f32], first: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap()
            .then_with(|| a.cmp(&b))
    });
    idx.into_iter().take(k).map(|i| first + i).collect()
}

#[test]
fn top_k_matches_full_sort_with_many_ties() {
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..500 {
        let n = rng.random_range(0..300);
        let levels = rng.random_range(1..8);
        // quantised scores → many exact ties, both signs, zeros of both signs
        let scores: Vec<f32> = (0..n)
            .map(|_| {
                let v = rng.random_range(0..levels) as f32 - (levels / 2) as f32;
                if v == 0.0 && rng.random_bool(0.5) {
                    -0.0
                } else {
                    v * 0.25
                }
            })
            .collect();
        let first = rng.random_range(0..1000);
        let k = rng.random_range(0..n + 3);
        let got = top_k(&scores, first, k).unwrap();
        assert_eq!(got, reference_top_k(&scores, first, k), "n={n} k={k}");
        assert_eq!(got.len(), k.min(n));
    }
}

#[test]
fn selection_is_deterministic_and_order_independent() {
    let mut rng = StdRng::seed_from_u64(2);
    for iter in 0..40 {
        let hkv = rng.random_range(1..4);
        let g = rng.random_range(1..5);
        let d = [8usize, 12, 16, 64][rng.random_range(0..4)];
        let pages = rng.random_range(1..60);
        let geom = PageGeometry::new(4, hkv, d).unwrap();
        let s = random_summaries(&mut rng, geom, pages);
        let q: Vec<f32> = (0..hkv * g * d)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let n_pages = pages + 1; // one partial page
        for policy in GroupPolicy::ALL {
            let sel = Selector::new(SelectorConfig {
                top_k: rng.random_range(1..10),
                sink_pages: rng.random_range(0..3),
                window_pages: rng.random_range(1..4),
                policy,
                summary: SummaryKind::MinMax,
            })
            .unwrap();
            let a = sel.select_layer(&q, &s, n_pages).unwrap();
            let b = sel.select_layer(&q, &s, n_pages).unwrap();
            assert_eq!(a, b);
            let bits = |x: &Selection| x.scores().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(bits(x), bits(y));
            }
            // KV heads in reverse order, one at a time: same result per head
            for h in (0..hkv).rev() {
                let qg = &q[h * g * d..(h + 1) * g * d];
                let one = sel.select(qg, s.head(h).unwrap(), n_pages).unwrap();
                assert_eq!(one, a[h], "iter {iter} policy {policy} head {h}");
            }
            // max-based policies do not depend on the order of the query heads
            if matches!(policy, GroupPolicy::MaxScore | GroupPolicy::PooledMaxQuery) {
                for h in 0..hkv {
                    let mut heads: Vec<&[f32]> =
                        q[h * g * d..(h + 1) * g * d].chunks_exact(d).collect();
                    heads.shuffle(&mut rng);
                    let qs: Vec<f32> = heads.concat();
                    let one = sel.select(&qs, s.head(h).unwrap(), n_pages).unwrap();
                    assert_eq!(one, a[h]);
                }
            }
        }
    }
}

#[test]
fn scores_do_not_depend_on_range_split_or_page_order() {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..30 {
        let d = rng.random_range(1..140);
        let g = rng.random_range(1..5);
        let pages = rng.random_range(1..50);
        let upper: Vec<f32> = (0..pages * d)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        let lower: Vec<f32> = upper
            .iter()
            .map(|u| u - rng.random_range(0.0f32..2.0))
            .collect();
        let s = HeadSummaries::new(SummaryKind::MinMax, d, &upper, &lower).unwrap();
        let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut all = vec![0.0; g * pages];
        score_pages(&q, s, 0..pages, &mut all).unwrap();
        // pages visited in a random order, one at a time
        let mut order: Vec<usize> = (0..pages).collect();
        order.shuffle(&mut rng);
        for &p in &order {
            let mut one = vec![0.0; g];
            score_pages(&q, s, p..p + 1, &mut one).unwrap();
            for j in 0..g {
                assert_eq!(one[j].to_bits(), all[j * pages + p].to_bits());
                let single = page_score(
                    &q[j * d..(j + 1) * d],
                    s.upper(p).unwrap(),
                    s.lower(p).unwrap(),
                )
                .unwrap();
                assert_eq!(single.to_bits(), all[j * pages + p].to_bits());
            }
        }
        // a split range gives the same scores
        let cut = rng.random_range(0..=pages);
        let mut left = vec![0.0; g * cut];
        let mut right = vec![0.0; g * (pages - cut)];
        score_pages(&q, s, 0..cut, &mut left).unwrap();
        score_pages(&q, s, cut..pages, &mut right).unwrap();
        for j in 0..g {
            for p in 0..pages {
                let v = if p < cut {
                    left[j * cut + p]
                } else {
                    right[j * (pages - cut) + p - cut]
                };
                assert_eq!(v.to_bits(), all[j * pages + p].to_bits());
            }
        }
    }
}

#[test]
fn group_scores_of_permuted_pages_follow_the_pages() {
    // Permuting the pages of the summaries permutes the raw-score group scores identically
    // (every page is scored independently). Softmax policies normalise over all candidates, and
    // the fp32 sum of exponentials depends on the order, so only the raw and pooled policies are
    // checked bit for bit.
    let mut rng = StdRng::seed_from_u64(4);
    for _ in 0..30 {
        let d = 16;
        let g = 3;
        let pages = rng.random_range(2..40);
        let upper: Vec<f32> = (0..pages * d)
            .map(|_| rng.random_range(-3.0f32..3.0))
            .collect();
        let lower: Vec<f32> = upper.iter().map(|u| u - 0.5).collect();
        let mut perm: Vec<usize> = (0..pages).collect();
        perm.shuffle(&mut rng);
        let pu: Vec<f32> = perm
            .iter()
            .flat_map(|&p| upper[p * d..(p + 1) * d].to_vec())
            .collect();
        let pl: Vec<f32> = perm
            .iter()
            .flat_map(|&p| lower[p * d..(p + 1) * d].to_vec())
            .collect();
        let a = HeadSummaries::new(SummaryKind::MinMax, d, &upper, &lower).unwrap();
        let b = HeadSummaries::new(SummaryKind::MinMax, d, &pu, &pl).unwrap();
        let q: Vec<f32> = (0..g * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        for policy in [
            GroupPolicy::MaxScore,
            GroupPolicy::MeanScore,
            GroupPolicy::PooledQuery,
            GroupPolicy::PooledMaxQuery,
        ] {
            let sa = group_scores(policy, &q, a, 0..pages).unwrap();
            let sb = group_scores(policy, &q, b, 0..pages).unwrap();
            for (i, &p) in perm.iter().enumerate() {
                assert_eq!(sb[i].to_bits(), sa[p].to_bits());
            }
        }
        for policy in [GroupPolicy::MeanSoftmax, GroupPolicy::MaxSoftmax] {
            let sa = group_scores(policy, &q, a, 0..pages).unwrap();
            let sb = group_scores(policy, &q, b, 0..pages).unwrap();
            for (i, &p) in perm.iter().enumerate() {
                assert!((sb[i] - sa[p]).abs() <= 1e-5 * sa[p].abs().max(1e-30));
            }
        }
    }
}

#[test]
fn diff_invariants() {
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..1000 {
        let first = rng.random_range(0..20);
        let n = rng.random_range(0..40);
        let scores: Vec<f32> = (0..n).map(|_| rng.random_range(0..5) as f32).collect();
        let capacity = rng.random_range(0..12);
        let mut all: Vec<usize> = (first..first + n).collect();
        all.shuffle(&mut rng);
        let ns = rng.random_range(0..=capacity.min(n));
        let selected: Vec<usize> = all[..ns].to_vec();
        all.shuffle(&mut rng);
        let nr = rng.random_range(0..=capacity.min(n));
        let resident: Vec<usize> = all[..nr].to_vec();
        let diff = diff_selection(&selected, &resident, capacity, &scores, first).unwrap();

        // order of the inputs does not matter
        let mut s2 = selected.clone();
        let mut r2 = resident.clone();
        s2.shuffle(&mut rng);
        r2.shuffle(&mut rng);
        assert_eq!(
            diff_selection(&s2, &r2, capacity, &scores, first).unwrap(),
            diff
        );

        let mut sel_sorted = selected.clone();
        sel_sorted.sort_unstable();
        let mut union: Vec<usize> = diff.kept.iter().chain(&diff.to_recall).copied().collect();
        union.sort_unstable();
        assert_eq!(union, sel_sorted);
        assert!(diff.kept.windows(2).all(|w| w[0] < w[1]));
        assert!(diff.to_recall.windows(2).all(|w| w[0] < w[1]));
        assert!(diff.kept.iter().all(|p| resident.contains(p)));
        assert!(diff.to_recall.iter().all(|p| !resident.contains(p)));
        assert!(
            diff.victims
                .iter()
                .all(|p| resident.contains(p) && !selected.contains(p))
        );
        let free = capacity - resident.len();
        assert_eq!(
            diff.victims.len(),
            diff.to_recall.len().saturating_sub(free)
        );
        // after the change everything fits
        assert!(resident.len() - diff.victims.len() + diff.to_recall.len() <= capacity);
        // victims are the worst-ranked unselected residents, worst first
        let key = |p: usize| rank_key(scores[p - first], p as u32);
        assert!(diff.victims.windows(2).all(|w| key(w[0]) < key(w[1])));
        if let Some(&best_victim) = diff.victims.last() {
            for &p in resident
                .iter()
                .filter(|p| !selected.contains(p) && !diff.victims.contains(p))
            {
                assert!(key(p) > key(best_victim));
            }
        }
    }
}

#[test]
fn selection_diff_keeps_resident_pages_stable() {
    // A selector step: resident = the previous selection; the new diff recalls exactly the new
    // pages and evicts exactly the dropped ones, and the overlap statistic agrees.
    let mut rng = StdRng::seed_from_u64(6);
    let geom = PageGeometry::new(4, 1, 32).unwrap();
    let s = random_summaries(&mut rng, geom, 100);
    let sel = Selector::new(SelectorConfig {
        top_k: 8,
        sink_pages: 2,
        window_pages: 3,
        policy: GroupPolicy::MeanSoftmax,
        summary: SummaryKind::MinMax,
    })
    .unwrap();
    let mut q: Vec<f32> = (0..2 * 32)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut prev = sel.select(&q, s.head(0).unwrap(), 101).unwrap();
    for _ in 0..50 {
        for x in q.iter_mut() {
            *x += 0.3 * rng.random_range(-1.0f32..1.0);
        }
        let cur = sel.select(&q, s.head(0).unwrap(), 101).unwrap();
        let diff = cur.diff(prev.pages(), 8).unwrap();
        assert_eq!(diff.victims.len(), diff.to_recall.len());
        let dropped: Vec<usize> = prev
            .pages()
            .iter()
            .copied()
            .filter(|p| !cur.contains(*p))
            .collect();
        let mut v = diff.victims.clone();
        v.sort_unstable();
        assert_eq!(v, dropped);
        let overlap = cur.overlap_with(&prev).unwrap();
        assert_eq!(overlap, diff.kept.len() as f64 / 8.0);
        assert_eq!(selection_overlap(prev.pages(), cur.pages()), Some(overlap));
        prev = cur;
    }
}
