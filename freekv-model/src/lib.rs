//! GGUF loading, the byte-level BPE tokenizer, a Llama decoder (CPU and CUDA), FreeKV KV policies
//! and generation.
//! (Being written; see docs/ARCHITECTURE.md.)

pub mod attention;
pub mod chat;
pub mod config;
mod error;
pub mod generate;
pub mod ggml;
pub mod gguf;
pub mod llama;
pub mod qmatmul;
pub mod quant;
pub mod sampling;
pub mod testing;
pub mod tokenizer;

pub use error::ModelError;
pub use ggml::GgmlType;
