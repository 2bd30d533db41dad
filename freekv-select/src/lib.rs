//! Page summaries, page scoring, group-consistent top-k, selection diffs and the correction
//! policy of FreeKV — the CPU reference (fp32, deterministic) that the GPU kernels are tested
//! against. This crate never touches CUDA.
//!
//! One decode step of a sparse layer, per KV head:
//!
//! 1. **Summaries** ([`PageSummaries`]): every full page has an (upper, lower) pair of
//!    `head_dim`-vectors built from its post-RoPE keys — exact min/max ([`SummaryKind::MinMax`],
//!    default) or ArkVale's centre ± mean-deviation box ([`SummaryKind::ArkVale`]) — added when
//!    the page fills ([`PageSummaries::update_from_cache`]). The partial page has none.
//! 2. **Scores** ([`score_pages`]): per query head `s[j,p] = Σ_i max(q_j,i·U_p,i, q_j,i·L_p,i)`.
//! 3. **Group aggregation** ([`GroupPolicy`], [`group_scores`]): the `G` query heads of a KV head
//!    agree on one ranking; default mean of per-head softmax over the candidates.
//! 4. **Top-k** ([`top_k`]): over the candidate pages ([`candidate_range`]: sinks and the recent
//!    window excluded), fp32 scores, ties broken by the lower page index.
//! 5. **Diff** ([`Selection::diff`], [`diff_selection`]): kept / to-recall / victims against the
//!    resident middle pages.
//!
//! [`Selector`] bundles 2–4 behind a [`SelectorConfig`]. The **correction** check
//! ([`CorrectionPolicy`]) compares consecutive queries per query head by cosine, aggregates per
//! KV group and flags KV heads below τ. [`selection_overlap`] measures how much consecutive
//! selections share.
//!
//! ```
//! use freekv_layout::{PageGeometry, PagedKvCache};
//! use freekv_select::{GroupPolicy, Selector, SelectorConfig, SummaryKind};
//!
//! // 4 tokens per page, 1 KV head, head dim 2; 2 query heads share it (G = 2).
//! let geom = PageGeometry::new(4, 1, 2).unwrap();
//! let mut cache = PagedKvCache::new(geom, 1, None).unwrap();
//! for t in 0..30 {
//!     // page p's keys point along (p, 1); page 3's are the largest
//!     let p = (t / 4) as f32;
//!     let k = if t / 4 == 3 { [9.0, 9.0] } else { [p * 0.1, 1.0] };
//!     cache.append(0, &k, &[0.0, 0.0]).unwrap();
//! }
//! let selector = Selector::new(SelectorConfig {
//!     top_k: 2,
//!     sink_pages: 1,
//!     window_pages: 2,
//!     policy: GroupPolicy::MeanSoftmax,
//!     summary: SummaryKind::MinMax,
//! })
//! .unwrap();
//! let mut summaries = selector.new_summaries(geom);
//! assert_eq!(summaries.update_from_cache(&cache, 0).unwrap(), 7); // 7 full pages, 1 partial
//!
//! let q = [1.0, 1.0, 0.5, 1.0]; // two query heads
//! let n_pages = cache.num_pages(0); // 8: sink 0, candidates 1..6, window 6..8
//! let sel = selector.select(&q, summaries.head(0).unwrap(), n_pages).unwrap();
//! assert_eq!(sel.candidates(), 1..6);
//! assert_eq!(sel.ranked(), &[3, 5]);
//!
//! // pages 1 and 3 are resident in the 2 middle slots: keep 3, evict 1, recall 5
//! let diff = sel.diff(&[1, 3], 2).unwrap();
//! assert_eq!((diff.kept, diff.to_recall, diff.victims), (vec![3], vec![5], vec![1]));
//! ```

mod correction;
mod diff;
mod error;
mod policy;
mod score;
mod selector;
mod stats;
mod summary;
mod topk;

pub use correction::{
    CorrectionAggregate, CorrectionFlags, CorrectionPolicy, QueryHistory, cosine, head_cosines,
};
pub use diff::{SelectionDiff, diff_selection};
pub use error::SelectError;
pub use policy::{GroupPolicy, group_scores};
pub use score::{page_score, score_pages};
pub use selector::{Selection, Selector, SelectorConfig};
pub use stats::selection_overlap;
pub use summary::{HeadSummaries, PageSummaries, SummaryKind, summarize_block};
pub use topk::{candidate_range, page_of_key, rank_key, score_key, top_k};
