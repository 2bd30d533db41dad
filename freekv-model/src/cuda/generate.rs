//! Text generation on the CUDA decoder: prefill, then decode steps (CUDA graph replays) with the
//! token picked on the device; only token ids cross to the host.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::decoder::{BatchOptions, CudaLlama};
use super::sparse::{GpuKvOptions, GpuKvStats};
use crate::ModelError;
use crate::generate::{GenerateOptions, Generation, StopReason, Timings};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;

/// `FREEKV_CUDA_GRAPH=0` makes [`CudaLlama::generate`] decode eagerly, without capturing the
/// step as a CUDA graph (diagnostics: compute-sanitizer runs, graph-versus-eager checks).
pub const GRAPH_ENV: &str = "FREEKV_CUDA_GRAPH";

fn graphs_enabled() -> bool {
    std::env::var(GRAPH_ENV).map_or(true, |v| v.trim() != "0")
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

impl CudaLlama {
    /// Generates a continuation of `prompt_ids` on the device, like
    /// [`crate::Generator::generate`]: greedy or sampled per `opts.sampling` (the device's
    /// sampling kernel, uniform numbers from the seeded host generator), stops at an
    /// end-of-generation token of `tokenizer` (when given and `opts.stop_at_eog`), at
    /// `opts.max_new_tokens`, at the context limit or when `cancel` is raised.
    ///
    /// Differences from the CPU path: no top log-probabilities (`top_logprobs` stays empty:
    /// logits stay on the device); without a tokenizer (synthetic models) the text is empty.
    pub fn generate(
        &self,
        tokenizer: Option<&Tokenizer>,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation, ModelError> {
        self.generate_with_kv(tokenizer, prompt_ids, opts, None, cancel, on_token)
            .map(|(g, _)| g)
    }

    /// [`generate`](Self::generate) with a KV policy (`None` or `full`: everything on the
    /// device); also returns the policy's statistics.
    pub fn generate_with_kv(
        &self,
        tokenizer: Option<&Tokenizer>,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        kv: Option<GpuKvOptions>,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<(Generation, Option<GpuKvStats>), ModelError> {
        let _span = tracing::debug_span!("cuda_generate", prompt = prompt_ids.len()).entered();
        opts.sampling.validate()?;
        if prompt_ids.is_empty() {
            return Err(ModelError::Prompt("the prompt is empty".into()));
        }
        let ctx = self.config().context_length;
        if prompt_ids.len() > ctx {
            return Err(ModelError::Prompt(format!(
                "the prompt has {} tokens, more than the context of {ctx} tokens",
                prompt_ids.len()
            )));
        }
        let cap = (prompt_ids.len() + opts.max_new_tokens).clamp(1, ctx);
        let mut batch = match kv {
            Some(kv) => {
                let page_size = kv.kv.page_size;
                self.new_batch_with_kv(
                    BatchOptions {
                        max_seq_len: cap,
                        page_size,
                        use_graph: graphs_enabled(),
                        ..BatchOptions::default()
                    },
                    kv,
                )?
            }
            None => self.new_batch(BatchOptions {
                max_seq_len: cap,
                use_graph: graphs_enabled(),
                ..BatchOptions::default()
            })?,
        };
        let mut rng = Rng::new(opts.sampling.seed);
        let mut timings = Timings {
            prompt_tokens: prompt_ids.len(),
            ..Timings::default()
        };
        let mut generated = Vec::new();
        let t0 = Instant::now();
        let mut stop = StopReason::MaxTokens;
        if cancel.load(Ordering::Relaxed) {
            stop = StopReason::Cancelled;
        } else {
            self.prefill(&mut batch, 0, prompt_ids)?;
            self.gpu().synchronize()?;
        }
        timings.prefill_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if stop != StopReason::Cancelled {
            loop {
                if generated.len() >= opts.max_new_tokens {
                    stop = StopReason::MaxTokens;
                    break;
                }
                if cancel.load(Ordering::Relaxed) {
                    stop = StopReason::Cancelled;
                    break;
                }
                let u = rng.next_f64() as f32;
                let ids = self.sample(&mut batch, &opts.sampling, &[u])?;
                let t = *ids
                    .first()
                    .ok_or_else(|| ModelError::Config("the device returned no token".into()))?;
                generated.push(t);
                if opts.stop_at_eog && tokenizer.is_some_and(|tk| tk.is_eog(t)) {
                    stop = StopReason::Eog;
                    break;
                }
                on_token(t);
                if generated.len() >= opts.max_new_tokens {
                    stop = StopReason::MaxTokens;
                    break;
                }
                if batch.lens().first().copied().unwrap_or(cap) >= cap {
                    stop = StopReason::Context;
                    break;
                }
                if cancel.load(Ordering::Relaxed) {
                    stop = StopReason::Cancelled;
                    break;
                }
                self.decode_step(&mut batch, &[t])?;
                timings.decode_tokens += 1;
            }
        }
        timings.decode_s = t1.elapsed().as_secs_f64();
        timings.prefill_tok_s = rate(timings.prompt_tokens, timings.prefill_s);
        timings.decode_tok_s = rate(timings.decode_tokens, timings.decode_s);
        let text_ids = match (stop, generated.split_last()) {
            (StopReason::Eog, Some((_, rest))) => rest,
            _ => generated.as_slice(),
        };
        let text = match tokenizer {
            Some(tk) => tk.decode(text_ids)?,
            None => String::new(),
        };
        if let Some(e) = batch.graph_error() {
            tracing::warn!("decoded without a CUDA graph: {e}");
        }
        let stats = batch.kv_stats()?.cloned();
        Ok((
            Generation {
                prompt_ids: prompt_ids.to_vec(),
                generated_ids: generated,
                text,
                top_logprobs: Vec::new(),
                timings,
                stop,
            },
            stats,
        ))
    }
}
