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
    /// Layout error from freekv-layout.
    #[error(transparent)]
    Layout(#[from] freekv_layout::LayoutError),
}
