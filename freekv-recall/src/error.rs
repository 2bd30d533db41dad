use thiserror::Error;

/// Everything that can go wrong while planning or executing a recall.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecallError {
    /// A plan entry names a page, slot, head or sequence that does not exist, two entries write
    /// the same destination, or the target's buffers disagree on the page geometry.
    #[error("invalid recall plan: {0}")]
    InvalidPlan(String),
    /// The executor's worker threads are gone (the executor was dropped or a worker failed).
    #[error("recall executor stopped: {0}")]
    Stopped(String),
    /// A lock around a host or resident buffer was poisoned by a panic elsewhere.
    #[error("recall buffer lock poisoned: {0}")]
    LockPoisoned(String),
    /// Layout error from freekv-layout (a page released between planning and execution, ...).
    #[error(transparent)]
    Layout(#[from] freekv_layout::LayoutError),
}
