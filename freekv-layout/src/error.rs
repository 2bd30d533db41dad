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
}
