//! Token sampling: greedy (argmax, first index on ties), temperature, top-k, top-p, with a small
//! self-contained seeded PRNG (xoshiro256\*\* seeded through splitmix64) so that a seed gives the
//! same tokens on every platform, and the per-step top log-probabilities reported by `--json`.
//!
//! ```
//! use freekv_model::sampling::{Sampler, SamplingParams, argmax, top_logprobs};
//! let logits = [0.5f32, 3.0, 3.0, -1.0];
//! assert_eq!(argmax(&logits), Some(1));
//! let mut greedy = Sampler::new(SamplingParams::greedy()).unwrap();
//! assert_eq!(greedy.sample(&logits).unwrap(), 1);
//! let top = top_logprobs(&logits, 2);
//! assert_eq!(top[0].0, 1);
//! assert!((top[0].1 - top[1].1).abs() < 1e-6);
//! ```

use std::cmp::Ordering;

use crate::ModelError;
use crate::attention::kernels;

/// A xoshiro256\*\* generator: small, fast, and the same sequence everywhere for a seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

/// One step of splitmix64 (used to expand a 64-bit seed into the generator state).
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        Self {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let x = lo as f64 + (hi as f64 - lo as f64) * self.next_f64();
        (x as f32).clamp(lo, hi)
    }

    /// Uniform in `0..n` (`n > 0`; 0 for `n == 0`), without modulo bias worth noticing for the
    /// small `n` used here (Lemire's multiply-shift).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// PRNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Whether these parameters mean argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Checks the ranges: temperature finite and `>= 0`, `0 < top_p <= 1`.
    pub fn validate(&self) -> Result<(), ModelError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(ModelError::Config(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::Config(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The index of the largest logit, the first one on ties; NaNs are skipped. `None` when there is
/// no number at all.
pub fn argmax(logits: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if x <= b => {}
            _ => best = Some((i, x)),
        }
    }
    best.map(|(i, _)| i)
}

/// Descending by logit, then ascending by id: a total order for candidates (NaN last).
fn by_logit_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    match b.1.partial_cmp(&a.1) {
        Some(Ordering::Equal) | None => match (a.1.is_nan(), b.1.is_nan()) {
            (false, true) => Ordering::Less,
            (true, false) => Ordering::Greater,
            _ => a.0.cmp(&b.0),
        },
        Some(o) => o,
    }
}

/// `ln Σ exp(x)` over the non-NaN logits (vectorised `exp`, sums in `f64`).
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let mx = logits
        .iter()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if !mx.is_finite() {
        return mx as f64;
    }
    mx as f64 + kernels::sum_exp(logits, mx, 1.0).ln()
}

/// The `k` most likely tokens with their log-probabilities (log-softmax of `logits`), most likely
/// first, ties by lower id.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let lse = log_sum_exp(logits);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() || k == 0 {
            continue;
        }
        let cand = (i as u32, x);
        if top.len() == k
            && top
                .last()
                .is_some_and(|l| by_logit_desc(&cand, l) != Ordering::Less)
        {
            continue;
        }
        let at = top.partition_point(|t| by_logit_desc(t, &cand) == Ordering::Less);
        top.insert(at, cand);
        top.truncate(k);
    }
    top.into_iter()
        .map(|(i, x)| (i, (x as f64 - lse) as f32))
        .collect()
}

/// Picks tokens from logits according to [`SamplingParams`], with its own PRNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    cand: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler; errors on out-of-range parameters.
    pub fn new(params: SamplingParams) -> Result<Self, ModelError> {
        params.validate()?;
        Ok(Self {
            params,
            rng: Rng::new(params.seed),
            cand: Vec::new(),
        })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token for `logits`. Errors when no logit is a number.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, ModelError> {
        let none = || ModelError::Shape("cannot sample: no logit is a number".into());
        let p = self.params;
        if p.is_greedy() {
            return argmax(logits).map(|i| i as u32).ok_or_else(none);
        }
        let inv_t = 1.0 / p.temperature as f64;
        let mx = logits
            .iter()
            .filter(|x| !x.is_nan())
            .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        if mx == f32::NEG_INFINITY || mx.is_nan() {
            return Err(none());
        }
        if mx == f32::INFINITY {
            // An infinite logit takes all the mass.
            return argmax(logits).map(|i| i as u32).ok_or_else(none);
        }
        let weight = |x: f32| ((x as f64 - mx as f64) * inv_t).exp();

        // No truncation: sample from the full softmax (total, then one scan).
        if p.top_k == 0 && p.top_p >= 1.0 {
            let scale = inv_t as f32;
            let total = kernels::sum_exp(logits, mx, scale);
            let mut u = self.rng.next_f64() * total;
            let mut last = None;
            for (i, &x) in logits.iter().enumerate() {
                if x.is_nan() {
                    continue;
                }
                let w = kernels::exp_one((x - mx) * scale) as f64;
                if w > 0.0 {
                    last = Some(i);
                }
                if u < w {
                    return Ok(i as u32);
                }
                u -= w;
            }
            return last.map(|i| i as u32).ok_or_else(none);
        }

        // Candidates: every number, or the top-k.
        self.cand.clear();
        self.cand.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, x)| !x.is_nan())
                .map(|(i, &x)| (i as u32, x)),
        );
        let n = self.cand.len();
        let limit = if p.top_k > 0 { p.top_k.min(n) } else { n };
        let total: f64 = if limit < n {
            self.cand.select_nth_unstable_by(limit - 1, by_logit_desc);
            self.cand.truncate(limit);
            self.cand.iter().map(|c| weight(c.1)).sum()
        } else {
            self.cand.iter().map(|c| weight(c.1)).sum()
        };
        // Sorted prefix long enough to reach top_p of the mass: grow it geometrically, so the
        // usual case sorts a few dozen candidates instead of the whole vocabulary.
        let mut sorted = 64.min(limit);
        let keep = loop {
            if sorted < limit {
                self.cand.select_nth_unstable_by(sorted - 1, by_logit_desc);
            }
            self.cand[..sorted].sort_unstable_by(by_logit_desc);
            let mut acc = 0.0;
            let mut found = None;
            for (i, c) in self.cand[..sorted].iter().enumerate() {
                acc += weight(c.1);
                if acc >= p.top_p as f64 * total {
                    found = Some(i + 1);
                    break;
                }
            }
            match found {
                Some(k) => break k,
                None if sorted >= limit => break limit,
                None => sorted = (sorted * 8).min(limit),
            }
        };
        let kept = &self.cand[..keep];
        let mass: f64 = kept.iter().map(|c| weight(c.1)).sum();
        let mut u = self.rng.next_f64() * mass;
        for c in kept {
            let w = weight(c.1);
            if u < w {
                return Ok(c.0);
            }
            u -= w;
        }
        kept.last().map(|c| c.0).ok_or_else(none)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng as _, SeedableRng};

    #[test]
    fn xoshiro_reference_values() {
        // Expected values from an independent (Python) implementation of splitmix64 seeding
        // and xoshiro256**.
        let mut x = 0u64;
        assert_eq!(splitmix64(&mut x), 0xe220_a839_7b1d_cdaf);
        let mut r = Rng::new(0);
        let a = r.next_u64();
        assert_eq!(a, 0x99ec_5f36_cb75_f2b4);
        assert_eq!(r.next_u64(), 0xbf6e_1f78_4956_452a);
        assert_eq!(r.next_u64(), 0x1a5f_849d_4933_e6e0);
        let mut r3 = Rng::new(1);
        assert_ne!(r3.next_u64(), a);
        for _ in 0..1000 {
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
            let u = r.uniform(-2.0, 3.0);
            assert!((-2.0..=3.0).contains(&u));
            assert!(r.below(7) < 7);
        }
    }

    #[test]
    fn argmax_first_on_ties_and_nan() {
        assert_eq!(argmax(&[1.0, 5.0, 5.0, 2.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN, -1.0, -1.0]), Some(1));
        assert_eq!(argmax(&[f32::NAN]), None);
        assert_eq!(argmax(&[]), None);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), Some(0));
    }

    #[test]
    fn top_logprobs_are_log_softmax() {
        let mut rng = StdRng::seed_from_u64(1);
        let logits: Vec<f32> = (0..1000).map(|_| rng.random_range(-5.0..5.0)).collect();
        let top = top_logprobs(&logits, 5);
        assert_eq!(top.len(), 5);
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
        let lse: f64 = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
        for (k, &(id, lp)) in top.iter().enumerate() {
            assert_eq!(id as usize, idx[k]);
            let want = logits[idx[k]] as f64 - lse;
            assert!((lp as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
        }
        assert_eq!(top_logprobs(&logits, 0), vec![]);
        assert_eq!(
            top_logprobs(&[1.0, 1.0], 5)
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>(),
            [0, 1]
        );
    }

    #[test]
    fn greedy_and_degenerate_settings_pick_argmax() {
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..20 {
            let logits: Vec<f32> = (0..500).map(|_| rng.random_range(-3.0..3.0)).collect();
            let best = argmax(&logits).unwrap() as u32;
            let mut g = Sampler::new(SamplingParams::greedy()).unwrap();
            assert_eq!(g.sample(&logits).unwrap(), best);
            let mut k1 = Sampler::new(SamplingParams {
                temperature: 2.0,
                top_k: 1,
                top_p: 1.0,
                seed: 3,
            })
            .unwrap();
            assert_eq!(k1.sample(&logits).unwrap(), best);
            let mut p0 = Sampler::new(SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1e-9,
                seed: 3,
            })
            .unwrap();
            assert_eq!(p0.sample(&logits).unwrap(), best);
        }
    }

    /// Empirical frequencies against the target distribution (within 4 standard errors).
    fn check_frequencies(params: SamplingParams, logits: &[f32], want: &[f64]) {
        let n = 40_000;
        let mut s = Sampler::new(params).unwrap();
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(logits).unwrap() as usize] += 1;
        }
        for (i, (&c, &p)) in counts.iter().zip(want).enumerate() {
            let f = c as f64 / n as f64;
            let se = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
            if p == 0.0 {
                assert_eq!(c, 0, "token {i} must never be drawn");
            } else {
                assert!((f - p).abs() < 4.0 * se, "token {i}: freq {f}, want {p}");
            }
        }
    }

    fn softmax(x: &[f32], t: f64) -> Vec<f64> {
        let w: Vec<f64> = x.iter().map(|&v| (v as f64 / t).exp()).collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|v| v / s).collect()
    }

    #[test]
    fn temperature_top_k_top_p_distributions() {
        let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0, 2.5];
        // Plain temperature.
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 0,
            top_p: 1.0,
            seed: 11,
        };
        check_frequencies(p, &logits, &softmax(&logits, 0.7));
        // Top-k 3: ids 3, 5, 1 renormalised.
        let mut want = vec![0.0; 6];
        let sub = softmax(&[3.0, 2.5, 2.0], 1.0);
        want[3] = sub[0];
        want[5] = sub[1];
        want[1] = sub[2];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed: 12,
        };
        check_frequencies(p, &logits, &want);
        // Top-p: the full softmax sorted is [3, 5, 1, 0, 2, 4]; keep the shortest prefix
        // reaching 0.8.
        let full = softmax(&logits, 1.0);
        let order = [3usize, 5, 1, 0, 2, 4];
        let mut acc = 0.0;
        let mut kept = Vec::new();
        for &i in &order {
            acc += full[i];
            kept.push(i);
            if acc >= 0.8 {
                break;
            }
        }
        let mass: f64 = kept.iter().map(|&i| full[i]).sum();
        let mut want = vec![0.0; 6];
        for &i in &kept {
            want[i] = full[i] / mass;
        }
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.8,
            seed: 13,
        };
        check_frequencies(p, &logits, &want);
    }

    #[test]
    fn top_p_over_a_large_vocabulary_matches_full_sort() {
        // The geometric prefix growth must give the same nucleus as sorting everything.
        let mut rng = StdRng::seed_from_u64(4);
        let logits: Vec<f32> = (0..5000).map(|_| rng.random_range(-2.0..2.0)).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            seed: 5,
        };
        let mut s = Sampler::new(params).unwrap();
        let full = softmax(&logits, 1.0);
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap().then(a.cmp(&b)));
        let mut acc = 0.0;
        let mut nucleus = std::collections::HashSet::new();
        for &i in &idx {
            acc += full[i];
            nucleus.insert(i);
            if acc >= 0.9 {
                break;
            }
        }
        assert!(nucleus.len() > 512, "the test must exercise prefix growth");
        for _ in 0..2000 {
            let t = s.sample(&logits).unwrap() as usize;
            assert!(nucleus.contains(&t));
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible() {
        let mut rng = StdRng::seed_from_u64(6);
        let logits: Vec<f32> = (0..300).map(|_| rng.random_range(-2.0..2.0)).collect();
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 40,
            top_p: 0.95,
            seed: 42,
        };
        let mut a = Sampler::new(params).unwrap();
        let mut b = Sampler::new(params).unwrap();
        let sa: Vec<u32> = (0..50).map(|_| a.sample(&logits).unwrap()).collect();
        let sb: Vec<u32> = (0..50).map(|_| b.sample(&logits).unwrap()).collect();
        assert_eq!(sa, sb);
        let mut c = Sampler::new(SamplingParams { seed: 43, ..params }).unwrap();
        let sc: Vec<u32> = (0..50).map(|_| c.sample(&logits).unwrap()).collect();
        assert_ne!(sa, sc);
    }

    #[test]
    fn bad_params_and_logits_are_errors() {
        let bad = |t: f32, p: f32| {
            Sampler::new(SamplingParams {
                temperature: t,
                top_k: 0,
                top_p: p,
                seed: 0,
            })
            .is_err()
        };
        assert!(bad(-1.0, 1.0));
        assert!(bad(f32::NAN, 1.0));
        assert!(bad(1.0, 0.0));
        assert!(bad(1.0, 1.5));
        assert!(!bad(0.0, 1.0));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        })
        .unwrap();
        assert!(s.sample(&[f32::NAN, f32::NAN]).is_err());
        assert!(s.sample(&[]).is_err());
        assert_eq!(s.sample(&[f32::NAN, 0.0]).unwrap(), 1);
    }
}
