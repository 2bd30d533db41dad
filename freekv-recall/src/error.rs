use thiserror::Error;

/// Everything that can go wrong while planning or executing a recall.
#[derive(Debug, Error)]
pub enum RecallError {
    /// A plan entry names a page, slot or head that does not exist.
    #[error("invalid recall plan: {0}")]
    InvalidPlan(String),
    /// The executor's worker thread is gone.
    #[error("recall executor stopped: {0}")]
    Stopped(String),
    /// Layout error from freekv-layout.
    #[error(transparent)]
    Layout(#[from] freekv_layout::LayoutError),
}
