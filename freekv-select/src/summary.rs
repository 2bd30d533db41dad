//! Page summaries ("digests"): one (upper, lower) pair of `head_dim`-vectors per full page and
//! KV head, built from the page's post-RoPE keys.

use std::fmt;
use std::str::FromStr;

use freekv_layout::{PageGeometry, PagedKvCache};

use crate::SelectError;

/// How a full page of keys is summarised into an upper vector `U` and a lower vector `L`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SummaryKind {
    /// Exact element-wise bounds: `U = max_t k_t`, `L = min_t k_t` over the page's keys (the
    /// paper's and the accuracy path's choice, `page_rep=quest`). For every key `k` of the page and
    /// every query `q`, `q·k ≤ Σ_i max(q_i U_i, q_i L_i)` — the score is an upper bound.
    #[default]
    MinMax,
    /// ArkVale's box (the upstream efficiency path): centre `c = (max + min) / 2`, radius
    /// `r = mean_t |k_t − c|` element-wise, `U = c + r`, `L = c − r`. Tighter than min/max and
    /// **not** a bound.
    ArkVale,
}

impl SummaryKind {
    /// Every kind, in declaration order.
    pub const ALL: [SummaryKind; 2] = [SummaryKind::MinMax, SummaryKind::ArkVale];

    /// Canonical name (`minmax`, `arkvale`), the one [`FromStr`] accepts and [`fmt::Display`]
    /// prints.
    pub fn name(self) -> &'static str {
        match self {
            SummaryKind::MinMax => "minmax",
            SummaryKind::ArkVale => "arkvale",
        }
    }
}

impl fmt::Display for SummaryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SummaryKind {
    type Err = SelectError;

    /// Accepts `minmax` (alias `quest`) and `arkvale` (alias `arkv`), case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "minmax" | "min-max" | "quest" => Ok(SummaryKind::MinMax),
            "arkvale" | "arkv" => Ok(SummaryKind::ArkVale),
            _ => Err(SelectError::UnknownName {
                what: "summary kind",
                name: s.to_string(),
                expected: "minmax, arkvale",
            }),
        }
    }
}

/// Summarise one block of keys (`tokens × head_dim`, token-major, `tokens ≥ 1`) into
/// `upper`/`lower` (`head_dim` each).
///
/// Every row of `keys` is used, so pass exactly the valid rows. Arithmetic is fp32; the ArkVale
/// radius sums `|k_t − c|` in token order and divides by the token count.
pub fn summarize_block(
    kind: SummaryKind,
    keys: &[f32],
    head_dim: usize,
    upper: &mut [f32],
    lower: &mut [f32],
) -> Result<(), SelectError> {
    if head_dim == 0 {
        return Err(SelectError::InvalidConfig("head_dim must be > 0".into()));
    }
    if keys.is_empty() || !keys.len().is_multiple_of(head_dim) {
        return Err(SelectError::SizeMismatch {
            what: "summarised keys (a positive multiple of head_dim)",
            expected: head_dim * (keys.len() / head_dim).max(1),
            got: keys.len(),
        });
    }
    for (what, buf) in [("summary upper", &*upper), ("summary lower", &*lower)] {
        if buf.len() != head_dim {
            return Err(SelectError::SizeMismatch {
                what,
                expected: head_dim,
                got: buf.len(),
            });
        }
    }
    let mut rows = keys.chunks_exact(head_dim);
    // Non-empty and a multiple of head_dim, checked above.
    let Some(first) = rows.next() else {
        return Ok(());
    };
    upper.copy_from_slice(first);
    lower.copy_from_slice(first);
    for row in rows {
        for ((u, l), &k) in upper.iter_mut().zip(lower.iter_mut()).zip(row) {
            *u = u.max(k);
            *l = l.min(k);
        }
    }
    if kind == SummaryKind::ArkVale {
        let tokens = (keys.len() / head_dim) as f32;
        for i in 0..head_dim {
            let c = (upper[i] + lower[i]) / 2.0;
            let mut dev = 0.0f32;
            for row in keys.chunks_exact(head_dim) {
                dev += (row[i] - c).abs();
            }
            let r = dev / tokens;
            upper[i] = c + r;
            lower[i] = c - r;
        }
    }
    Ok(())
}

/// A borrowed view of the summaries of one KV head: `num_pages` rows of `head_dim` values for
/// the upper vectors, the same for the lower vectors, each contiguous so that scoring streams
/// memory.
#[derive(Debug, Clone, Copy)]
pub struct HeadSummaries<'a> {
    kind: SummaryKind,
    head_dim: usize,
    upper: &'a [f32],
    lower: &'a [f32],
}

impl<'a> HeadSummaries<'a> {
    /// A view over raw buffers (`pages × head_dim` each, page-major) — e.g. summaries read back
    /// from a device, to score them with the CPU reference.
    pub fn new(
        kind: SummaryKind,
        head_dim: usize,
        upper: &'a [f32],
        lower: &'a [f32],
    ) -> Result<Self, SelectError> {
        if head_dim == 0 {
            return Err(SelectError::InvalidConfig("head_dim must be > 0".into()));
        }
        if !upper.len().is_multiple_of(head_dim) {
            return Err(SelectError::SizeMismatch {
                what: "summary upper vectors (a multiple of head_dim)",
                expected: upper.len() / head_dim * head_dim,
                got: upper.len(),
            });
        }
        if lower.len() != upper.len() {
            return Err(SelectError::SizeMismatch {
                what: "summary lower vectors",
                expected: upper.len(),
                got: lower.len(),
            });
        }
        Ok(Self {
            kind,
            head_dim,
            upper,
            lower,
        })
    }

    /// Summary kind the vectors were built with.
    pub fn kind(&self) -> SummaryKind {
        self.kind
    }

    /// Head dimension `d`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Pages summarised.
    pub fn num_pages(&self) -> usize {
        self.upper.len() / self.head_dim
    }

    /// All upper vectors, page-major (`num_pages × head_dim`).
    pub fn upper_all(&self) -> &'a [f32] {
        self.upper
    }

    /// All lower vectors, page-major (`num_pages × head_dim`).
    pub fn lower_all(&self) -> &'a [f32] {
        self.lower
    }

    /// Upper vector of `page`, if summarised.
    pub fn upper(&self, page: usize) -> Option<&'a [f32]> {
        let s = page.checked_mul(self.head_dim)?;
        self.upper.get(s..s + self.head_dim)
    }

    /// Lower vector of `page`, if summarised.
    pub fn lower(&self, page: usize) -> Option<&'a [f32]> {
        let s = page.checked_mul(self.head_dim)?;
        self.lower.get(s..s + self.head_dim)
    }
}

/// The page summaries of one layer: for every KV head, one (upper, lower) pair per **full**
/// page, logical pages `0 .. num_pages()`. The partial last page never has a summary.
///
/// Storage is per KV head, upper vectors contiguous (`pages × head_dim`) and lower vectors
/// contiguous, so that scoring one KV group streams two flat arrays.
#[derive(Debug, Clone)]
pub struct PageSummaries {
    kind: SummaryKind,
    geom: PageGeometry,
    pages: usize,
    upper: Vec<Vec<f32>>,
    lower: Vec<Vec<f32>>,
}

impl PageSummaries {
    /// Empty summaries for pages of geometry `geom`.
    pub fn new(kind: SummaryKind, geom: PageGeometry) -> Self {
        Self {
            kind,
            geom,
            pages: 0,
            upper: vec![Vec::new(); geom.kv_heads],
            lower: vec![Vec::new(); geom.kv_heads],
        }
    }

    /// Summaries from raw per-head buffers (`upper[h]`, `lower[h]`: `pages × head_dim` each,
    /// page-major), e.g. read back from a device. Every head must hold the same page count.
    pub fn from_parts(
        kind: SummaryKind,
        geom: PageGeometry,
        upper: Vec<Vec<f32>>,
        lower: Vec<Vec<f32>>,
    ) -> Result<Self, SelectError> {
        for (what, v) in [("upper heads", &upper), ("lower heads", &lower)] {
            if v.len() != geom.kv_heads {
                return Err(SelectError::SizeMismatch {
                    what,
                    expected: geom.kv_heads,
                    got: v.len(),
                });
            }
        }
        let first = upper.first().map_or(0, Vec::len);
        if !first.is_multiple_of(geom.head_dim) {
            return Err(SelectError::SizeMismatch {
                what: "summary vectors of a head (a multiple of head_dim)",
                expected: first / geom.head_dim * geom.head_dim,
                got: first,
            });
        }
        for v in upper.iter().chain(lower.iter()) {
            if v.len() != first {
                return Err(SelectError::SizeMismatch {
                    what: "summary vectors of a head (all heads equal)",
                    expected: first,
                    got: v.len(),
                });
            }
        }
        Ok(Self {
            kind,
            geom,
            pages: first / geom.head_dim,
            upper,
            lower,
        })
    }

    /// Summary kind.
    pub fn kind(&self) -> SummaryKind {
        self.kind
    }

    /// Page geometry the summaries are for.
    pub fn geometry(&self) -> PageGeometry {
        self.geom
    }

    /// Pages summarised (logical pages `0 .. num_pages()`).
    pub fn num_pages(&self) -> usize {
        self.pages
    }

    /// True when no page is summarised.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The summaries of KV head `head`.
    pub fn head(&self, head: usize) -> Result<HeadSummaries<'_>, SelectError> {
        let (Some(upper), Some(lower)) = (self.upper.get(head), self.lower.get(head)) else {
            return Err(SelectError::OutOfRange {
                what: "kv head",
                index: head,
                limit: self.geom.kv_heads,
            });
        };
        Ok(HeadSummaries {
            kind: self.kind,
            head_dim: self.geom.head_dim,
            upper,
            lower,
        })
    }

    /// Append the summary of the next full page: `head_keys[h]` holds KV head `h`'s keys of the
    /// page, `page_size × head_dim` token-major, every row valid. On error nothing changes.
    pub fn push_page(&mut self, head_keys: &[&[f32]]) -> Result<(), SelectError> {
        let g = self.geom;
        if head_keys.len() != g.kv_heads {
            return Err(SelectError::SizeMismatch {
                what: "key blocks of a page (one per KV head)",
                expected: g.kv_heads,
                got: head_keys.len(),
            });
        }
        let block = g.page_size * g.head_dim;
        for keys in head_keys {
            if keys.len() != block {
                return Err(SelectError::SizeMismatch {
                    what: "keys of a full page (page_size × head_dim)",
                    expected: block,
                    got: keys.len(),
                });
            }
        }
        let d = g.head_dim;
        for ((keys, up), lo) in head_keys
            .iter()
            .zip(self.upper.iter_mut())
            .zip(self.lower.iter_mut())
        {
            let start = up.len();
            up.resize(start + d, 0.0);
            lo.resize(start + d, 0.0);
            // Sizes were validated above, so this cannot fail.
            summarize_block(self.kind, keys, d, &mut up[start..], &mut lo[start..])?;
        }
        self.pages += 1;
        Ok(())
    }

    /// Summarise every page of `layer` of `cache` that became full since the last call
    /// (pages `num_pages() .. cache.len(layer) / page_size`). Returns how many were added.
    ///
    /// Fails (changing nothing) when the cache's geometry differs, the layer does not exist, or the
    /// summaries are ahead of the cache (it was truncated: call [`truncate`](Self::truncate)).
    pub fn update_from_cache(
        &mut self,
        cache: &PagedKvCache,
        layer: usize,
    ) -> Result<usize, SelectError> {
        let cg = cache.geometry();
        if cg != self.geom {
            return Err(SelectError::GeometryMismatch {
                summaries: format!("{:?}", self.geom),
                cache: format!("{cg:?}"),
            });
        }
        if layer >= cache.layers() {
            return Err(SelectError::OutOfRange {
                what: "layer",
                index: layer,
                limit: cache.layers(),
            });
        }
        let full = cache.len(layer) / self.geom.page_size;
        if self.pages > full {
            return Err(SelectError::SummariesAhead {
                summarised: self.pages,
                full,
            });
        }
        let added = full - self.pages;
        if added == 0 {
            return Ok(0);
        }
        let _span = tracing::debug_span!("update_summaries", layer, added).entered();
        let mut blocks: Vec<&[f32]> = Vec::with_capacity(self.geom.kv_heads);
        for page in self.pages..full {
            blocks.clear();
            for h in 0..self.geom.kv_heads {
                blocks.push(cache.keys(layer, page, h)?);
            }
            self.push_page(&blocks)?;
        }
        Ok(added)
    }

    /// Keep only the summaries of pages `0 .. pages` (no-op when there are fewer).
    pub fn truncate(&mut self, pages: usize) {
        if pages >= self.pages {
            return;
        }
        let keep = pages * self.geom.head_dim;
        for v in self.upper.iter_mut().chain(self.lower.iter_mut()) {
            v.truncate(keep);
        }
        self.pages = pages;
    }

    /// Drop every summary.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes of summary data held (upper and lower, all heads).
    pub fn bytes(&self) -> usize {
        2 * self.pages * self.geom.kv_heads * self.geom.head_dim * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minmax_by_hand() {
        // 3 tokens, d = 2
        let keys = [1.0, -2.0, 3.0, 0.5, -1.0, 4.0];
        let (mut u, mut l) = ([0.0; 2], [0.0; 2]);
        summarize_block(SummaryKind::MinMax, &keys, 2, &mut u, &mut l).unwrap();
        assert_eq!(u, [3.0, 4.0]);
        assert_eq!(l, [-1.0, -2.0]);
    }

    #[test]
    fn arkvale_by_hand() {
        // dim 0: values 1, 3, -1 → c = 1, |dev| = 0, 2, 2 → r = 4/3
        // dim 1: values -2, 0.5, 4 → c = 1, |dev| = 3, 0.5, 3 → r = 6.5/3
        let keys = [1.0, -2.0, 3.0, 0.5, -1.0, 4.0];
        let (mut u, mut l) = ([0.0; 2], [0.0; 2]);
        summarize_block(SummaryKind::ArkVale, &keys, 2, &mut u, &mut l).unwrap();
        let r0 = 4.0f32 / 3.0;
        let r1 = 6.5f32 / 3.0;
        assert_eq!(u, [1.0 + r0, 1.0 + r1]);
        assert_eq!(l, [1.0 - r0, 1.0 - r1]);
    }

    #[test]
    fn arkvale_box_is_not_a_bound() {
        // keys 0, 5, 10 (d = 1): c = 5, r = (5 + 0 + 5) / 3 → box [1.67, 8.33]; min/max [0, 10]
        let keys = [0.0, 5.0, 10.0];
        let (mut u, mut l) = ([0.0; 1], [0.0; 1]);
        summarize_block(SummaryKind::ArkVale, &keys, 1, &mut u, &mut l).unwrap();
        let score = crate::page_score(&[1.0], &u, &l).unwrap();
        assert!(score < 10.0, "q·k = 10 exceeds the ArkVale score {score}");
        summarize_block(SummaryKind::MinMax, &keys, 1, &mut u, &mut l).unwrap();
        assert_eq!(crate::page_score(&[1.0], &u, &l).unwrap(), 10.0);
    }

    #[test]
    fn summarize_rejects_bad_sizes() {
        let (mut u, mut l) = ([0.0; 2], [0.0; 2]);
        assert!(summarize_block(SummaryKind::MinMax, &[], 2, &mut u, &mut l).is_err());
        assert!(summarize_block(SummaryKind::MinMax, &[1.0; 3], 2, &mut u, &mut l).is_err());
        assert!(summarize_block(SummaryKind::MinMax, &[1.0; 4], 0, &mut u, &mut l).is_err());
        let mut short = [0.0; 1];
        assert!(summarize_block(SummaryKind::MinMax, &[1.0; 4], 2, &mut short, &mut l).is_err());
    }

    #[test]
    fn push_page_and_views() {
        let g = PageGeometry::new(2, 2, 2).unwrap();
        let mut s = PageSummaries::new(SummaryKind::MinMax, g);
        let h0 = [1.0, 2.0, 3.0, -4.0];
        let h1 = [0.0, 0.0, -1.0, 1.0];
        s.push_page(&[&h0, &h1]).unwrap();
        assert_eq!(s.num_pages(), 1);
        let v = s.head(0).unwrap();
        assert_eq!(v.upper(0).unwrap(), &[3.0, 2.0]);
        assert_eq!(v.lower(0).unwrap(), &[1.0, -4.0]);
        assert!(v.upper(1).is_none());
        let v1 = s.head(1).unwrap();
        assert_eq!(v1.upper(0).unwrap(), &[0.0, 1.0]);
        assert_eq!(v1.lower(0).unwrap(), &[-1.0, 0.0]);
        assert!(s.head(2).is_err());
        // wrong head count / block size change nothing
        assert!(s.push_page(&[&h0]).is_err());
        assert!(s.push_page(&[&h0, &h1[..3]]).is_err());
        assert_eq!(s.num_pages(), 1);
        assert_eq!(s.bytes(), 2 * 2 * 2 * 4);
        s.truncate(0);
        assert!(s.is_empty());
        assert_eq!(s.head(0).unwrap().num_pages(), 0);
    }

    #[test]
    fn from_parts_validates() {
        let g = PageGeometry::new(4, 2, 2).unwrap();
        let ok = PageSummaries::from_parts(
            SummaryKind::ArkVale,
            g,
            vec![vec![1.0; 4], vec![2.0; 4]],
            vec![vec![0.0; 4], vec![0.0; 4]],
        )
        .unwrap();
        assert_eq!(ok.num_pages(), 2);
        assert_eq!(ok.kind(), SummaryKind::ArkVale);
        assert!(
            PageSummaries::from_parts(SummaryKind::MinMax, g, vec![vec![1.0; 4]], vec![]).is_err()
        );
        assert!(
            PageSummaries::from_parts(
                SummaryKind::MinMax,
                g,
                vec![vec![1.0; 4], vec![2.0; 2]],
                vec![vec![0.0; 4], vec![0.0; 4]],
            )
            .is_err()
        );
        assert!(
            PageSummaries::from_parts(
                SummaryKind::MinMax,
                g,
                vec![vec![1.0; 3], vec![2.0; 3]],
                vec![vec![0.0; 3], vec![0.0; 3]],
            )
            .is_err()
        );
        assert!(HeadSummaries::new(SummaryKind::MinMax, 2, &[1.0; 4], &[1.0; 2]).is_err());
        assert!(HeadSummaries::new(SummaryKind::MinMax, 0, &[], &[]).is_err());
    }

    #[test]
    fn kind_names_round_trip() {
        for k in SummaryKind::ALL {
            assert_eq!(k.name().parse::<SummaryKind>().unwrap(), k);
            assert_eq!(k.to_string(), k.name());
        }
        assert_eq!("Quest".parse::<SummaryKind>().unwrap(), SummaryKind::MinMax);
        assert_eq!("arkv".parse::<SummaryKind>().unwrap(), SummaryKind::ArkVale);
        assert!("box".parse::<SummaryKind>().is_err());
        assert_eq!(SummaryKind::default(), SummaryKind::MinMax);
    }
}
