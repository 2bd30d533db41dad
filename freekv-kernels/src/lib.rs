//! Raw CUDA kernels of FreeKV (`.cu` sources compiled at run time by NVRTC) and typed launchers.
//! (Being written; see docs/ARCHITECTURE.md.)

mod error;
pub use error::KernelError;
