//! The CUDA backend of the decoder: bf16 weights on the device, a paged NHD KV cache holding the
//! full KV of every sequence on the GPU, chunked prefill, batched decode of ragged sequences with
//! the decode step replayed as a CUDA graph, and token selection on the device.
//!
//! * [`CudaLlama`] loads a GGUF model (matrices dequantized on the host, converted to bf16 and
//!   uploaded once; Q/K/V and gate/up fused into one matrix each) or builds a
//!   [synthetic](SYNTHETIC_MODELS) one with seeded random weights generated on the device.
//! * [`CudaBatch`] holds the device state of a fixed set of sequences: per layer one KV pool
//!   `[pages][2][page_size][kv_heads][head_dim]` (bf16, K then V), one page-table row per
//!   sequence, their lengths, and the activations of one step.
//! * [`CudaLlama::prefill`] runs a prompt in chunks with causal paged attention;
//!   [`CudaLlama::decode_step`] runs one token of every sequence (split-K paged attention over
//!   each sequence's own length); [`CudaLlama::argmax`] / [`CudaLlama::sample`] pick tokens on
//!   the device; [`CudaLlama::generate`] is the generation loop.
//!
//! Numerics: bf16 storage (weights, activations, residual stream, KV), fp32 accumulation in
//! every product, norm and softmax; f32 logits.
//!
//! ```
//! use std::sync::Arc;
//! use freekv_model::cuda::{BatchOptions, CudaLlama};
//!
//! let gpu = match freekv_model::cuda::gpu() {
//!     Ok(g) => g,
//!     Err(e) if e.is_unavailable() => return Ok(()), // no CUDA here: nothing to show
//!     Err(e) => return Err(e.into()),
//! };
//! let model = CudaLlama::synthetic(gpu, "smollm2-135m", 7)?;
//! assert!(model.source().is_synthetic());
//! let mut batch = model.new_batch(BatchOptions { max_seqs: 2, max_seq_len: 64, ..Default::default() })?;
//! model.prefill(&mut batch, 0, &[1, 2, 3])?;
//! model.prefill(&mut batch, 1, &[4, 5])?;
//! let next = model.argmax(&mut batch)?;
//! model.decode_step(&mut batch, &next)?;
//! assert_eq!(batch.lens(), &[4, 3]);
//! # Ok::<(), freekv_model::ModelError>(())
//! ```

mod blas;
mod decoder;
mod generate;
pub mod sparse;
pub mod sparse_plan;
mod synthetic;
mod weights;

use std::sync::Arc;

/// The device handle and its error type, re-exported for callers of this module.
pub use freekv_kernels::probe::cuda_available;
pub use freekv_kernels::{Gpu, KernelError};

pub use decoder::{BatchOptions, CudaBatch, CudaLlama, ModelSource, SparseSnapshot, StepMode};
pub use generate::GRAPH_ENV;
pub use sparse::{GpuKvOptions, GpuKvStats, GpuRecall};
pub use synthetic::{
    MAX_PERSISTENT_SHARE, PERSISTENT_DIMS, PERSISTENT_EMBD_STD, SYNTHETIC_MODELS, SYNTHETIC_PREFIX,
    SyntheticSpec, decode_weight_bytes, kv_bytes_per_token, synthetic_config, synthetic_name,
};

/// Device 0 with every kernel compiled; the error says what is missing when there is no usable
/// CUDA ([`freekv_kernels::KernelError::is_unavailable`] tells a missing GPU from a bug).
pub fn gpu() -> Result<Arc<freekv_kernels::Gpu>, freekv_kernels::KernelError> {
    freekv_kernels::Gpu::new(0).map(Arc::new)
}
