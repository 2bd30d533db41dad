//! freekv-select on top of freekv-layout's `PagedKvCache`: incremental summaries while tokens are
//! appended, the min/max bound on real pages, and a selection that finds planted pages.

use freekv_layout::{PageGeometry, PagedKvCache};
use freekv_select::{
    GroupPolicy, PageSummaries, SelectError, Selector, SelectorConfig, SummaryKind, page_score,
    summarize_block,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random_vec(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn incremental_summaries_match_the_cache() {
    let geom = PageGeometry::new(4, 2, 8).unwrap();
    let layers = 2;
    let mut rng = StdRng::seed_from_u64(7);
    let mut cache = PagedKvCache::new(geom, layers, None).unwrap();
    for kind in SummaryKind::ALL {
        cache.clear();
        let mut sums: Vec<PageSummaries> = (0..layers)
            .map(|_| PageSummaries::new(kind, geom))
            .collect();
        for t in 0..41 {
            for (layer, s) in sums.iter_mut().enumerate() {
                let k = random_vec(&mut rng, geom.kv_heads * geom.head_dim);
                let v = random_vec(&mut rng, geom.kv_heads * geom.head_dim);
                cache.append(layer, &k, &v).unwrap();
                let added = s.update_from_cache(&cache, layer).unwrap();
                // a summary appears exactly when a page fills, never for the partial page
                assert_eq!(added, usize::from((t + 1) % geom.page_size == 0));
                assert_eq!(s.num_pages(), (t + 1) / geom.page_size);
                assert_eq!(s.update_from_cache(&cache, layer).unwrap(), 0);
            }
        }
        for (layer, s) in sums.iter().enumerate() {
            assert_eq!(s.num_pages(), 10);
            for h in 0..geom.kv_heads {
                let view = s.head(h).unwrap();
                for p in 0..s.num_pages() {
                    let keys = cache.keys(layer, p, h).unwrap();
                    let (mut u, mut l) = (vec![0.0; 8], vec![0.0; 8]);
                    summarize_block(kind, keys, 8, &mut u, &mut l).unwrap();
                    assert_eq!(view.upper(p).unwrap(), &u[..]);
                    assert_eq!(view.lower(p).unwrap(), &l[..]);
                    if kind == SummaryKind::MinMax {
                        for i in 0..8 {
                            let col: Vec<f32> = keys.chunks_exact(8).map(|r| r[i]).collect();
                            assert!(col.iter().all(|&x| l[i] <= x && x <= u[i]));
                            // exact bounds: both are attained
                            assert!(col.contains(&u[i]) && col.contains(&l[i]));
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn minmax_score_bounds_every_key_on_cache_pages() {
    let geom = PageGeometry::new(16, 3, 64).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let mut cache = PagedKvCache::new(geom, 1, None).unwrap();
    for _ in 0..(16 * 12 + 5) {
        let k = random_vec(&mut rng, 3 * 64);
        cache.append(0, &k, &k).unwrap();
    }
    let mut s = PageSummaries::new(SummaryKind::MinMax, geom);
    assert_eq!(s.update_from_cache(&cache, 0).unwrap(), 12);
    for _ in 0..20 {
        let q = random_vec(&mut rng, 64);
        let abs_q: Vec<f32> = q.iter().map(|x| x.abs()).collect();
        for h in 0..3 {
            let view = s.head(h).unwrap();
            for p in 0..12 {
                let score = page_score(&q, view.upper(p).unwrap(), view.lower(p).unwrap()).unwrap();
                for k in cache.keys(0, p, h).unwrap().chunks_exact(64) {
                    let abs_k: Vec<f32> = k.iter().map(|x| x.abs()).collect();
                    // rounding slack: a few ulps of Σ|q_i k_i|
                    let slack = 1e-5 * dot(&abs_q, &abs_k);
                    assert!(dot(&q, k) <= score + slack, "page {p} head {h}");
                }
            }
        }
    }
}

#[test]
fn selection_finds_planted_pages() {
    // 2 KV heads, G = 3, d = 16, P = 8. Plant pages whose keys align with the group's queries.
    let geom = PageGeometry::new(8, 2, 16).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let mut cache = PagedKvCache::new(geom, 1, None).unwrap();
    let dir: Vec<Vec<f32>> = (0..2).map(|_| random_vec(&mut rng, 16)).collect();
    let planted = [[5usize, 9, 17], [6, 12, 20]];
    // even stronger pages in the sinks (0, 1) and the window (27..31): never candidates
    let outside = [[1usize, 28], [0, 30]];
    let n_tokens = 8 * 30 + 3; // 30 full pages + 1 partial
    for t in 0..n_tokens {
        let page = t / 8;
        let mut k = Vec::with_capacity(32);
        for h in 0..2 {
            let noise = random_vec(&mut rng, 16);
            let scale = if outside[h].contains(&page) {
                8.0
            } else if planted[h].contains(&page) {
                4.0
            } else {
                0.0
            };
            k.extend(noise.iter().zip(&dir[h]).map(|(n, d)| 0.1 * n + scale * d));
        }
        cache.append(0, &k, &k).unwrap();
    }
    // queries: 3 heads per group, each a noisy copy of the group's direction
    let mut q = Vec::new();
    for d in &dir {
        for _ in 0..3 {
            q.extend(d.iter().map(|x| x + 0.05 * rng.random_range(-1.0f32..1.0)));
        }
    }
    for policy in GroupPolicy::ALL {
        let selector = Selector::new(SelectorConfig {
            top_k: 3,
            sink_pages: 2,
            window_pages: 4,
            policy,
            summary: SummaryKind::MinMax,
        })
        .unwrap();
        let mut s = selector.new_summaries(geom);
        s.update_from_cache(&cache, 0).unwrap();
        let sels = selector.select_layer(&q, &s, cache.num_pages(0)).unwrap();
        assert_eq!(sels.len(), 2);
        for (h, sel) in sels.iter().enumerate() {
            assert_eq!(sel.candidates(), 2..27, "{policy}");
            assert_eq!(sel.pages(), &planted[h], "{policy} head {h}");
        }
        assert_eq!(sels[0].ranked().len(), 3);
    }
}

#[test]
fn cache_errors_are_reported() {
    let geom = PageGeometry::new(2, 1, 2).unwrap();
    let mut cache = PagedKvCache::new(geom, 1, None).unwrap();
    for _ in 0..6 {
        cache.append(0, &[1.0, 2.0], &[0.0, 0.0]).unwrap();
    }
    let mut s = PageSummaries::new(SummaryKind::MinMax, geom);
    assert_eq!(s.update_from_cache(&cache, 0).unwrap(), 3);
    assert!(matches!(
        s.update_from_cache(&cache, 1),
        Err(SelectError::OutOfRange { what: "layer", .. })
    ));
    let other = PageGeometry::new(4, 1, 2).unwrap();
    let mut wrong = PageSummaries::new(SummaryKind::MinMax, other);
    assert!(matches!(
        wrong.update_from_cache(&cache, 0),
        Err(SelectError::GeometryMismatch { .. })
    ));
    cache.truncate(3);
    assert!(matches!(
        s.update_from_cache(&cache, 0),
        Err(SelectError::SummariesAhead {
            summarised: 3,
            full: 1
        })
    ));
    s.truncate(1);
    assert_eq!(s.update_from_cache(&cache, 0).unwrap(), 0);
    cache.append(0, &[3.0, 4.0], &[0.0, 0.0]).unwrap();
    assert_eq!(s.update_from_cache(&cache, 0).unwrap(), 1);
    assert_eq!(s.head(0).unwrap().upper(1).unwrap(), &[3.0, 4.0]);
    assert_eq!(s.head(0).unwrap().lower(1).unwrap(), &[1.0, 2.0]);
}
