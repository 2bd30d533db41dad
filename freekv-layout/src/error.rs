use thiserror::Error;

/// Everything that can go wrong in page geometry, layouts, tables and pools.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// A geometry dimension was zero or the page would not fit in memory.
    #[error("invalid page geometry: {0}")]
    InvalidGeometry(String),
    /// A buffer handed in has the wrong number of elements.
    #[error("{what}: expected {expected} elements, got {got}")]
    SizeMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// An index (layer, page, head, slot, token) is out of range.
    #[error("{what} index {index} out of range (limit {limit})")]
    OutOfRange {
        what: &'static str,
        index: usize,
        limit: usize,
    },
    /// The host page pool reached its configured maximum.
    #[error(
        "host page pool exhausted: {max_pages} pages of {page_bytes} bytes already in use; raise the host KV limit or shorten the context"
    )]
    PoolExhausted { max_pages: usize, page_bytes: usize },
    /// A page id that is not allocated was used.
    #[error("page {0} is not allocated in this pool")]
    BadPage(u32),
    /// A resident budget (sink / retrieved / window pages) that cannot work.
    #[error("invalid KV budget: {0}")]
    InvalidBudget(String),
    /// A selection of logical pages that cannot be applied (not candidates, duplicates, too many).
    #[error("invalid page selection: {0}")]
    InvalidSelection(String),
    /// A selection diff that does not match the current resident set (stale or malformed).
    #[error("selection diff does not apply to the current resident set: {0}")]
    InvalidDiff(String),
    /// Selection and recall only exist once a layer holds more pages than its budget.
    #[error(
        "the layer is not sparse yet: {pages} pages fit in the budget of {budget_pages} pages, everything is resident"
    )]
    NotSparse { pages: usize, budget_pages: usize },
    /// A page-table invariant does not hold (reported by `check_consistency`; a bug if it fires).
    #[error("page table inconsistent: {0}")]
    Inconsistent(String),
}
