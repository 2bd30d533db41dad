//! Accuracy harness for KV policies: JSONL cases (generated text must contain the answer),
//! teacher-forced fidelity against full attention, and a passkey case generator.
//!
//! Prefill is dense for every policy, so a case is prefilled **once** and every policy decodes
//! from the same post-prefill state: the session's policy is a [`SharedKv`] whose inner policy is
//! swapped, and the cache is truncated back to the prompt between policies (the policies rebuild
//! their summaries, slot tables and host mirror from the cache at their first call).
//!
//! ```
//! use freekv_model::eval::{EvalCase, PasskeySpec, make_passkey_cases, parse_cases};
//! use freekv_model::testing::{TinyConfig, tiny_random_model};
//! use freekv_model::Tokenizer;
//!
//! let g = tiny_random_model(1, &TinyConfig::default())?;
//! let tok = Tokenizer::from_gguf(&g)?;
//! let spec = PasskeySpec { length: 300, depth: Some(0.5), n: 2, seed: 7, max_new_tokens: 8 };
//! let cases = make_passkey_cases(&tok, None, &spec)?;
//! assert_eq!(cases.len(), 2);
//! assert!(cases[0].prompt_ids.as_ref().unwrap().len() <= 300);
//! let text: String = cases.iter().map(|c| c.to_json_line() + "\n").collect();
//! let back: Vec<EvalCase> = parse_cases(&text)?;
//! assert_eq!(back[1].answer, cases[1].answer);
//! # Ok::<(), freekv_model::ModelError>(())
//! ```

use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use crate::ModelError;
use crate::chat::ChatTemplate;
use crate::kv::{KvConfig, KvKind, SharedKv, build_policy};
use crate::llama::{LlamaModel, Session};
use crate::tokenizer::Tokenizer;

/// Default generated tokens per case when a case does not say.
pub const DEFAULT_MAX_NEW_TOKENS: usize = 16;

/// One evaluation case.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalCase {
    /// Case id (the line number when not given).
    pub id: String,
    /// Prompt text (tokenized with special tokens recognised, BOS as the model asks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Prompt token ids (take precedence over `prompt`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_ids: Option<Vec<u32>>,
    /// The expected answer: correct when the generated text contains it.
    pub answer: String,
    /// Tokens to generate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// Free-form metadata carried to the results (e.g. length, depth).
    #[serde(skip_serializing_if = "Value::is_null")]
    pub meta: Value,
}

impl EvalCase {
    /// The case as one JSON line (no newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The prompt's token ids.
    pub fn tokens(&self, tok: &Tokenizer) -> Result<Vec<u32>, ModelError> {
        match (&self.prompt_ids, &self.prompt) {
            (Some(ids), _) => Ok(ids.clone()),
            (None, Some(p)) => tok.encode_prompt(p),
            (None, None) => Err(ModelError::Prompt(format!(
                "case {} has neither prompt nor prompt_ids",
                self.id
            ))),
        }
    }
}

/// Parse JSON-lines cases; blank lines are skipped; any bad line is an error naming its line.
pub fn parse_cases(text: &str) -> Result<Vec<EvalCase>, ModelError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: String| ModelError::Config(format!("cases line {n}: {msg}"));
        let v: Value = serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("expected a JSON object".into()))?;
        let answer = match obj.get("answer") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            Some(_) => return Err(bad("\"answer\" must be a non-empty string".into())),
            None => return Err(bad("missing \"answer\"".into())),
        };
        let prompt = match obj.get("prompt") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(_) => return Err(bad("\"prompt\" must be a non-empty string".into())),
        };
        let prompt_ids = match obj.get("prompt_ids") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if !a.is_empty() => {
                let mut ids = Vec::with_capacity(a.len());
                for x in a {
                    let id = x
                        .as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| bad(format!("prompt_ids: {x} is not a token id")))?;
                    ids.push(id);
                }
                Some(ids)
            }
            Some(_) => {
                return Err(bad(
                    "\"prompt_ids\" must be a non-empty array of token ids".into()
                ));
            }
        };
        if prompt.is_none() && prompt_ids.is_none() {
            return Err(bad("needs \"prompt\" or \"prompt_ids\"".into()));
        }
        let max_new_tokens = match obj.get("max_new_tokens") {
            None | Some(Value::Null) => None,
            Some(x) => Some(
                x.as_u64()
                    .filter(|m| (1..=1 << 20).contains(m))
                    .ok_or_else(|| bad("\"max_new_tokens\" must be an integer ≥ 1".into()))?
                    as usize,
            ),
        };
        let id = match obj.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            _ => n.to_string(),
        };
        out.push(EvalCase {
            id,
            prompt,
            prompt_ids,
            answer,
            max_new_tokens,
            meta: obj.get("meta").cloned().unwrap_or(Value::Null),
        });
    }
    if out.is_empty() {
        return Err(ModelError::Config("the cases file holds no case".into()));
    }
    Ok(out)
}

/// A small deterministic generator (SplitMix64) for case generation.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What passkey cases to generate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PasskeySpec {
    /// Target prompt length in tokens (the prompt is at most this long, within one filler
    /// sentence of it).
    pub length: usize,
    /// Relative depth of the key in the filler (0 = start, 1 = end); `None`: random per case.
    pub depth: Option<f64>,
    /// Number of cases.
    pub n: usize,
    /// Seed of the keys (and random depths).
    pub seed: u64,
    /// Tokens to generate per case.
    pub max_new_tokens: usize,
}

const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const INTRO: &str = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.";
const QUESTION: &str = "What is the pass key? Answer with the number only.";
const ANSWER_PREFIX: &str = "The pass key is";

/// Passkey retrieval cases: a random 5-digit key hidden at a relative depth in repeated filler,
/// the question at the end, rendered with `template` (the model's chat template) when given,
/// and the assistant's answer primed with "The pass key is". Prompts are given as token ids
/// (and as text, for reading).
pub fn make_passkey_cases(
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    spec: &PasskeySpec,
) -> Result<Vec<EvalCase>, ModelError> {
    if spec.n == 0 {
        return Err(ModelError::Config("--n must be at least 1".into()));
    }
    if let Some(d) = spec.depth
        && !(0.0..=1.0).contains(&d)
    {
        return Err(ModelError::Config(format!(
            "--depth must be in [0, 1] (got {d})"
        )));
    }
    let mut rng = SplitMix(spec.seed ^ 0x0005_EED0_FFA5_54E7);
    let unit_len = tok.encode(FILLER, false)?.len().max(1);
    let mut out = Vec::with_capacity(spec.n);
    for i in 0..spec.n {
        let key = 10_000 + rng.next() % 90_000;
        let depth = match spec.depth {
            Some(d) => d,
            None => (rng.unit() * 100.0).round() / 100.0,
        };
        let needle = format!(" The pass key is {key}. Remember it. {key} is the pass key. ");
        let build = |reps: usize| -> Result<(String, Vec<u32>), ModelError> {
            let before = ((reps as f64) * depth).round() as usize;
            let mut body = String::with_capacity(reps * FILLER.len() + 200);
            body.push_str(INTRO);
            body.push(' ');
            for _ in 0..before {
                body.push_str(FILLER);
            }
            body.push_str(&needle);
            for _ in before..reps {
                body.push_str(FILLER);
            }
            body.push_str("\n\n");
            body.push_str(QUESTION);
            let text = match template {
                Some(t) => t.prompt(None, &body)? + ANSWER_PREFIX,
                None => format!("{body}\n{ANSWER_PREFIX}"),
            };
            let ids = tok.encode_prompt(&text)?;
            Ok((text, ids))
        };
        let (_, base) = build(0)?;
        if base.len() > spec.length {
            return Err(ModelError::Config(format!(
                "--length {} is shorter than the passkey prompt without filler ({} tokens)",
                spec.length,
                base.len()
            )));
        }
        // Estimate the tokens per filler sentence in context, then step down to the target.
        let probe = ((spec.length - base.len()) / unit_len).min(64);
        let per_unit = if probe > 0 {
            let n = build(probe)?.1.len().saturating_sub(base.len());
            (n as f64 / probe as f64).max(1.0)
        } else {
            unit_len as f64
        };
        let mut reps = ((spec.length - base.len()) as f64 / per_unit).ceil() as usize + 1;
        let (text, ids) = loop {
            let (text, ids) = build(reps)?;
            if ids.len() <= spec.length || reps == 0 {
                break (text, ids);
            }
            let over = ((ids.len() - spec.length) as f64 / per_unit).floor() as usize;
            reps = reps.saturating_sub(over.max(1));
        };
        out.push(EvalCase {
            id: format!("passkey-{}-{}-{i}", spec.length, spec.seed),
            prompt: Some(text),
            answer: key.to_string(),
            max_new_tokens: Some(spec.max_new_tokens),
            meta: serde_json::json!({"length": ids.len(), "target_length": spec.length, "depth": depth}),
            prompt_ids: Some(ids),
        });
    }
    Ok(out)
}

/// The index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if x > bv {
            bv = x;
            best = i;
        }
    }
    best as u32
}

/// `log_softmax(logits)` in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln()
        + m;
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// `KL(p ‖ q)` from log-probabilities.
pub fn kl_divergence(logp: &[f64], logq: &[f64]) -> f64 {
    logp.iter()
        .zip(logq)
        .map(|(&a, &b)| if a > -700.0 { a.exp() * (a - b) } else { 0.0 })
        .sum::<f64>()
        .max(0.0)
}

/// Expand a list of policy kinds and budgets into configurations: `full` once, every other
/// kind once per budget; the other fields come from `base`.
pub fn expand_policies(base: &KvConfig, kinds: &[KvKind], budgets: &[usize]) -> Vec<KvConfig> {
    let mut out = Vec::new();
    for &k in kinds {
        if k == KvKind::Full {
            out.push(KvConfig {
                kind: k,
                ..base.clone()
            });
            continue;
        }
        for &b in budgets {
            out.push(KvConfig {
                kind: k,
                budget: b,
                ..base.clone()
            });
        }
    }
    out
}

/// A short label for a policy configuration (`full`, `freekv@1024`).
pub fn policy_label(c: &KvConfig) -> String {
    match c.kind {
        KvKind::Full => "full".into(),
        k => format!("{k}@{}", c.budget),
    }
}

/// The outcome of one (case, policy).
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Case id.
    pub id: String,
    /// Policy label (`full`, `freekv@1024`).
    pub policy: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Expected answer.
    pub answer: String,
    /// Generated text.
    pub text: String,
    /// Whether `text` contains `answer`.
    pub correct: bool,
    /// Seconds of decoding.
    pub decode_s: f64,
    /// Seconds of the (shared) prefill of this case.
    pub prefill_s: f64,
    /// The case's metadata.
    pub meta: Value,
    /// The policy's statistics for this case.
    pub kv_stats: Option<Value>,
}

/// A session whose policy can be swapped without clearing the cache.
fn shared_session(model: &LlamaModel, page_size: usize) -> Result<(Session, SharedKv), ModelError> {
    let shared = SharedKv::new(Box::new(crate::DenseKv::new()));
    let s = model.session_with_policy(page_size, shared.boxed())?;
    Ok((s, shared))
}

fn check_page_sizes(policies: &[KvConfig]) -> Result<usize, ModelError> {
    let p = policies
        .first()
        .map(|c| c.page_size)
        .ok_or_else(|| ModelError::Config("no KV policy to evaluate".into()))?;
    if policies.iter().any(|c| c.page_size != p) {
        return Err(ModelError::Config(
            "all evaluated policies must share one page size".into(),
        ));
    }
    Ok(p)
}

/// Greedy decoding from the session's state after prefill (`first_logits` are the prefill's
/// last logits): up to `max_new` tokens, stopping at end-of-generation. Returns the ids (the
/// final end-of-generation token excluded).
fn greedy_from(
    model: &LlamaModel,
    tok: &Tokenizer,
    s: &mut Session,
    first_logits: &[f32],
    max_new: usize,
) -> Result<Vec<u32>, ModelError> {
    let mut ids = Vec::new();
    let mut next = argmax(first_logits);
    while ids.len() < max_new {
        if tok.is_eog(next) {
            break;
        }
        ids.push(next);
        if ids.len() >= max_new || s.position() >= s.context_length() {
            break;
        }
        next = argmax(model.decode(s, next)?);
    }
    Ok(ids)
}

/// Run every case under every policy (greedy decoding; prefill shared per case). `on_result` is
/// called after each (case, policy), e.g. to stream results to a file.
pub fn run_cases(
    model: &LlamaModel,
    tok: &Tokenizer,
    cases: &[EvalCase],
    policies: &[KvConfig],
    on_result: &mut dyn FnMut(&CaseResult) -> Result<(), ModelError>,
) -> Result<Vec<CaseResult>, ModelError> {
    let page_size = check_page_sizes(policies)?;
    let n_layers = model.config().n_layers;
    for c in policies {
        c.validate(n_layers)?;
    }
    let (mut s, shared) = shared_session(model, page_size)?;
    let mut results = Vec::new();
    for case in cases {
        let _span = tracing::debug_span!("eval_case", id = %case.id).entered();
        let ids = case.tokens(tok)?;
        let max_new = case.max_new_tokens.unwrap_or(DEFAULT_MAX_NEW_TOKENS);
        shared.replace(Box::new(crate::DenseKv::new()));
        s.reset();
        let t0 = Instant::now();
        let first = model.prefill(&mut s, &ids)?.to_vec();
        let prefill_s = t0.elapsed().as_secs_f64();
        for cfg in policies {
            s.truncate(ids.len());
            shared.replace(build_policy(cfg, n_layers)?);
            let t1 = Instant::now();
            let out = greedy_from(model, tok, &mut s, &first, max_new)?;
            let decode_s = t1.elapsed().as_secs_f64();
            let text = tok.decode(&out)?;
            let r = CaseResult {
                id: case.id.clone(),
                policy: policy_label(cfg),
                prompt_tokens: ids.len(),
                answer: case.answer.clone(),
                correct: text.contains(&case.answer),
                text,
                decode_s,
                prefill_s,
                meta: case.meta.clone(),
                kv_stats: shared.lock().stats(),
            };
            on_result(&r)?;
            results.push(r);
        }
    }
    Ok(results)
}

/// Accuracy per policy label, in first-seen order: `(label, correct, total)`.
pub fn accuracy(results: &[CaseResult]) -> Vec<(String, usize, usize)> {
    let mut out: Vec<(String, usize, usize)> = Vec::new();
    for r in results {
        match out.iter_mut().find(|(l, _, _)| *l == r.policy) {
            Some(e) => {
                e.1 += r.correct as usize;
                e.2 += 1;
            }
            None => out.push((r.policy.clone(), r.correct as usize, 1)),
        }
    }
    out
}

/// Teacher-forced fidelity of one policy against full attention.
#[derive(Debug, Clone, Serialize)]
pub struct Fidelity {
    /// Policy label.
    pub policy: String,
    /// Positions compared.
    pub positions: usize,
    /// Fraction of positions where the policy's top-1 token equals full attention's.
    pub top1_agreement: f64,
    /// Mean `KL(full ‖ policy)` over the positions (nats).
    pub mean_kl: f64,
    /// Largest per-position KL.
    pub max_kl: f64,
    /// Mean negative log-likelihood of the text's next token under the policy (nats).
    pub nll: f64,
    /// Mean negative log-likelihood under full attention (nats).
    pub nll_full: f64,
    /// Seconds of decoding.
    pub decode_s: f64,
    /// The policy's statistics.
    pub kv_stats: Option<Value>,
}

/// Teacher-forced comparison over `tokens`: the first `prefix` tokens are prefilled once
/// (densely), then `tokens[prefix..]` are decoded one by one under full attention and under each
/// policy, comparing the next-token distributions at every position (`tokens.len() − prefix − 1`
/// positions). `full` entries of `policies` are skipped (they agree exactly).
pub fn fidelity(
    model: &LlamaModel,
    tokens: &[u32],
    prefix: usize,
    policies: &[KvConfig],
    on_result: &mut dyn FnMut(&Fidelity) -> Result<(), ModelError>,
) -> Result<Vec<Fidelity>, ModelError> {
    let page_size = check_page_sizes(policies)?;
    let n_layers = model.config().n_layers;
    for c in policies {
        c.validate(n_layers)?;
    }
    if prefix == 0 || prefix + 2 > tokens.len() {
        return Err(ModelError::Config(format!(
            "fidelity needs a prefix of at least 1 token and at least 2 tokens after it \
             (prefix {prefix}, text {} tokens)",
            tokens.len()
        )));
    }
    let (mut s, shared) = shared_session(model, page_size)?;
    model.prefill(&mut s, &tokens[..prefix])?;
    let steps = &tokens[prefix..tokens.len() - 1];
    // Full attention, the reference.
    let mut reference: Vec<Vec<f64>> = Vec::with_capacity(steps.len());
    let mut nll_full = 0.0;
    for (i, &t) in steps.iter().enumerate() {
        let lp = log_softmax(model.decode(&mut s, t)?);
        nll_full -= lp[tokens[prefix + i + 1] as usize];
        reference.push(lp);
    }
    nll_full /= steps.len() as f64;
    let mut out = Vec::new();
    for cfg in policies.iter().filter(|c| c.kind != KvKind::Full) {
        s.truncate(prefix);
        shared.replace(build_policy(cfg, n_layers)?);
        let t0 = Instant::now();
        let (mut agree, mut kl_sum, mut kl_max, mut nll) = (0usize, 0.0f64, 0.0f64, 0.0f64);
        for (i, &t) in steps.iter().enumerate() {
            let logits = model.decode(&mut s, t)?;
            let lq = log_softmax(logits);
            let lp = &reference[i];
            let top_p = argmax_f64(lp);
            agree += (argmax(logits) as usize == top_p) as usize;
            let kl = kl_divergence(lp, &lq);
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            nll -= lq[tokens[prefix + i + 1] as usize];
        }
        let n = steps.len() as f64;
        let f = Fidelity {
            policy: policy_label(cfg),
            positions: steps.len(),
            top1_agreement: agree as f64 / n,
            mean_kl: kl_sum / n,
            max_kl: kl_max,
            nll: nll / n,
            nll_full,
            decode_s: t0.elapsed().as_secs_f64(),
            kv_stats: shared.lock().stats(),
        };
        on_result(&f)?;
        out.push(f);
    }
    Ok(out)
}

fn argmax_f64(x: &[f64]) -> usize {
    let mut best = 0;
    let mut bv = f64::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_name_their_line() {
        let e = parse_cases("{\"prompt\":\"a\",\"answer\":\"b\"}\n\nnot json\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
        let e = parse_cases("{\"prompt\":\"a\"}").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("answer"), "{e}");
        let e = parse_cases("{\"answer\":\"x\"}").unwrap_err().to_string();
        assert!(e.contains("prompt"), "{e}");
        let e = parse_cases("{\"answer\":\"x\",\"prompt_ids\":[1,-2]}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prompt_ids"), "{e}");
        assert!(parse_cases("\n \n").is_err());
        let ok = parse_cases("{\"prompt_ids\":[1,2],\"answer\":123,\"max_new_tokens\":4}").unwrap();
        assert_eq!(ok[0].answer, "123");
        assert_eq!(ok[0].max_new_tokens, Some(4));
        assert_eq!(ok[0].id, "1");
    }

    #[test]
    fn kl_and_softmax() {
        let a = log_softmax(&[1.0, 2.0, 3.0]);
        let s: f64 = a.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-12);
        assert_eq!(kl_divergence(&a, &a), 0.0);
        let b = log_softmax(&[3.0, 2.0, 1.0]);
        assert!(kl_divergence(&a, &b) > 0.1);
        assert_eq!(argmax(&[0.0, 5.0, 5.0]), 1);
    }

    #[test]
    fn expand_and_label() {
        let base = KvConfig::default();
        let v = expand_policies(&base, &[KvKind::Full, KvKind::FreeKv], &[512, 1024]);
        let labels: Vec<String> = v.iter().map(policy_label).collect();
        assert_eq!(labels, ["full", "freekv@512", "freekv@1024"]);
    }
}
