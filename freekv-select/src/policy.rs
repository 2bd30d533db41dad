//! Group-consistent aggregation: the `G` query heads that share a KV head agree on one page set,
//! ranked by one group score per candidate page.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use crate::score::score_pages;
use crate::{HeadSummaries, SelectError};

/// How the per-query-head page scores of a GQA group become one group score per page.
///
/// Softmaxes run over the **candidate** pages only (sink and window pages excluded), with no
/// temperature and no `1/√d`: `softmax(s)[p] = exp(s[p] − max s) / Σ exp(s[·] − max s)`, with the
/// crate's own fp32 `exp` (documented at `exp_f32` in the source: platform independent, ≤ 2 ulp,
/// 0 below −87) and the exponentials summed in the 8-lane order of the scores. Means are
/// `(Σ_j x_j) / G`, summed in head order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GroupPolicy {
    /// The paper's "MeanS" (`avgSM`): per-head softmax over the candidates, then the mean over
    /// the `G` heads. The default (the accuracy path of the paper).
    #[default]
    MeanSoftmax,
    /// Max over the heads of the raw scores (`maxS`, the Quest baseline's choice).
    MaxScore,
    /// Mean over the heads of the raw scores (`avgS`, the upstream efficiency path's choice).
    MeanScore,
    /// Max over the heads of the per-head softmax (`maxSM`).
    MaxSoftmax,
    /// Pool the `G` queries first — element-wise **mean** — then score the pooled query (`avgQ`).
    PooledQuery,
    /// Pool the `G` queries first — element-wise **max** — then score the pooled query (`maxQ`).
    PooledMaxQuery,
}

impl GroupPolicy {
    /// Every policy, in declaration order.
    pub const ALL: [GroupPolicy; 6] = [
        GroupPolicy::MeanSoftmax,
        GroupPolicy::MaxScore,
        GroupPolicy::MeanScore,
        GroupPolicy::MaxSoftmax,
        GroupPolicy::PooledQuery,
        GroupPolicy::PooledMaxQuery,
    ];

    /// Canonical name, the one [`FromStr`] accepts and [`fmt::Display`] prints.
    pub fn name(self) -> &'static str {
        match self {
            GroupPolicy::MeanSoftmax => "mean-softmax",
            GroupPolicy::MaxScore => "max-score",
            GroupPolicy::MeanScore => "mean-score",
            GroupPolicy::MaxSoftmax => "max-softmax",
            GroupPolicy::PooledQuery => "pooled-query",
            GroupPolicy::PooledMaxQuery => "pooled-max-query",
        }
    }
}

impl fmt::Display for GroupPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GroupPolicy {
    type Err = SelectError;

    /// Accepts the canonical names and the upstream spellings (`avgSM`/`means`, `maxS`, `avgS`,
    /// `maxSM`, `avgQ`, `maxQ`), case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mean-softmax" | "means" | "avgsm" => Ok(GroupPolicy::MeanSoftmax),
            "max-score" | "maxs" => Ok(GroupPolicy::MaxScore),
            "mean-score" | "avgs" => Ok(GroupPolicy::MeanScore),
            "max-softmax" | "maxsm" => Ok(GroupPolicy::MaxSoftmax),
            "pooled-query" | "mean-query" | "avgq" => Ok(GroupPolicy::PooledQuery),
            "pooled-max-query" | "max-query" | "maxq" => Ok(GroupPolicy::PooledMaxQuery),
            _ => Err(SelectError::UnknownName {
                what: "group policy",
                name: s.to_string(),
                expected: "mean-softmax, max-score, mean-score, max-softmax, pooled-query, pooled-max-query",
            }),
        }
    }
}

/// `exp(x)` in fp32 by this crate's own algorithm, so that selections do not depend on the
/// platform's libm and the softmax loop vectorises: Cody–Waite reduction `x = n·ln2 + r`
/// (`n = round(x·log2 e)` to nearest even, `ln2 = 0.693359375 − 2.12194440e−4`), the Cephes
/// degree-7 polynomial for `e^r` on `|r| ≤ ln2/2`, scaling by `2^n` through the exponent bits.
/// Inputs are clamped to `[−87, 88]`; `x < −87` gives exactly 0 (in a softmax the largest term
/// is 1, so such terms are below 1.7e−38 relative). Error ≤ 2 ulp on the clamped range.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4; // 0.693359375, exact in 9 bits
    const C2: f32 = -2.121_944_4e-4;
    const SHIFTER: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer (nearest even)
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = (xc - n * C1) - n * C2;
    let z = r * r;
    let p = (((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5)
        * z
        + r
        + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    if x < -87.0 { 0.0 } else { p * scale }
}

const LANES: usize = 8;

/// Sum in the 8-lane order of [`score_pages`]: lane `k` sums `v[i]`, `i ≡ k (mod 8)`, over the
/// whole 8-chunks, lanes combined `((a0+a4)+(a2+a6))+((a1+a5)+(a3+a7))`, then the tail (summed
/// in order) added last.
#[inline(always)]
fn lane_sum(v: &[f32]) -> f32 {
    let (chunks, rest) = v.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k];
        }
    }
    let tail = rest.iter().fold(0.0f32, |s, &x| s + x);
    (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))) + tail
}

/// Largest element (NaNs ignored; `-∞` for an empty or all-NaN row). Max is exact, so the lane
/// split does not change the result.
#[inline(always)]
fn lane_max(v: &[f32]) -> f32 {
    let (chunks, rest) = v.as_chunks::<LANES>();
    let mut acc = [f32::NEG_INFINITY; LANES];
    for c in chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    let m = rest
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    acc.iter().fold(m, |m, &x| if x > m { x } else { m })
}

/// In-place softmax of one row: `e_p = exp_f32(s_p − max s)`, `e_p / Σ e` with the sum in
/// [`lane_sum`] order.
#[inline(always)]
fn softmax_in_place(row: &mut [f32]) {
    let m = lane_max(row);
    for x in row.iter_mut() {
        *x = exp_f32(*x - m);
    }
    let sum = lane_sum(row);
    for x in row.iter_mut() {
        *x /= sum;
    }
}

/// Pool `G` queries (`G × d`) into one `d`-vector: mean or element-wise max, in head order.
fn pool_queries(queries: &[f32], d: usize, mean: bool) -> Vec<f32> {
    let mut rows = queries.chunks_exact(d);
    let mut pooled = rows.next().map(<[f32]>::to_vec).unwrap_or_default();
    let mut g = 1usize;
    for row in rows {
        g += 1;
        for (p, &x) in pooled.iter_mut().zip(row) {
            if mean {
                *p += x;
            } else if x > *p {
                *p = x;
            }
        }
    }
    if mean {
        let gf = g as f32;
        pooled.iter_mut().for_each(|p| *p /= gf);
    }
    pooled
}

#[inline(always)]
fn combine_body(softmax: bool, mean: bool, per_head: &mut [f32], n: usize, out: &mut [f32]) {
    if n == 0 {
        return;
    }
    if softmax {
        per_head.chunks_exact_mut(n).for_each(softmax_in_place);
    }
    let mut rows = per_head.chunks_exact(n);
    let Some(first) = rows.next() else {
        return;
    };
    out.copy_from_slice(first);
    let mut g = 1usize;
    for row in rows {
        g += 1;
        if mean {
            for (o, &x) in out.iter_mut().zip(row) {
                *o += x;
            }
        } else {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = if x > *o { x } else { *o };
            }
        }
    }
    if mean {
        let gf = g as f32;
        out.iter_mut().for_each(|o| *o /= gf);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn combine_avx2(softmax: bool, mean: bool, per_head: &mut [f32], n: usize, out: &mut [f32]) {
    combine_body(softmax, mean, per_head, n, out)
}

/// Combine per-head scores (`per_head`: `G × n`, head-major) into `out` (`n`) with `policy`
/// (not a pooled policy: those score a pooled query instead). The softmax policies overwrite
/// `per_head` with the per-head softmax. AVX2 when available, bit-identical to the portable path
/// (same IEEE operations, no FMA).
fn combine(policy: GroupPolicy, per_head: &mut [f32], n: usize, out: &mut [f32]) {
    let softmax = matches!(policy, GroupPolicy::MeanSoftmax | GroupPolicy::MaxSoftmax);
    let mean = matches!(policy, GroupPolicy::MeanSoftmax | GroupPolicy::MeanScore);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was detected at run time just above.
        unsafe { combine_avx2(softmax, mean, per_head, n, out) };
        return;
    }
    combine_body(softmax, mean, per_head, n, out)
}

/// Group scores of the candidate pages `candidates` for one KV group: the `G` query heads
/// `queries` (`G × d`, head-major) are scored against `summaries` and combined with `policy`.
/// Returns one fp32 score per candidate page (`candidates.len()` values, in page order).
pub fn group_scores(
    policy: GroupPolicy,
    queries: &[f32],
    summaries: HeadSummaries<'_>,
    candidates: Range<usize>,
) -> Result<Vec<f32>, SelectError> {
    let d = summaries.head_dim();
    if queries.is_empty() || !queries.len().is_multiple_of(d) {
        return Err(SelectError::SizeMismatch {
            what: "queries of a KV group (G × head_dim, G ≥ 1)",
            expected: d * (queries.len() / d).max(1),
            got: queries.len(),
        });
    }
    let n = candidates.end.saturating_sub(candidates.start);
    let mut out = vec![0.0f32; n];
    match policy {
        GroupPolicy::PooledQuery | GroupPolicy::PooledMaxQuery => {
            let pooled = pool_queries(queries, d, policy == GroupPolicy::PooledQuery);
            score_pages(&pooled, summaries, candidates, &mut out)?;
        }
        _ => {
            let g = queries.len() / d;
            let mut per_head = vec![0.0f32; g * n];
            score_pages(queries, summaries, candidates, &mut per_head)?;
            combine(policy, &mut per_head, n, &mut out);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SummaryKind;

    fn close(a: f32, b: f32) -> bool {
        ((a - b) / b.abs().max(1e-30)).abs() < 1e-6
    }

    /// d = 2, 3 pages, G = 2.
    /// U/L per page: p0: U=(1,0) L=(0,-1); p1: U=(2,1) L=(-1,0); p2: U=(0,3) L=(-2,1)
    /// q0 = (1, 1):  p0 = 1 + 0 = 1;  p1 = 2 + 1 = 3;  p2 = 0 + 3 = 3
    /// q1 = (-1, 2): p0 = 0 + 0 = 0;  p1 = 1 + 2 = 3;  p2 = 2 + 6 = 8
    fn fixture() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let upper = vec![1.0, 0.0, 2.0, 1.0, 0.0, 3.0];
        let lower = vec![0.0, -1.0, -1.0, 0.0, -2.0, 1.0];
        let q = vec![1.0, 1.0, -1.0, 2.0];
        (upper, lower, q)
    }

    fn run(policy: GroupPolicy) -> Vec<f32> {
        let (u, l, q) = fixture();
        let s = HeadSummaries::new(SummaryKind::MinMax, 2, &u, &l).unwrap();
        group_scores(policy, &q, s, 0..3).unwrap()
    }

    fn sm(v: &[f32]) -> Vec<f32> {
        let m = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = v.iter().map(|x| (x - m).exp()).collect();
        let s: f32 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    #[test]
    fn raw_score_policies() {
        assert_eq!(run(GroupPolicy::MaxScore), vec![1.0, 3.0, 8.0]);
        assert_eq!(run(GroupPolicy::MeanScore), vec![0.5, 3.0, 5.5]);
    }

    #[test]
    fn softmax_policies() {
        let a = sm(&[1.0, 3.0, 3.0]);
        let b = sm(&[0.0, 3.0, 8.0]);
        let mean = run(GroupPolicy::MeanSoftmax);
        let max = run(GroupPolicy::MaxSoftmax);
        for p in 0..3 {
            assert!(close(mean[p], (a[p] + b[p]) / 2.0), "{mean:?}");
            assert!(close(max[p], a[p].max(b[p])), "{max:?}");
        }
        // MeanS ranks p2 first (≈0.49 vs ≈0.22 for p1), p0 last
        assert!(mean[2] > mean[1] && mean[1] > mean[0]);
        // softmax rows sum to one → group means too
        assert!(close(mean.iter().sum::<f32>(), 1.0));
    }

    #[test]
    fn pooled_policies() {
        // mean query = (0, 1.5): p0 = 0 + 0 = 0; p1 = 0 + 1.5 = 1.5; p2 = 0 + 4.5 = 4.5
        assert_eq!(run(GroupPolicy::PooledQuery), vec![0.0, 1.5, 4.5]);
        // max query = (1, 2): p0 = 1 + 0 = 1; p1 = 2 + 2 = 4; p2 = 0 + 6 = 6
        assert_eq!(run(GroupPolicy::PooledMaxQuery), vec![1.0, 4.0, 6.0]);
    }

    #[test]
    fn candidate_subrange_and_single_head() {
        let (u, l, q) = fixture();
        let s = HeadSummaries::new(SummaryKind::MinMax, 2, &u, &l).unwrap();
        assert_eq!(
            group_scores(GroupPolicy::MaxScore, &q, s, 1..3).unwrap(),
            vec![3.0, 8.0]
        );
        // softmax over the candidates only: two candidates 3 and 8 for head 1
        let m = group_scores(GroupPolicy::MeanSoftmax, &q, s, 1..3).unwrap();
        let a = sm(&[3.0, 3.0]);
        let b = sm(&[3.0, 8.0]);
        assert!(close(m[0], (a[0] + b[0]) / 2.0) && close(m[1], (a[1] + b[1]) / 2.0));
        // G = 1: every policy ranks like the raw score
        for p in GroupPolicy::ALL {
            let r = group_scores(p, &q[..2], s, 0..3).unwrap();
            // raw scores 1, 3, 3: strictly below, then an exact tie
            assert!(r[0] < r[1], "{p}: {r:?}");
            assert_eq!(r[1], r[2], "{p}");
        }
        assert!(
            group_scores(GroupPolicy::MeanSoftmax, &q, s, 2..2)
                .unwrap()
                .is_empty()
        );
        assert!(group_scores(GroupPolicy::MeanSoftmax, &q[..3], s, 0..3).is_err());
        assert!(group_scores(GroupPolicy::MeanSoftmax, &q, s, 0..4).is_err());
    }

    #[test]
    fn exp_accuracy_and_edges() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-87.5), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn lane_helpers() {
        let v: Vec<f32> = (0..21).map(|i| (i as f32 - 7.5) * 0.3).collect();
        let mut acc = [0.0f32; 8];
        for (i, &x) in v[..16].iter().enumerate() {
            acc[i % 8] += x;
        }
        let want = (((acc[0] + acc[4]) + (acc[2] + acc[6]))
            + ((acc[1] + acc[5]) + (acc[3] + acc[7])))
            + ((v[16] + v[17]) + v[18] + v[19] + v[20]);
        assert_eq!(lane_sum(&v).to_bits(), want.to_bits());
        assert_eq!(lane_max(&v), v[20]);
        assert_eq!(lane_max(&[f32::NAN, -3.0]), -3.0);
        assert_eq!(lane_max(&[]), f32::NEG_INFINITY);
        let mut row = vec![1.0, 3.0, 3.0];
        softmax_in_place(&mut row);
        assert!(close(row.iter().sum::<f32>(), 1.0) && row[1] == row[2] && row[0] < row[1]);
    }

    #[test]
    fn dispatched_and_portable_combine_agree() {
        let n = 37;
        let g = 3;
        let base: Vec<f32> = (0..g * n)
            .map(|i| ((i * 37) % 23) as f32 * 0.7 - 6.0)
            .collect();
        for policy in [
            GroupPolicy::MeanSoftmax,
            GroupPolicy::MaxSoftmax,
            GroupPolicy::MeanScore,
            GroupPolicy::MaxScore,
        ] {
            let (mut a, mut b) = (base.clone(), base.clone());
            let (mut oa, mut ob) = (vec![0.0; n], vec![0.0; n]);
            combine(policy, &mut a, n, &mut oa);
            let softmax = matches!(policy, GroupPolicy::MeanSoftmax | GroupPolicy::MaxSoftmax);
            let mean = matches!(policy, GroupPolicy::MeanSoftmax | GroupPolicy::MeanScore);
            combine_body(softmax, mean, &mut b, n, &mut ob);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&oa), bits(&ob), "{policy}");
        }
    }

    #[test]
    fn names_round_trip() {
        for p in GroupPolicy::ALL {
            assert_eq!(p.name().parse::<GroupPolicy>().unwrap(), p);
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!(
            "avgSM".parse::<GroupPolicy>().unwrap(),
            GroupPolicy::MeanSoftmax
        );
        assert_eq!(
            "maxQ".parse::<GroupPolicy>().unwrap(),
            GroupPolicy::PooledMaxQuery
        );
        assert!("median".parse::<GroupPolicy>().is_err());
        assert_eq!(GroupPolicy::default(), GroupPolicy::MeanSoftmax);
    }
}
