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
    /// The host KV pool would exceed its byte limit (`HostPoolConfig::max_bytes`).
    #[error(
        "host KV pool limit reached: {what} needs {needed_bytes} more bytes, but {reserved_bytes} \
         of the {limit_bytes}-byte limit are reserved (lower the batch size or the context \
         length, or raise the host KV limit)"
    )]
    HostPoolFull {
        /// What was being allocated.
        what: String,
        /// Bytes the request still needed after reusing free pages.
        needed_bytes: u64,
        /// Bytes the pool already holds.
        reserved_bytes: u64,
        /// The configured limit.
        limit_bytes: u64,
    },
    /// A request or configuration the CUDA recall rejects (bad sizes, an index out of range, a
    /// page that is not allocated).
    #[error("invalid CUDA recall request: {0}")]
    InvalidRequest(String),
    /// A kernel launcher or a device buffer helper of freekv-kernels failed (its message).
    #[error("CUDA kernel error: {0}")]
    Kernel(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {what}: {source}")]
    Driver {
        /// The operation.
        what: String,
        /// The driver's error code.
        #[source]
        source: freekv_kernels::cudarc::driver::DriverError,
    },
}

impl From<freekv_kernels::KernelError> for RecallError {
    fn from(e: freekv_kernels::KernelError) -> Self {
        RecallError::Kernel(e.to_string())
    }
}

impl RecallError {
    /// A closure mapping a driver error to [`RecallError::Driver`] with `what`.
    pub(crate) fn driver(
        what: impl Into<String>,
    ) -> impl FnOnce(freekv_kernels::cudarc::driver::DriverError) -> Self {
        let what = what.into();
        move |source| RecallError::Driver { what, source }
    }
}
