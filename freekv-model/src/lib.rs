//! GGUF loading, the byte-level BPE tokenizer, a Llama decoder (CPU and CUDA), FreeKV KV policies
//! and generation.
//! (Being written; see docs/ARCHITECTURE.md.)

mod error;
pub mod ggml;

pub use error::ModelError;
pub use ggml::GgmlType;
