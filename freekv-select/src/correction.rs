//! Fine-grained correction: the cosine between consecutive post-RoPE queries of each query head,
//! aggregated per KV group, flags the KV heads whose speculative selection (made with the
//! previous step's query) must be redone with the current query.

use std::fmt;
use std::str::FromStr;

use crate::SelectError;

/// How the per-query-head cosines of a GQA group are combined into one value per KV head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CorrectionAggregate {
    /// Mean over the `G` query heads (the paper's default, `corr_group=avg`).
    #[default]
    Mean,
    /// Max over the `G` query heads (`corr_group=max`): flags a group only when every head
    /// drifted.
    Max,
}

impl CorrectionAggregate {
    /// Canonical name (`mean`, `max`).
    pub fn name(self) -> &'static str {
        match self {
            CorrectionAggregate::Mean => "mean",
            CorrectionAggregate::Max => "max",
        }
    }
}

impl fmt::Display for CorrectionAggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CorrectionAggregate {
    type Err = SelectError;

    /// Accepts `mean` (alias `avg`) and `max`, case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mean" | "avg" => Ok(CorrectionAggregate::Mean),
            "max" => Ok(CorrectionAggregate::Max),
            _ => Err(SelectError::UnknownName {
                what: "correction aggregate",
                name: s.to_string(),
                expected: "mean, max",
            }),
        }
    }
}

/// Cosine similarity of two vectors of equal length in fp32:
/// `a·b / (sqrt(|a|²·|b|²) + 1e−12)`. Each of the three sums is accumulated in 8 lanes (lane `k`
/// takes the terms `i ≡ k (mod 8)` of the whole 8-chunks in increasing `i`), the lanes combined
/// `((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7))`, then the tail (summed in order) added: the order of the
/// page scores, which a GPU reduces with eight threads per vector. Zero vectors give 0.
pub fn cosine(a: &[f32], b: &[f32]) -> Result<f32, SelectError> {
    if a.len() != b.len() {
        return Err(SelectError::SizeMismatch {
            what: "cosine operands",
            expected: a.len(),
            got: b.len(),
        });
    }
    Ok(cosine_unchecked(a, b))
}

fn cosine_unchecked(a: &[f32], b: &[f32]) -> f32 {
    let (ac, ar) = a.as_chunks::<LANES>();
    let (bc, br) = b.as_chunks::<LANES>();
    let (mut dot, mut na, mut nb) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    for (x, y) in ac.iter().zip(bc) {
        for k in 0..LANES {
            dot[k] += x[k] * y[k];
            na[k] += x[k] * x[k];
            nb[k] += y[k] * y[k];
        }
    }
    let (mut td, mut ta, mut tb) = (0.0f32, 0.0f32, 0.0f32);
    for (&x, &y) in ar.iter().zip(br) {
        td += x * y;
        ta += x * x;
        tb += y * y;
    }
    let (dot, na, nb) = (
        lane_reduce(&dot, td),
        lane_reduce(&na, ta),
        lane_reduce(&nb, tb),
    );
    dot / ((na * nb).sqrt() + 1e-12)
}

const LANES: usize = 8;

/// The lanes combined `((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7))`, then the tail added (the order of
/// the page scores, so the GPU reduces eight threads per head with three xor shuffles).
#[inline(always)]
fn lane_reduce(acc: &[f32; LANES], tail: f32) -> f32 {
    (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))) + tail
}

/// Per-query-head cosines between the previous and the current queries of a layer (both
/// `Hq × head_dim`, head-major).
pub fn head_cosines(q_prev: &[f32], q: &[f32], head_dim: usize) -> Result<Vec<f32>, SelectError> {
    if head_dim == 0 {
        return Err(SelectError::InvalidConfig("head_dim must be > 0".into()));
    }
    if q.is_empty() || !q.len().is_multiple_of(head_dim) {
        return Err(SelectError::SizeMismatch {
            what: "queries (Hq × head_dim)",
            expected: head_dim * (q.len() / head_dim).max(1),
            got: q.len(),
        });
    }
    if q_prev.len() != q.len() {
        return Err(SelectError::SizeMismatch {
            what: "previous queries",
            expected: q.len(),
            got: q_prev.len(),
        });
    }
    Ok(q_prev
        .chunks_exact(head_dim)
        .zip(q.chunks_exact(head_dim))
        .map(|(a, b)| cosine_unchecked(a, b))
        .collect())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Trigger {
    Below(f32),
    Always,
}

/// The correction rule: threshold (or always) and group aggregation.
///
/// # Threshold semantics (decided here)
///
/// * τ must be a finite number in **[−1, 1]**; anything else (τ > 1 included) is an error.
/// * For τ in [−1, 1) a KV head is flagged when its group cosine `C < τ` (strict, as in the
///   paper's code). A NaN cosine (only from non-finite queries) is flagged.
/// * **τ = 1 means "always correct"**: every KV head is flagged, whatever its cosine. Since a
///   cosine never exceeds 1 mathematically, `C < 1` and "always" differ only where rounding yields a
///   computed cosine of exactly 1.0 (or slightly above) for (nearly) parallel queries; making τ = 1
///   mean [`always`](CorrectionPolicy::always) removes that rounding dependence, so that "freekv
///   with τ = 1 equals arkvale" holds exactly. `always` is also accepted by name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CorrectionPolicy {
    trigger: Trigger,
    aggregate: CorrectionAggregate,
}

impl CorrectionPolicy {
    /// Flag KV heads whose group cosine is below `tau`; `tau` must be finite and in [−1, 1];
    /// `tau = 1` is [`always`](Self::always).
    pub fn from_tau(tau: f32, aggregate: CorrectionAggregate) -> Result<Self, SelectError> {
        if !tau.is_finite() || !(-1.0..=1.0).contains(&tau) {
            return Err(SelectError::InvalidTau(tau));
        }
        if tau == 1.0 {
            return Ok(Self::always(aggregate));
        }
        Ok(Self {
            trigger: Trigger::Below(tau),
            aggregate,
        })
    }

    /// Flag every KV head at every step (the cosines are still computed, for statistics).
    pub fn always(aggregate: CorrectionAggregate) -> Self {
        Self {
            trigger: Trigger::Always,
            aggregate,
        }
    }

    /// Parse a τ given on a command line: `always` or a number in [−1, 1].
    pub fn parse_tau(s: &str, aggregate: CorrectionAggregate) -> Result<Self, SelectError> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("always") {
            return Ok(Self::always(aggregate));
        }
        let tau: f32 = t.parse().map_err(|_| SelectError::UnknownName {
            what: "correction threshold",
            name: s.to_string(),
            expected: "a number in [-1, 1], or `always`",
        })?;
        Self::from_tau(tau, aggregate)
    }

    /// The threshold: τ, or 1.0 for `always`.
    pub fn tau(&self) -> f32 {
        match self.trigger {
            Trigger::Below(t) => t,
            Trigger::Always => 1.0,
        }
    }

    /// True for the `always` rule (τ = 1).
    pub fn is_always(&self) -> bool {
        self.trigger == Trigger::Always
    }

    /// Group aggregation.
    pub fn aggregate(&self) -> CorrectionAggregate {
        self.aggregate
    }

    /// Whether a KV head with group cosine `c` is flagged.
    pub fn flags(&self, c: f32) -> bool {
        match self.trigger {
            Trigger::Always => true,
            // A NaN cosine is flagged.
            Trigger::Below(t) => c.is_nan() || c < t,
        }
    }

    /// Compare a layer's current queries `q` with the previous step's `q_prev` (both
    /// `Hq × head_dim`, post-RoPE; query heads `h·G .. (h+1)·G` form KV head `h`'s group) and
    /// flag the KV heads to correct.
    pub fn evaluate(
        &self,
        q_prev: &[f32],
        q: &[f32],
        head_dim: usize,
        kv_heads: usize,
    ) -> Result<CorrectionFlags, SelectError> {
        let head = head_cosines(q_prev, q, head_dim)?;
        if kv_heads == 0 || !head.len().is_multiple_of(kv_heads) {
            return Err(SelectError::InvalidConfig(format!(
                "{} query heads cannot be split into {kv_heads} KV groups",
                head.len()
            )));
        }
        let g = head.len() / kv_heads;
        let group: Vec<f32> = head
            .chunks_exact(g)
            .map(|c| match self.aggregate {
                CorrectionAggregate::Mean => c.iter().sum::<f32>() / g as f32,
                CorrectionAggregate::Max => {
                    c.iter()
                        .skip(1)
                        .fold(c.first().copied().unwrap_or(f32::NAN), |m, &x| {
                            if x > m { x } else { m }
                        })
                }
            })
            .collect();
        let flagged = group.iter().map(|&c| self.flags(c)).collect();
        Ok(CorrectionFlags {
            head_cosines: head,
            group_cosines: group,
            flagged,
        })
    }
}

impl fmt::Display for CorrectionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.trigger {
            Trigger::Below(t) => write!(f, "tau={t} ({})", self.aggregate),
            Trigger::Always => write!(f, "always ({})", self.aggregate),
        }
    }
}

/// The outcome of one correction check for one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct CorrectionFlags {
    /// Cosine per query head (`Hq`).
    pub head_cosines: Vec<f32>,
    /// Aggregated cosine per KV head (`Hkv`).
    pub group_cosines: Vec<f32>,
    /// Whether each KV head is flagged for correction (`Hkv`).
    pub flagged: Vec<bool>,
}

impl CorrectionFlags {
    /// True when any KV head is flagged (the layer takes the synchronous correction path).
    pub fn any(&self) -> bool {
        self.flagged.iter().any(|&f| f)
    }

    /// Number of flagged KV heads.
    pub fn count(&self) -> usize {
        self.flagged.iter().filter(|&&f| f).count()
    }

    /// Indices of the flagged KV heads, ascending.
    pub fn flagged_heads(&self) -> Vec<usize> {
        self.flagged
            .iter()
            .enumerate()
            .filter_map(|(h, &f)| f.then_some(h))
            .collect()
    }
}

/// The previous step's post-RoPE query of every layer, the other operand of the cosine.
///
/// [`reset`](Self::reset) it at the start of every request: comparing with another request's
/// last query is a bug of the original code (spec §9, item 15).
#[derive(Debug, Clone, Default)]
pub struct QueryHistory {
    prev: Vec<Option<Vec<f32>>>,
}

impl QueryHistory {
    /// History for `layers` layers, all empty.
    pub fn new(layers: usize) -> Self {
        Self {
            prev: vec![None; layers],
        }
    }

    /// The query recorded for `layer` at the previous step, if any.
    pub fn previous(&self, layer: usize) -> Option<&[f32]> {
        self.prev.get(layer)?.as_deref()
    }

    /// Record `q` as `layer`'s latest query (reusing the buffer).
    pub fn record(&mut self, layer: usize, q: &[f32]) -> Result<(), SelectError> {
        let limit = self.prev.len();
        let slot = self.prev.get_mut(layer).ok_or(SelectError::OutOfRange {
            what: "layer",
            index: layer,
            limit,
        })?;
        match slot {
            Some(v) => {
                v.clear();
                v.extend_from_slice(q);
            }
            None => *slot = Some(q.to_vec()),
        }
        Ok(())
    }

    /// Forget every recorded query (start of a new request).
    pub fn reset(&mut self) {
        self.prev.iter_mut().for_each(|p| *p = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_by_hand() {
        // (1, 0)·(1, 1) = 1, norms 1 and √2 → 1/√2
        let c = cosine(&[1.0, 0.0], &[1.0, 1.0]).unwrap();
        assert!((c - std::f32::consts::FRAC_1_SQRT_2).abs() / c < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]).unwrap(), 0.0);
        assert!(cosine(&[2.0, 0.0], &[-3.0, 0.0]).unwrap() < -0.999_999);
        assert!(cosine(&[1.0], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn cosine_sums_in_the_lane_order() {
        // 21 elements: two 8-chunks and a tail of 5, values whose sums round differently in
        // other orders.
        let a: Vec<f32> = (0..21)
            .map(|i| 1.0 + (i as f32) * 1e-3 + ((i * 7) % 5) as f32 * 3e4)
            .collect();
        let b: Vec<f32> = (0..21)
            .map(|i| -0.5 + ((i * 3) % 11) as f32 * 1.7e-2 - (i % 4) as f32 * 2e3)
            .collect();
        let lanes = |f: &dyn Fn(usize) -> f32| {
            let mut acc = [0.0f32; 8];
            for i in 0..16 {
                acc[i % 8] += f(i);
            }
            let tail = (16..21).fold(0.0f32, |s, i| s + f(i));
            (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])))
                + tail
        };
        let dot = lanes(&|i| a[i] * b[i]);
        let na = lanes(&|i| a[i] * a[i]);
        let nb = lanes(&|i| b[i] * b[i]);
        let want = dot / ((na * nb).sqrt() + 1e-12);
        assert_eq!(cosine(&a, &b).unwrap().to_bits(), want.to_bits());
    }

    #[test]
    fn flags_by_hand() {
        // 4 query heads, 2 KV heads, d = 2.
        // head cosines: h0: (1,0)-(1,0) = 1; h1: (1,0)-(0,1) = 0; h2: (1,0)-(1,1) = 0.7071;
        // h3: (1,0)-(-1,0) = -1.
        let prev = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let cur = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0];
        let mean = CorrectionPolicy::from_tau(0.4, CorrectionAggregate::Mean).unwrap();
        let f = mean.evaluate(&prev, &cur, 2, 2).unwrap();
        let h = &f.head_cosines;
        assert!((h[0] - 1.0).abs() < 1e-6 && h[1] == 0.0 && (h[3] + 1.0).abs() < 1e-6);
        assert!((h[2] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        // group means: 0.5 and (0.7071 − 1)/2 = −0.146
        assert!((f.group_cosines[0] - 0.5).abs() < 1e-6);
        assert!((f.group_cosines[1] - (h[2] + h[3]) / 2.0).abs() < 1e-7);
        assert_eq!(f.flagged, vec![false, true]);
        assert!(f.any());
        assert_eq!(f.count(), 1);
        assert_eq!(f.flagged_heads(), vec![1]);

        let max = CorrectionPolicy::from_tau(0.75, CorrectionAggregate::Max).unwrap();
        let f = max.evaluate(&prev, &cur, 2, 2).unwrap();
        assert!((f.group_cosines[0] - 1.0).abs() < 1e-6);
        assert!((f.group_cosines[1] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(f.flagged, vec![false, true]);

        let never = CorrectionPolicy::from_tau(-1.0, CorrectionAggregate::Mean).unwrap();
        assert!(!never.evaluate(&prev, &cur, 2, 2).unwrap().any());
        assert!(mean.evaluate(&prev, &cur, 2, 3).is_err());
        assert!(mean.evaluate(&prev[..6], &cur, 2, 2).is_err());
        assert!(mean.evaluate(&prev, &cur, 3, 2).is_err());
    }

    #[test]
    fn tau_validation_and_always() {
        for bad in [1.0001, -1.5, f32::NAN, f32::INFINITY] {
            assert!(CorrectionPolicy::from_tau(bad, CorrectionAggregate::Mean).is_err());
        }
        let one = CorrectionPolicy::from_tau(1.0, CorrectionAggregate::Mean).unwrap();
        assert!(one.is_always());
        assert_eq!(one.tau(), 1.0);
        // identical queries: cosine rounds to ~1, still flagged under always
        let q = [0.3, -0.7, 1.1, 0.2];
        let f = one.evaluate(&q, &q, 2, 1).unwrap();
        assert_eq!(f.flagged, vec![true]);
        let t = CorrectionPolicy::from_tau(0.9, CorrectionAggregate::Max).unwrap();
        assert!(!t.is_always());
        assert_eq!(t.tau(), 0.9);
        assert!(t.flags(0.899) && !t.flags(0.9) && t.flags(f32::NAN));
        assert_eq!(
            CorrectionPolicy::parse_tau("always", CorrectionAggregate::Mean).unwrap(),
            one
        );
        assert_eq!(
            CorrectionPolicy::parse_tau(" 0.9 ", CorrectionAggregate::Max).unwrap(),
            t
        );
        assert!(CorrectionPolicy::parse_tau("1.5", CorrectionAggregate::Mean).is_err());
        assert!(CorrectionPolicy::parse_tau("high", CorrectionAggregate::Mean).is_err());
        assert_eq!(t.to_string(), "tau=0.9 (max)");
        assert_eq!(one.to_string(), "always (mean)");
        assert_eq!(
            "avg".parse::<CorrectionAggregate>().unwrap(),
            CorrectionAggregate::Mean
        );
        assert!("min".parse::<CorrectionAggregate>().is_err());
    }

    #[test]
    fn history() {
        let mut h = QueryHistory::new(2);
        assert!(h.previous(0).is_none());
        h.record(1, &[1.0, 2.0]).unwrap();
        h.record(1, &[3.0]).unwrap();
        assert_eq!(h.previous(1).unwrap(), &[3.0]);
        assert!(h.record(2, &[1.0]).is_err());
        assert!(h.previous(5).is_none());
        h.reset();
        assert!(h.previous(1).is_none());
    }
}
