use thiserror::Error;

/// Everything that can go wrong while probing CUDA, compiling or launching kernels.
#[derive(Debug, Error)]
pub enum KernelError {
    /// No usable CUDA driver or device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A launch argument is inconsistent.
    #[error("invalid kernel argument: {0}")]
    InvalidArgument(String),
}
