use thiserror::Error;

/// Everything that can go wrong while summarising, scoring or selecting pages.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SelectError {
    /// A buffer handed in has the wrong number of elements.
    #[error("{what}: expected {expected} elements, got {got}")]
    SizeMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A configuration value is outside its valid range.
    #[error("invalid selection config: {0}")]
    InvalidConfig(String),
    /// The correction threshold τ is not a finite number in [−1, 1].
    #[error(
        "correction threshold tau = {0} is invalid: it must be a finite number in [-1, 1] (use `always` to correct every step)"
    )]
    InvalidTau(f32),
    /// A name (group policy, summary kind, correction aggregate) was not recognised.
    #[error("unknown {what} `{name}` (expected one of: {expected})")]
    UnknownName {
        what: &'static str,
        name: String,
        expected: &'static str,
    },
    /// An index (KV head, layer, page) is out of range.
    #[error("{what} index {index} out of range (limit {limit})")]
    OutOfRange {
        what: &'static str,
        index: usize,
        limit: usize,
    },
    /// The page geometry of a KV cache differs from the one the summaries were built for.
    #[error("page geometry mismatch: summaries are for {summaries}, the cache has {cache}")]
    GeometryMismatch { summaries: String, cache: String },
    /// Summaries of a different kind than the selector was configured for were passed in.
    #[error("summary kind mismatch: selector expects {expected}, summaries are {got}")]
    SummaryKindMismatch {
        expected: &'static str,
        got: &'static str,
    },
    /// The summaries hold more pages than the KV cache has full pages (the cache was truncated
    /// or cleared without truncating the summaries).
    #[error(
        "summaries cover {summarised} pages but the cache layer has only {full} full pages; truncate the summaries first"
    )]
    SummariesAhead { summarised: usize, full: usize },
    /// A candidate page has no summary yet.
    #[error(
        "candidate pages up to {needed} need summaries but only {have} pages are summarised (update the summaries when a page fills)"
    )]
    MissingSummaries { needed: usize, have: usize },
    /// A page list (selection or resident set) is inconsistent.
    #[error("invalid {what}: {reason}")]
    InvalidPageSet { what: &'static str, reason: String },
    /// Layout error from freekv-layout.
    #[error(transparent)]
    Layout(#[from] freekv_layout::LayoutError),
}
