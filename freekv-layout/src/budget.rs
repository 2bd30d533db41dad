//! The resident budget of one layer: how many page slots hold sinks, retrieved pages and the
//! recent window.

use crate::LayoutError;
use std::ops::Range;

/// The per-layer resident budget, in pages (efficiency-path semantics of the spec, §1.2).
///
/// The `nb = sink + retrieved + window` slots of a layer are laid out as
///
/// | slots | holds |
/// |---|---|
/// | `0 .. ns` | the first `ns` logical pages (attention sinks), never evicted |
/// | `ns .. ns+k` | the `k` retrieved ("middle") pages, replaced by selection |
/// | `ns+k .. nb` | a ring of `nw` slots: the `nw − 1` most recent full pages and the current page |
///
/// Construct it with [`Budget::from_tokens`] (what users pass: the total budget `B` *including*
/// sink and window, like the paper's `B = 2048`) or [`Budget::new`] (pages). Both validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Budget {
    sink_pages: usize,
    retrieved_pages: usize,
    window_pages: usize,
    page_size: usize,
}

/// Hard cap on the pages of one layer's budget: slot ids must fit comfortably in `u32`.
const MAX_BUDGET_PAGES: usize = 1 << 24;

impl Budget {
    /// A budget from page counts. `retrieved_pages` (k) and `window_pages` (the recent window,
    /// current page included) must be ≥ 1; `sink_pages` may be 0.
    pub fn new(
        sink_pages: usize,
        retrieved_pages: usize,
        window_pages: usize,
        page_size: usize,
    ) -> Result<Self, LayoutError> {
        if page_size == 0 {
            return Err(LayoutError::InvalidBudget("page size must be > 0".into()));
        }
        if window_pages == 0 {
            return Err(LayoutError::InvalidBudget(
                "the recent window needs at least one page (the page being filled)".into(),
            ));
        }
        if retrieved_pages == 0 {
            return Err(LayoutError::InvalidBudget(format!(
                "no page left for retrieval: sink {sink_pages} + window {window_pages} pages fill the whole budget"
            )));
        }
        let total = sink_pages
            .checked_add(retrieved_pages)
            .and_then(|x| x.checked_add(window_pages))
            .filter(|&t| t <= MAX_BUDGET_PAGES)
            .ok_or_else(|| {
                LayoutError::InvalidBudget(format!(
                    "budget of {sink_pages} + {retrieved_pages} + {window_pages} pages is larger than {MAX_BUDGET_PAGES} pages"
                ))
            })?;
        total.checked_mul(page_size).ok_or_else(|| {
            LayoutError::InvalidBudget(format!("{total} pages of {page_size} tokens overflow"))
        })?;
        Ok(Self {
            sink_pages,
            retrieved_pages,
            window_pages,
            page_size,
        })
    }

    /// A budget from token counts, as users give it: `budget_tokens` (B) is the total resident
    /// tokens per layer **including** sink and window (efficiency path, spec §1.2):
    /// `nb = ⌊B/P⌋`, `ns = ⌈S/P⌉`, `nw = ⌈W/P⌉`, `k = nb − ns − nw ≥ 1`.
    ///
    /// Sink and window are rounded *up* to whole pages (never fewer tokens than asked), the budget
    /// *down* (never more than asked). `window_tokens` must be ≥ 1: the page being filled is always
    /// resident.
    ///
    /// ```
    /// use freekv_layout::Budget;
    /// let b = Budget::from_tokens(2048, 512, 512, 32).unwrap();
    /// assert_eq!((b.sink_pages(), b.retrieved_pages(), b.window_pages()), (16, 32, 16));
    /// let err = Budget::from_tokens(200, 64, 128, 32).unwrap_err();
    /// assert!(err.to_string().contains("smaller than sink 64 + window 128 + one page of 32"));
    /// ```
    pub fn from_tokens(
        budget_tokens: usize,
        sink_tokens: usize,
        window_tokens: usize,
        page_size: usize,
    ) -> Result<Self, LayoutError> {
        if page_size == 0 {
            return Err(LayoutError::InvalidBudget("page size must be > 0".into()));
        }
        if window_tokens == 0 {
            return Err(LayoutError::InvalidBudget(
                "window must be at least 1 token: the page being filled is always resident".into(),
            ));
        }
        let nb = budget_tokens / page_size;
        let ns = sink_tokens.div_ceil(page_size);
        let nw = window_tokens.div_ceil(page_size);
        let fixed = ns.saturating_add(nw);
        if nb <= fixed {
            let rs = ns.saturating_mul(page_size);
            let rw = nw.saturating_mul(page_size);
            let rounded = if rs != sink_tokens || rw != window_tokens {
                format!(" (sink and window rounded up to whole pages: {rs} and {rw} tokens)")
            } else {
                String::new()
            };
            return Err(LayoutError::InvalidBudget(format!(
                "budget {budget_tokens} tokens is smaller than sink {sink_tokens} + window {window_tokens} + one page of {page_size} tokens{rounded}; raise the budget or lower sink/window"
            )));
        }
        Self::new(ns, nb - fixed, nw, page_size)
    }

    /// Sink pages `ns` (the first `ns` logical pages, always resident).
    pub fn sink_pages(&self) -> usize {
        self.sink_pages
    }

    /// Retrieved ("middle") pages `k`, chosen by selection.
    pub fn retrieved_pages(&self) -> usize {
        self.retrieved_pages
    }

    /// Window pages `nw`: the last `nw` logical pages, the partially filled one included.
    pub fn window_pages(&self) -> usize {
        self.window_pages
    }

    /// Tokens per page `P`.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Total slots per layer `nb = ns + k + nw`.
    pub fn total_pages(&self) -> usize {
        self.sink_pages + self.retrieved_pages + self.window_pages
    }

    /// Resident tokens per layer, `nb · P` (≤ the `budget_tokens` it was built from).
    pub fn total_tokens(&self) -> usize {
        self.total_pages() * self.page_size
    }

    /// Slots of the sink pages: `0 .. ns`.
    pub fn sink_slots(&self) -> Range<usize> {
        0..self.sink_pages
    }

    /// Slots of the retrieved pages: `ns .. ns + k`.
    pub fn middle_slots(&self) -> Range<usize> {
        self.sink_pages..self.sink_pages + self.retrieved_pages
    }

    /// Slots of the window ring: `ns + k .. nb`.
    pub fn ring_slots(&self) -> Range<usize> {
        self.sink_pages + self.retrieved_pages..self.total_pages()
    }

    /// True when a layer with `num_pages` logical pages (partial one included) no longer fits and
    /// runs sparse (selection + recall); at or below `nb` pages everything is resident.
    pub fn is_sparse(&self, num_pages: usize) -> bool {
        num_pages > self.total_pages()
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens = sink {} + retrieved {} + window {} pages of {} tokens",
            self.total_tokens(),
            self.sink_pages,
            self.retrieved_pages,
            self.window_pages,
            self.page_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_defaults() {
        let b = Budget::from_tokens(2048, 512, 512, 32).unwrap();
        assert_eq!(b.sink_pages(), 16);
        assert_eq!(b.retrieved_pages(), 32);
        assert_eq!(b.window_pages(), 16);
        assert_eq!(b.total_pages(), 64);
        assert_eq!(b.total_tokens(), 2048);
        assert_eq!(b.sink_slots(), 0..16);
        assert_eq!(b.middle_slots(), 16..48);
        assert_eq!(b.ring_slots(), 48..64);
        assert!(!b.is_sparse(64));
        assert!(b.is_sparse(65));
        assert_eq!(
            b.to_string(),
            "2048 tokens = sink 16 + retrieved 32 + window 16 pages of 32 tokens"
        );
    }

    #[test]
    fn rounding() {
        // sink 4 tokens → one page; window 40 → two pages; budget 300 → 9 pages.
        let b = Budget::from_tokens(300, 4, 40, 32).unwrap();
        assert_eq!(
            (b.sink_pages(), b.retrieved_pages(), b.window_pages()),
            (1, 6, 2)
        );
        assert!(b.total_tokens() <= 300);
        let b = Budget::from_tokens(96, 0, 1, 32).unwrap();
        assert_eq!(
            (b.sink_pages(), b.retrieved_pages(), b.window_pages()),
            (0, 2, 1)
        );
    }

    #[test]
    fn clear_errors() {
        let e = Budget::from_tokens(256, 64, 192, 32).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid KV budget: budget 256 tokens is smaller than sink 64 + window 192 + one page of 32 tokens; raise the budget or lower sink/window"
        );
        let e = Budget::from_tokens(90, 4, 4, 32).unwrap_err();
        assert!(
            e.to_string()
                .contains("rounded up to whole pages: 32 and 32 tokens"),
            "{e}"
        );
        assert!(Budget::from_tokens(2048, 512, 0, 32).is_err());
        assert!(Budget::from_tokens(2048, 512, 512, 0).is_err());
        assert!(Budget::new(1, 0, 1, 32).is_err());
        assert!(Budget::new(1, 1, 0, 32).is_err());
        assert!(Budget::new(0, 1, 1, 0).is_err());
        assert!(Budget::new(usize::MAX, 1, 1, 1).is_err());
        assert!(Budget::new(1, 1, 1, usize::MAX).is_err());
        assert!(Budget::from_tokens(usize::MAX, usize::MAX, usize::MAX, 1).is_err());
    }
}
