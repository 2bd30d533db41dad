//! The selector: configuration plus score → group aggregation → top-k for one KV group or a
//! whole layer.

use std::ops::Range;

use crate::diff::{SelectionDiff, diff_selection};
use crate::policy::group_scores;
use crate::topk::{candidate_range, rank_keys, top_k_keys};
use freekv_layout::PageGeometry;

use crate::{GroupPolicy, HeadSummaries, PageSummaries, SelectError, SummaryKind};

/// Selection parameters of one sparse layer (all counts in pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SelectorConfig {
    /// Retrieved ("middle") pages per KV head: the `k` of the top-k. At least 1.
    pub top_k: usize,
    /// Sink pages at the start of the sequence: always resident, never candidates.
    pub sink_pages: usize,
    /// Recent-window pages: the last `window_pages` logical pages, the partial page included;
    /// always resident, never candidates. At least 1 (the page being written is always in the
    /// window, and it has no summary).
    pub window_pages: usize,
    /// GQA group aggregation.
    pub policy: GroupPolicy,
    /// Page summary kind the selector expects.
    pub summary: SummaryKind,
}

impl Default for SelectorConfig {
    /// The paper's accuracy-path defaults at page size 32: 512 sink tokens (16 pages), 512 window
    /// tokens (16 pages), 1024 retrieved tokens (32 pages), mean-of-softmax, min/max summaries.
    fn default() -> Self {
        Self {
            top_k: 32,
            sink_pages: 16,
            window_pages: 16,
            policy: GroupPolicy::MeanSoftmax,
            summary: SummaryKind::MinMax,
        }
    }
}

impl SelectorConfig {
    /// Check the configuration: `top_k ≥ 1`, `window_pages ≥ 1`.
    pub fn validate(&self) -> Result<(), SelectError> {
        if self.top_k == 0 {
            return Err(SelectError::InvalidConfig(
                "top_k must be at least 1 retrieved page".into(),
            ));
        }
        if self.window_pages == 0 {
            return Err(SelectError::InvalidConfig(
                "window_pages must be at least 1 (the page being written is part of the window)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Pages resident per KV head once the sequence is longer than the budget:
    /// `sink_pages + top_k + window_pages`.
    pub fn budget_pages(&self) -> usize {
        self.sink_pages
            .saturating_add(self.top_k)
            .saturating_add(self.window_pages)
    }
}

/// The pages chosen for one KV head at one step, with the group scores that ranked them.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    candidates: Range<usize>,
    scores: Vec<f32>,
    ranked: Vec<usize>,
    pages: Vec<usize>,
}

impl Selection {
    /// Build a selection from candidate group scores (`scores[i]` for page `candidates.start + i`)
    /// by the deterministic top-`k`.
    pub fn from_scores(
        candidates: Range<usize>,
        scores: Vec<f32>,
        k: usize,
    ) -> Result<Self, SelectError> {
        let n = candidates.end.saturating_sub(candidates.start);
        if scores.len() != n {
            return Err(SelectError::SizeMismatch {
                what: "candidate scores",
                expected: n,
                got: scores.len(),
            });
        }
        let mut keys = rank_keys(&scores, candidates.start)?;
        let ranked = top_k_keys(&mut keys, k);
        let mut pages = ranked.clone();
        pages.sort_unstable();
        Ok(Self {
            candidates,
            scores,
            ranked,
            pages,
        })
    }

    /// Selected pages, ascending page index.
    pub fn pages(&self) -> &[usize] {
        &self.pages
    }

    /// Selected pages, best first (score descending, ties by lower page index).
    pub fn ranked(&self) -> &[usize] {
        &self.ranked
    }

    /// Number of selected pages.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// True when nothing was selected (no candidates).
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Whether `page` is selected.
    pub fn contains(&self, page: usize) -> bool {
        self.pages.binary_search(&page).is_ok()
    }

    /// The candidate pages the selection was made from.
    pub fn candidates(&self) -> Range<usize> {
        self.candidates.clone()
    }

    /// Group scores of every candidate page, in page order.
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// Group score of candidate `page`, `None` for a non-candidate.
    pub fn score(&self, page: usize) -> Option<f32> {
        if !self.candidates.contains(&page) {
            return None;
        }
        self.scores.get(page - self.candidates.start).copied()
    }

    /// Diff against the resident middle pages (`capacity` middle slots); see
    /// [`diff_selection`].
    pub fn diff(&self, resident: &[usize], capacity: usize) -> Result<SelectionDiff, SelectError> {
        diff_selection(
            &self.pages,
            resident,
            capacity,
            &self.scores,
            self.candidates.start,
        )
    }

    /// `|prev ∩ self| / |self|` (see [`selection_overlap`](crate::selection_overlap)).
    pub fn overlap_with(&self, prev: &Selection) -> Option<f64> {
        crate::selection_overlap(prev.pages(), self.pages())
    }
}

/// Page selection for sparse layers: holds a validated [`SelectorConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selector {
    config: SelectorConfig,
}

impl Selector {
    /// A selector with a validated configuration.
    pub fn new(config: SelectorConfig) -> Result<Self, SelectError> {
        config.validate()?;
        Ok(Self { config })
    }

    /// The configuration.
    pub fn config(&self) -> &SelectorConfig {
        &self.config
    }

    /// Empty summaries of the configured kind for pages of geometry `geom`.
    pub fn new_summaries(&self, geom: PageGeometry) -> PageSummaries {
        PageSummaries::new(self.config.summary, geom)
    }

    /// Candidate pages of a sequence with `n_pages` logical pages (partial page included).
    pub fn candidates(&self, n_pages: usize) -> Range<usize> {
        candidate_range(n_pages, self.config.sink_pages, self.config.window_pages)
    }

    /// Select the pages of one KV head.
    ///
    /// * `q_heads`: the post-RoPE queries of the `G` query heads of the KV group, `G × d`;
    /// * `summaries`: that KV head's page summaries (of the configured kind);
    /// * `n_pages`: logical pages of the sequence in this layer, the partial page included
    ///   (`PagedKvCache::num_pages`). Candidates are [`candidates(n_pages)`](Self::candidates);
    ///   each must be summarised.
    pub fn select(
        &self,
        q_heads: &[f32],
        summaries: HeadSummaries<'_>,
        n_pages: usize,
    ) -> Result<Selection, SelectError> {
        if summaries.kind() != self.config.summary {
            return Err(SelectError::SummaryKindMismatch {
                expected: self.config.summary.name(),
                got: summaries.kind().name(),
            });
        }
        let candidates = self.candidates(n_pages);
        if candidates.end > summaries.num_pages() {
            return Err(SelectError::MissingSummaries {
                needed: candidates.end,
                have: summaries.num_pages(),
            });
        }
        let scores = group_scores(self.config.policy, q_heads, summaries, candidates.clone())?;
        Selection::from_scores(candidates, scores, self.config.top_k)
    }

    /// Select the pages of every KV head of a layer.
    ///
    /// `q` holds the layer's `Hq` post-RoPE query heads (`Hq × d`, head-major); `Hq` must be a
    /// multiple of the summaries' `Hkv`, and query heads `h·G .. (h+1)·G` (`G = Hq / Hkv`) form
    /// KV head `h`'s group (the Llama GQA mapping). Returns one [`Selection`] per KV head.
    pub fn select_layer(
        &self,
        q: &[f32],
        summaries: &PageSummaries,
        n_pages: usize,
    ) -> Result<Vec<Selection>, SelectError> {
        let geom = summaries.geometry();
        let d = geom.head_dim;
        let hkv = geom.kv_heads;
        if q.is_empty() || !q.len().is_multiple_of(d * hkv) {
            return Err(SelectError::SizeMismatch {
                what: "layer queries (Hq × head_dim with Hq a positive multiple of Hkv)",
                expected: d * hkv * (q.len() / (d * hkv)).max(1),
                got: q.len(),
            });
        }
        let _span = tracing::debug_span!("select_layer", n_pages, hkv).entered();
        let group = q.len() / hkv;
        q.chunks_exact(group)
            .enumerate()
            .map(|(h, qg)| self.select(qg, summaries.head(h)?, n_pages))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One KV head, d = 1, pages summarised with U = L = value, so score = q·value.
    fn summaries(values: &[f32]) -> PageSummaries {
        let g = PageGeometry::new(1, 1, 1).unwrap();
        let mut s = PageSummaries::new(SummaryKind::MinMax, g);
        for v in values {
            s.push_page(&[&[*v]]).unwrap();
        }
        s
    }

    fn selector(k: usize, sink: usize, window: usize) -> Selector {
        Selector::new(SelectorConfig {
            top_k: k,
            sink_pages: sink,
            window_pages: window,
            policy: GroupPolicy::MaxScore,
            summary: SummaryKind::MinMax,
        })
        .unwrap()
    }

    #[test]
    fn excludes_sink_and_window() {
        // sink pages 0,1 and window pages 8,9 (9 = partial) have the highest scores, yet are
        // never selected.
        let s = summaries(&[100.0, 100.0, 1.0, 5.0, 2.0, 5.0, 3.0, 0.0, 100.0]);
        let sel = selector(3, 2, 2)
            .select(&[1.0], s.head(0).unwrap(), 10)
            .unwrap();
        assert_eq!(sel.candidates(), 2..8);
        assert_eq!(sel.ranked(), &[3, 5, 6]);
        assert_eq!(sel.pages(), &[3, 5, 6]);
        assert!(sel.contains(5) && !sel.contains(0) && !sel.contains(8));
        assert_eq!(sel.score(3), Some(5.0));
        assert_eq!(sel.score(8), None);
        assert_eq!(sel.scores().len(), 6);
    }

    #[test]
    fn k_larger_than_candidates_and_no_candidates() {
        let s = summaries(&[1.0, 2.0, 3.0, 4.0]);
        let sel = selector(10, 1, 1)
            .select(&[1.0], s.head(0).unwrap(), 5)
            .unwrap();
        assert_eq!(sel.pages(), &[1, 2, 3]);
        assert_eq!(sel.ranked(), &[3, 2, 1]);
        let sel = selector(10, 3, 2)
            .select(&[1.0], s.head(0).unwrap(), 5)
            .unwrap();
        assert!(sel.is_empty());
        assert_eq!(sel.candidates(), 3..3);
        let sel = selector(2, 0, 1)
            .select(&[1.0], s.head(0).unwrap(), 0)
            .unwrap();
        assert!(sel.is_empty());
    }

    #[test]
    fn missing_summaries_and_kind_mismatch() {
        let s = summaries(&[1.0, 2.0]);
        // 4 pages with window 1 → candidates 0..3 but only 2 summarised
        assert!(matches!(
            selector(1, 0, 1).select(&[1.0], s.head(0).unwrap(), 4),
            Err(SelectError::MissingSummaries { needed: 3, have: 2 })
        ));
        let ark = PageSummaries::new(SummaryKind::ArkVale, s.geometry());
        assert!(matches!(
            selector(1, 0, 1).select(&[1.0], ark.head(0).unwrap(), 1),
            Err(SelectError::SummaryKindMismatch { .. })
        ));
    }

    #[test]
    fn config_validation() {
        let mut c = SelectorConfig::default();
        assert_eq!(c.budget_pages(), 64);
        Selector::new(c).unwrap();
        c.top_k = 0;
        assert!(Selector::new(c).is_err());
        c.top_k = 1;
        c.window_pages = 0;
        assert!(Selector::new(c).is_err());
    }

    #[test]
    fn select_layer_groups_heads() {
        // 2 KV heads, d = 1, G = 2. Head 0 pages: 1,2,3; head 1 pages: 3,2,1.
        let g = PageGeometry::new(1, 2, 1).unwrap();
        let mut s = PageSummaries::new(SummaryKind::MinMax, g);
        for (a, b) in [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)] {
            s.push_page(&[&[a], &[b]]).unwrap();
        }
        let sel = selector(1, 0, 1);
        // q heads 0,1 → KV 0; q heads 2,3 → KV 1. All positive queries.
        let out = sel.select_layer(&[1.0, 2.0, 1.0, 1.0], &s, 4).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].pages(), &[2]);
        assert_eq!(out[1].pages(), &[0]);
        // negative queries flip the choice
        let out = sel.select_layer(&[-1.0, -1.0, -1.0, -1.0], &s, 4).unwrap();
        assert_eq!(out[0].pages(), &[0]);
        assert_eq!(out[1].pages(), &[2]);
        assert!(sel.select_layer(&[1.0, 2.0, 3.0], &s, 4).is_err());
        assert!(sel.select_layer(&[], &s, 4).is_err());
    }

    #[test]
    fn from_scores_and_diff() {
        let sel = Selection::from_scores(4..8, vec![0.1, 0.4, 0.4, 0.2], 2).unwrap();
        assert_eq!(sel.ranked(), &[5, 6]);
        let d = sel.diff(&[4, 5], 2).unwrap();
        assert_eq!(d.kept, vec![5]);
        assert_eq!(d.to_recall, vec![6]);
        assert_eq!(d.victims, vec![4]);
        assert!(Selection::from_scores(4..8, vec![0.1], 2).is_err());
    }

    #[test]
    fn k_larger_than_candidates_diff() {
        // 3 candidates, k = 5: everything selected; against 1 resident of 5 slots nothing is
        // evicted, and an empty resident set recalls all three.
        let sel = Selection::from_scores(2..5, vec![0.3, 0.1, 0.2], 5).unwrap();
        assert_eq!(sel.ranked(), &[2, 4, 3]);
        let d = sel.diff(&[3], 5).unwrap();
        assert_eq!(
            (d.kept, d.to_recall, d.victims),
            (vec![3], vec![2, 4], vec![])
        );
        let d = sel.diff(&[], 5).unwrap();
        assert_eq!(d.to_recall, vec![2, 3, 4]);
        assert!(d.kept.is_empty() && d.victims.is_empty());
        // a capacity below the selection size is rejected
        assert!(sel.diff(&[], 2).is_err());
    }
}
