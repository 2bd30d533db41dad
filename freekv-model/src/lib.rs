//! GGUF loading, the byte-level BPE tokenizer, the CPU Llama decoder, the KV-policy seam where
//! FreeKV policies plug in, sampling and generation.
//!
//! * [`gguf`] reads GGUF v2/v3 files over a memory map (and [`gguf::GgufWriter`] builds them);
//!   [`quant`] dequantizes ggml blocks; [`config::LlamaConfig`] holds the hyperparameters.
//! * [`tokenizer`] is the GPT-2 byte-level BPE tokenizer; [`chat`] renders ChatML and Llama 3
//!   prompts.
//! * [`qmatmul`] multiplies quantized weights with `f32` activations on the persistent thread
//!   pool [`parallel`]; [`attention`] holds the GQA attention kernels over paged KV blocks and the
//!   [`KvPolicy`] trait; [`llama::LlamaModel`] runs prefill and decode over a
//!   [`llama::Session`] (paged KV cache + policy).
//! * [`kv`] builds the FreeKV policies (`full`, `quest`, `arkvale`, `freekv`) that plug into a
//!   session; [`eval`] measures them (passkey accuracy, teacher-forced fidelity).
//! * [`sampling`] picks tokens; [`generate`](mod@generate) runs the prefill + decode loop with
//!   streaming, stop conditions and cancellation; [`testing`] has tiny random models and
//!   reference helpers.
//!
//! A tiny random model, end to end:
//!
//! ```
//! use std::sync::{Arc, atomic::AtomicBool};
//! use freekv_model::testing::{TinyConfig, tiny_random_model};
//! use freekv_model::{GenerateOptions, Generator, LlamaModel, Tokenizer};
//!
//! let gguf = Arc::new(tiny_random_model(42, &TinyConfig::default())?);
//! let tokenizer = Tokenizer::from_gguf(&gguf)?;
//! let model = LlamaModel::new(gguf)?;
//! let prompt = tokenizer.encode("the cat and the hat", false)?;
//! let opts = GenerateOptions { max_new_tokens: 8, ..Default::default() };
//! let mut generator = Generator::new(&model, &tokenizer)?;
//! let out = generator.generate(&prompt, &opts, &AtomicBool::new(false), &mut |_id| {})?;
//! assert!(!out.generated_ids.is_empty() && out.generated_ids.len() <= 8);
//! assert_eq!(out.timings.prompt_tokens, prompt.len());
//! # Ok::<(), freekv_model::ModelError>(())
//! ```

pub mod attention;
pub mod chat;
pub mod config;
pub mod cuda;
mod error;
pub mod eval;
pub mod generate;
pub mod ggml;
pub mod gguf;
pub mod kv;
pub mod llama;
pub mod paths;
pub mod qmatmul;
pub mod quant;
pub mod sampling;
pub mod testing;
pub mod tokenizer;

/// The persistent fork-join thread pool (compiled as part of [`qmatmul`]).
pub use qmatmul::parallel;

pub use attention::{AttnShape, DenseKv, KvBlock, KvBlocks, KvPolicy, LayerStep};
pub use chat::ChatTemplate;
pub use config::LlamaConfig;
pub use error::ModelError;
pub use generate::{GenerateOptions, Generation, Generator, StopReason, Timings, generate};
pub use ggml::GgmlType;
pub use gguf::GgufFile;
pub use llama::{LlamaModel, Session};
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{StreamDecoder, Tokenizer};
