//! Typed launchers, as methods of [`crate::Kernels`]. Each validates sizes, strides and
//! alignment on the host and returns [`crate::KernelError`] naming the kernel on failure; launches
//! are asynchronous on the given stream.

pub mod attention;
pub mod elementwise;
pub mod gemm_native;
pub mod gemv;
pub mod init;
pub mod recall;
pub mod sampling;
pub mod select;
