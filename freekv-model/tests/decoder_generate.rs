//! Generation on tiny random models: greedy determinism, sampling reproducibility, stop
//! conditions, cancellation, streaming, errors, and the KV-policy seam.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use freekv_layout::PagedKvCache;
use freekv_model::ModelError;
use freekv_model::attention::{DenseKv, KvPolicy, LayerStep};
use freekv_model::generate::{GenerateOptions, Generator, StopReason, generate};
use freekv_model::gguf::{GgufFile, MetaValue};
use freekv_model::llama::LlamaModel;
use freekv_model::sampling::{SamplingParams, argmax};
use freekv_model::testing::{TinyConfig, tiny_random_model, tiny_random_model_writer};
use freekv_model::tokenizer::Tokenizer;

fn setup(seed: u64) -> (LlamaModel, Tokenizer) {
    let g = Arc::new(tiny_random_model(seed, &TinyConfig::default()).unwrap());
    let tok = Tokenizer::from_gguf(&g).unwrap();
    (LlamaModel::new(g).unwrap(), tok)
}

fn no_cancel() -> AtomicBool {
    AtomicBool::new(false)
}

fn opts(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        stop_at_eog: false,
        ..GenerateOptions::default()
    }
}

#[test]
fn greedy_is_deterministic_and_equals_argmax_decoding() {
    let (m, tok) = setup(1);
    let prompt = tok.encode("the cat and the hat", false).unwrap();
    let mut streamed = Vec::new();
    let a = generate(&m, &tok, &prompt, &opts(12), &no_cancel(), &mut |t| {
        streamed.push(t)
    })
    .unwrap();
    let b = generate(&m, &tok, &prompt, &opts(12), &no_cancel(), &mut |_| {}).unwrap();
    assert_eq!(a, Generation_eq_ignoring_timings(&a, &b));
    assert_eq!(a.generated_ids.len(), 12);
    assert_eq!(a.stop, StopReason::MaxTokens);
    assert_eq!(streamed, a.generated_ids);
    assert_eq!(a.text, tok.decode(&a.generated_ids).unwrap());
    assert_eq!(a.timings.prompt_tokens, prompt.len());
    assert_eq!(a.timings.decode_tokens, 11);
    // The same by hand.
    let mut s = m.session(32).unwrap();
    let mut logits = m.prefill(&mut s, &prompt).unwrap().to_vec();
    for (i, &want) in a.generated_ids.iter().enumerate() {
        let t = argmax(&logits).unwrap() as u32;
        assert_eq!(t, want, "step {i}");
        let top = &a.top_logprobs[i];
        assert_eq!(top.len(), 5);
        assert_eq!(top[0].id, t);
        assert!(top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        assert!(top[0].logprob <= 0.0);
        logits = m.decode(&mut s, t).unwrap().to_vec();
    }
}

/// Returns `a` when `b` equals it in everything but the timings (so `assert_eq!` shows a diff).
#[allow(non_snake_case)]
fn Generation_eq_ignoring_timings(
    a: &freekv_model::generate::Generation,
    b: &freekv_model::generate::Generation,
) -> freekv_model::generate::Generation {
    let mut b = b.clone();
    b.timings = a.timings;
    b
}

#[test]
fn seeded_sampling_is_reproducible() {
    let (m, tok) = setup(2);
    let prompt = tok.encode("of the", false).unwrap();
    let sampled = |seed| GenerateOptions {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 0.95,
            seed,
        },
        ..opts(20)
    };
    let mut g = Generator::new(&m, &tok).unwrap();
    let a = g
        .generate(&prompt, &sampled(7), &no_cancel(), &mut |_| {})
        .unwrap();
    let b = g
        .generate(&prompt, &sampled(7), &no_cancel(), &mut |_| {})
        .unwrap();
    let c = g
        .generate(&prompt, &sampled(8), &no_cancel(), &mut |_| {})
        .unwrap();
    assert_eq!(a.generated_ids, b.generated_ids);
    assert_ne!(a.generated_ids, c.generated_ids);
}

#[test]
fn stops_at_end_of_generation() {
    // Make the third greedy token the EOS of the tokenizer.
    let cfg = TinyConfig::default();
    let (m0, tok0) = setup(3);
    let prompt = tok0.encode("the hat", false).unwrap();
    let free = generate(&m0, &tok0, &prompt, &opts(6), &no_cancel(), &mut |_| {}).unwrap();
    let eos = free.generated_ids[2];
    let first = free.generated_ids.iter().position(|&t| t == eos).unwrap();
    let mut w = tiny_random_model_writer(3, &cfg).unwrap();
    w.add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(eos));
    let g = Arc::new(GgufFile::from_bytes("eos", w.to_bytes().unwrap()).unwrap());
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let m = LlamaModel::new(g).unwrap();
    let mut streamed = Vec::new();
    let o = GenerateOptions {
        stop_at_eog: true,
        ..opts(6)
    };
    let out = generate(&m, &tok, &prompt, &o, &no_cancel(), &mut |t| {
        streamed.push(t)
    })
    .unwrap();
    assert_eq!(out.stop, StopReason::Eog);
    assert_eq!(out.generated_ids, free.generated_ids[..=first]);
    assert_eq!(streamed, free.generated_ids[..first]);
    assert_eq!(out.text, tok.decode(&free.generated_ids[..first]).unwrap());
}

#[test]
fn stops_at_the_context_limit() {
    let (m, tok) = setup(4);
    let prompt = tok.encode("and the", false).unwrap();
    let p = prompt.len();
    let mut g = Generator::new(&m, &tok).unwrap();
    g.session_mut().set_context_length(p + 3);
    let out = g
        .generate(&prompt, &opts(50), &no_cancel(), &mut |_| {})
        .unwrap();
    assert_eq!(out.stop, StopReason::Context);
    assert_eq!(out.generated_ids.len(), 4);
    assert_eq!(g.session().position(), p + 3);
    // A prompt that fills the context exactly still yields one token.
    g.session_mut().set_context_length(p);
    let out = g
        .generate(&prompt, &opts(50), &no_cancel(), &mut |_| {})
        .unwrap();
    assert_eq!(
        (out.stop, out.generated_ids.len()),
        (StopReason::Context, 1)
    );
    // One more prompt token is an error.
    g.session_mut().set_context_length(p - 1);
    assert!(matches!(
        g.generate(&prompt, &opts(5), &no_cancel(), &mut |_| {}),
        Err(ModelError::Prompt(_))
    ));
}

#[test]
fn cancellation_keeps_what_was_generated() {
    let (m, tok) = setup(5);
    let prompt = tok.encode("the cat", false).unwrap();
    let full = generate(&m, &tok, &prompt, &opts(10), &no_cancel(), &mut |_| {}).unwrap();
    let cancel = AtomicBool::new(false);
    let mut n = 0;
    let out = generate(&m, &tok, &prompt, &opts(10), &cancel, &mut |_| {
        n += 1;
        if n == 3 {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert!(out.cancelled());
    assert_eq!(out.generated_ids, full.generated_ids[..3]);
    let raised = AtomicBool::new(true);
    let out = generate(&m, &tok, &prompt, &opts(10), &raised, &mut |_| {}).unwrap();
    assert!(out.cancelled());
    assert!(out.generated_ids.is_empty());
}

#[test]
fn bad_requests_are_errors() {
    let (m, tok) = setup(6);
    let c = no_cancel();
    let e = |r: Result<_, ModelError>| {
        r.map(|_: freekv_model::generate::Generation| ())
            .unwrap_err()
    };
    assert!(matches!(
        e(generate(&m, &tok, &[], &opts(3), &c, &mut |_| {})),
        ModelError::Prompt(_)
    ));
    assert!(matches!(
        e(generate(&m, &tok, &[1, 2, 9999], &opts(3), &c, &mut |_| {})),
        ModelError::Prompt(_)
    ));
    let long = vec![7u32; m.config().context_length + 1];
    assert!(matches!(
        e(generate(&m, &tok, &long, &opts(3), &c, &mut |_| {})),
        ModelError::Prompt(_)
    ));
    let bad = GenerateOptions {
        sampling: SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy()
        },
        ..opts(3)
    };
    assert!(matches!(
        e(generate(&m, &tok, &[5], &bad, &c, &mut |_| {})),
        ModelError::Config(_)
    ));
    // Zero new tokens: just the prefill.
    let out = generate(&m, &tok, &[5, 6], &opts(0), &c, &mut |_| {}).unwrap();
    assert!(out.generated_ids.is_empty());
    assert_eq!(out.stop, StopReason::MaxTokens);
}

/// A policy that delegates to dense attention and counts the calls it gets.
struct Counting {
    inner: DenseKv,
    attends: Arc<AtomicUsize>,
    prefills: Arc<AtomicUsize>,
    steps: Arc<AtomicUsize>,
}

impl KvPolicy for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn after_prefill(&mut self, cache: &PagedKvCache) -> Result<(), ModelError> {
        self.prefills.fetch_add(1, Ordering::Relaxed);
        assert!(cache.len(0) > 0);
        Ok(())
    }
    fn attend(
        &mut self,
        step: &LayerStep<'_>,
        cache: &mut PagedKvCache,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        assert_eq!(cache.len(step.layer), step.position);
        self.attends.fetch_add(1, Ordering::Relaxed);
        self.inner.attend(step, cache, out)
    }
    fn end_step(&mut self) {
        self.steps.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn policies_are_called_per_layer_per_step() {
    let (m, tok) = setup(7);
    let prompt = tok.encode("the cat and", false).unwrap();
    let dense = generate(&m, &tok, &prompt, &opts(8), &no_cancel(), &mut |_| {}).unwrap();
    let (a, p, s) = Default::default();
    let policy = Counting {
        inner: DenseKv::new(),
        attends: Arc::clone(&a),
        prefills: Arc::clone(&p),
        steps: Arc::clone(&s),
    };
    let mut g = Generator::with_policy(&m, &tok, 16, Box::new(policy)).unwrap();
    let out = g
        .generate(&prompt, &opts(8), &no_cancel(), &mut |_| {})
        .unwrap();
    assert_eq!(out.generated_ids, dense.generated_ids);
    let a: Arc<AtomicUsize> = a;
    assert_eq!(a.load(Ordering::Relaxed), 7 * m.config().n_layers);
    assert_eq!(p.load(Ordering::Relaxed), 1);
    assert_eq!(s.load(Ordering::Relaxed), 7);
    assert_eq!(g.session().policy().name(), "counting");
}

/// A policy that forgets to append is caught by the decoder.
struct Forgetful;

impl KvPolicy for Forgetful {
    fn name(&self) -> &str {
        "forgetful"
    }
    fn attend(
        &mut self,
        _: &LayerStep<'_>,
        _: &mut PagedKvCache,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        out.fill(0.0);
        Ok(())
    }
}

#[test]
fn a_policy_that_does_not_append_is_an_error() {
    let (m, tok) = setup(8);
    let mut g = Generator::with_policy(&m, &tok, 16, Box::new(Forgetful)).unwrap();
    let r = g.generate(&[5, 6, 7], &opts(3), &no_cancel(), &mut |_| {});
    assert!(matches!(r, Err(ModelError::Config(_))));
}
