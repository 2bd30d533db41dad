//! CUDA kernels of FreeKV and their typed launchers.
//!
//! * [`probe`]: checks the driver, device, NVRTC and cuBLAS **without panicking** (cudarc loads the
//!   libraries lazily and panics when one is missing), so callers can fall back to the CPU.
//! * [`compile`]: the `.cu` sources are embedded with `include_str!` and compiled at run time by
//!   NVRTC straight to CUBIN for the device's architecture (`sm_90` on an H200), once per process,
//!   and cached on disk under `$FREEKV_HOME/kernels` keyed by a hash of (source, options, NVRTC
//!   version, architecture).
//! * [`Gpu`]: context (cudarc event tracking disabled: synchronisation is explicit), compute
//!   stream, [`Kernels`] (every function resolved once into a field) and the matrix products
//!   ([`Matmul`]: cuBLAS [`Gemm`] or the native tensor-core GEMM, chosen by `FREEKV_GEMM`).
//! * Kernels (bf16 storage, fp32 math): embedding gather, fused residual add + RMSNorm, RoPE (both
//!   pairings), SwiGLU, KV append into NHD pages, paged decode attention (split-K, GQA-aware, head
//!   dims 64 and 128), causal paged prefill attention on tensor cores, argmax and sampling.
//!
//! Page layout (NHD, device): `pages[num_pages][2][page_size][kv_heads][head_dim]`, K then V, as
//! [`freekv_layout::PageGeometry::nhd_index`].
//!
//! ```
//! use freekv_kernels::{probe, KernelError};
//!
//! // Never panics: on a machine without CUDA this is an error to fall back on.
//! match probe::check_device(0) {
//!     Ok(version) => println!("CUDA driver {version}"),
//!     Err(e @ (KernelError::NoDriver | KernelError::NoDevice(_) | KernelError::DriverTooOld { .. })) => {
//!         println!("falling back to the CPU: {e}")
//!     }
//!     Err(e) => println!("CUDA problem: {e}"),
//! }
//! ```

pub mod compile;
mod error;
pub mod gemm;
mod gpu;
pub mod host;
pub mod kernels;
pub mod ops;
pub mod probe;
pub mod testing;

pub use error::KernelError;
pub use gemm::{Gemm, GemmBackend, GemmChoice, LinearDims, Matmul};
pub use gpu::Gpu;
pub use host::{MAX_MAPPED_BYTES, MappedHostBuffer, REGISTER_PIECE_BYTES};
pub use kernels::{DECODE_COMPACT_PAGES, Kernels, Strided, masked_decode_compacts};
pub use ops::attention::{AttentionShape, DecodePlan, HeadMask, PrefillPlan};
pub use ops::elementwise::{KvSource, PageTableLayout, RopeConfig, RopeLayout, RopeStyle};
pub use ops::recall::DeviceCounters;
pub use ops::sampling::SamplingInputs;
pub use ops::select::{FREEKV_MAX_HEAD_DIM, FreeKvShape, HeadFilter, SEQ_INFO_WIDTH, SelectCache};
pub use probe::DeviceInfo;

/// Re-exported so callers name the same cudarc and half types.
pub use cudarc;
pub use half;
