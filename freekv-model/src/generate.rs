//! Text generation: prompt ids → prefill → a decode loop that samples, streams tokens to a
//! callback, stops at an end-of-generation token, the token limit or the context limit, and can
//! be cancelled between tokens.
//!
//! ```
//! use std::sync::{Arc, atomic::AtomicBool};
//! use freekv_model::generate::{GenerateOptions, Generator, StopReason};
//! use freekv_model::llama::LlamaModel;
//! use freekv_model::testing::{TinyConfig, tiny_random_model};
//! use freekv_model::tokenizer::Tokenizer;
//! let g = Arc::new(tiny_random_model(1, &TinyConfig::default()).unwrap());
//! let tok = Tokenizer::from_gguf(&g).unwrap();
//! let model = LlamaModel::new(g).unwrap();
//! let mut generator = Generator::new(&model, &tok).unwrap();
//! let prompt = tok.encode("the cat", false).unwrap();
//! let opts = GenerateOptions { max_new_tokens: 5, stop_at_eog: false, ..Default::default() };
//! let out = generator.generate(&prompt, &opts, &AtomicBool::new(false), &mut |_| {}).unwrap();
//! assert_eq!(out.generated_ids.len(), 5);
//! assert_eq!(out.stop, StopReason::MaxTokens);
//! assert_eq!(out.top_logprobs[0].len(), 5);
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::ModelError;
use crate::attention::KvPolicy;
use crate::llama::{DEFAULT_PAGE_SIZE, LlamaModel, Session};
use crate::sampling::{Sampler, SamplingParams, top_logprobs};
use crate::tokenizer::Tokenizer;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenerateOptions {
    /// Upper bound on generated tokens (an end-of-generation token counts).
    pub max_new_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// Stop at the tokenizer's end-of-generation tokens.
    pub stop_at_eog: bool,
    /// Log-probabilities reported per step (the most likely tokens; 0: none).
    pub top_logprobs: usize,
}

impl Default for GenerateOptions {
    /// 128 tokens, greedy, stop at end-of-generation, top-5 log-probabilities.
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            sampling: SamplingParams::greedy(),
            stop_at_eog: true,
            top_logprobs: 5,
        }
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// An end-of-generation token was generated.
    Eog,
    /// `max_new_tokens` were generated.
    #[serde(rename = "length")]
    MaxTokens,
    /// The context is full.
    Context,
    /// The cancel flag was raised.
    Cancelled,
}

impl StopReason {
    /// `"eog"`, `"length"`, `"context"` or `"cancelled"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Eog => "eog",
            Self::MaxTokens => "length",
            Self::Context => "context",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token and its log-probability.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// Natural log of its probability under the model (temperature 1, no truncation).
    pub logprob: f32,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Seconds in prefill.
    pub prefill_s: f64,
    /// Prompt tokens per second.
    pub prefill_tok_s: f64,
    /// Decode steps run (generated tokens fed back through the model).
    pub decode_tokens: usize,
    /// Seconds from the end of prefill to the end of generation.
    pub decode_s: f64,
    /// Decode steps per second.
    pub decode_tok_s: f64,
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

/// The result of one generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Generation {
    /// The prompt.
    pub prompt_ids: Vec<u32>,
    /// Generated tokens, a final end-of-generation token included.
    pub generated_ids: Vec<u32>,
    /// The generated text (without a final end-of-generation token).
    pub text: String,
    /// Per generated token, the most likely tokens of that step with their log-probabilities.
    pub top_logprobs: Vec<Vec<TokenLogprob>>,
    /// Timings.
    pub timings: Timings,
    /// Why it stopped.
    #[serde(rename = "stop_reason")]
    pub stop: StopReason,
}

impl Generation {
    /// Whether generation was cancelled (the tokens so far are kept).
    pub fn cancelled(&self) -> bool {
        self.stop == StopReason::Cancelled
    }
}

/// Runs generations of one model with one tokenizer on a reusable session.
#[derive(Debug)]
pub struct Generator<'m> {
    model: &'m LlamaModel,
    tokenizer: &'m Tokenizer,
    session: Session,
}

impl<'m> Generator<'m> {
    /// A generator with dense attention and the default page size.
    pub fn new(model: &'m LlamaModel, tokenizer: &'m Tokenizer) -> Result<Self, ModelError> {
        Ok(Self::with_session(
            model,
            tokenizer,
            model.session(DEFAULT_PAGE_SIZE)?,
        ))
    }

    /// A generator whose decode steps attend through `policy`, with `page_size` tokens per page.
    pub fn with_policy(
        model: &'m LlamaModel,
        tokenizer: &'m Tokenizer,
        page_size: usize,
        policy: Box<dyn KvPolicy>,
    ) -> Result<Self, ModelError> {
        Ok(Self::with_session(
            model,
            tokenizer,
            model.session_with_policy(page_size, policy)?,
        ))
    }

    /// A generator on a prepared session (its contents are discarded at each generation).
    pub fn with_session(model: &'m LlamaModel, tokenizer: &'m Tokenizer, session: Session) -> Self {
        Self {
            model,
            tokenizer,
            session,
        }
    }

    /// The session (cache, policy and its statistics).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The session, mutably (e.g. to lower its context length).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Generate a continuation of `prompt_ids` (a new sequence: the session is reset first).
    ///
    /// `on_token` is called with every generated token as soon as it is known, except a final
    /// end-of-generation token. `cancel` is checked before every token; when raised, generation
    /// stops and what was generated so far is returned with [`StopReason::Cancelled`].
    ///
    /// Errors: an empty prompt, a prompt longer than the context, a token id outside the
    /// vocabulary, invalid sampling parameters.
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        opts: &GenerateOptions,
        cancel: &AtomicBool,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation, ModelError> {
        let _span = tracing::debug_span!("generate", prompt = prompt_ids.len()).entered();
        let (model, tok) = (self.model, self.tokenizer);
        let s = &mut self.session;
        if prompt_ids.is_empty() {
            return Err(ModelError::Prompt("the prompt is empty".into()));
        }
        let ctx = s.context_length();
        if prompt_ids.len() > ctx {
            return Err(ModelError::Prompt(format!(
                "the prompt has {} tokens, more than the context of {ctx} tokens",
                prompt_ids.len()
            )));
        }
        let mut sampler = Sampler::new(opts.sampling)?;
        s.reset();

        let mut timings = Timings {
            prompt_tokens: prompt_ids.len(),
            ..Timings::default()
        };
        let mut generated = Vec::new();
        let mut tops = Vec::new();
        let t0 = Instant::now();
        let mut stop = StopReason::MaxTokens;
        if cancel.load(Ordering::Relaxed) {
            stop = StopReason::Cancelled;
        } else {
            model.prefill(s, prompt_ids)?;
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
                let logits = s.logits();
                if opts.top_logprobs > 0 {
                    tops.push(
                        top_logprobs(logits, opts.top_logprobs)
                            .into_iter()
                            .map(|(id, logprob)| TokenLogprob { id, logprob })
                            .collect::<Vec<_>>(),
                    );
                }
                let t = sampler.sample(logits)?;
                generated.push(t);
                if opts.stop_at_eog && tok.is_eog(t) {
                    stop = StopReason::Eog;
                    break;
                }
                on_token(t);
                if generated.len() >= opts.max_new_tokens {
                    stop = StopReason::MaxTokens;
                    break;
                }
                if s.position() >= ctx {
                    stop = StopReason::Context;
                    break;
                }
                if cancel.load(Ordering::Relaxed) {
                    stop = StopReason::Cancelled;
                    break;
                }
                model.decode(s, t)?;
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
        let text = tok.decode(text_ids)?;
        Ok(Generation {
            prompt_ids: prompt_ids.to_vec(),
            generated_ids: generated,
            text,
            top_logprobs: tops,
            timings,
            stop,
        })
    }
}

/// One-shot [`Generator::generate`] with dense attention and the default page size.
pub fn generate(
    model: &LlamaModel,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    cancel: &AtomicBool,
    on_token: &mut dyn FnMut(u32),
) -> Result<Generation, ModelError> {
    Generator::new(model, tokenizer)?.generate(prompt_ids, opts, cancel, on_token)
}
