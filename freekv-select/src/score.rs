//! Page scores: `s[j, p] = Σ_i max(q_j,i · U_p,i, q_j,i · L_p,i)` for query head `j` and page `p`.

use std::ops::Range;

use crate::{HeadSummaries, SelectError};

const LANES: usize = 8;

/// Combine the 8 lane accumulators and the tail in the canonical order (see [`score_pages`]).
#[inline(always)]
fn reduce(acc: &[f32; LANES], tail: f32) -> f32 {
    (((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))) + tail
}

/// One term of the score: `max(q·u, q·l)`.
#[inline(always)]
fn term(q: f32, u: f32, l: f32) -> f32 {
    let a = q * u;
    let b = q * l;
    if a > b { a } else { b }
}

/// The bound score of one query against one page summary, in the canonical order (see
/// [`score_pages`]).
#[inline(always)]
fn bound_dot(q: &[f32], u: &[f32], l: &[f32]) -> f32 {
    let (qc, qr) = q.as_chunks::<LANES>();
    let (uc, ur) = u.as_chunks::<LANES>();
    let (lc, lr) = l.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for ((qq, uu), ll) in qc.iter().zip(uc).zip(lc) {
        for k in 0..LANES {
            acc[k] += term(qq[k], uu[k], ll[k]);
        }
    }
    let mut tail = 0.0f32;
    for ((&x, &y), &z) in qr.iter().zip(ur).zip(lr) {
        tail += term(x, y, z);
    }
    reduce(&acc, tail)
}

/// A scoring kernel: `NP` pages × `NQ` queries per call, every (page, query) pair summed in
/// exactly the canonical order of [`bound_dot`]. Tiling only gives the CPU independent
/// dependency chains (the fp32 add latency would otherwise bound the loop) and lets one load of
/// a summary chunk serve `NQ` queries.
trait Kernel {
    /// Scores of `us[p]`/`ls[p]` against `qs[j]`, all rows of length `d`.
    ///
    /// # Safety
    /// The CPU must support the kernel's instruction set.
    unsafe fn tile<const NP: usize, const NQ: usize>(
        qs: &[&[f32]; NQ],
        us: &[&[f32]; NP],
        ls: &[&[f32]; NP],
        d: usize,
    ) -> [[f32; NQ]; NP];
}

/// Portable kernel: one [`bound_dot`] per pair.
struct Portable;

impl Kernel for Portable {
    #[inline(always)]
    unsafe fn tile<const NP: usize, const NQ: usize>(
        qs: &[&[f32]; NQ],
        us: &[&[f32]; NP],
        ls: &[&[f32]; NP],
        _d: usize,
    ) -> [[f32; NQ]; NP] {
        std::array::from_fn(|p| std::array::from_fn(|j| bound_dot(qs[j], us[p], ls[p])))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Kernel, LANES, reduce, term};
    use std::arch::x86_64::*;

    /// AVX2 kernel: one `__m256` accumulator per (page, query) pair holds the 8 lanes of the
    /// canonical order. `_mm256_max_ps(a, b)` is `if a > b { a } else { b }` lane-wise, exactly
    /// the portable `term`; no FMA.
    pub(super) struct Avx2;

    #[inline]
    #[target_feature(enable = "avx2")]
    fn load(c: &[f32; LANES]) -> __m256 {
        // SAFETY: `c` is 8 valid, readable f32s; the load is unaligned.
        unsafe { _mm256_loadu_ps(c.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile_avx2<const NP: usize, const NQ: usize>(
        qs: &[&[f32]; NQ],
        us: &[&[f32]; NP],
        ls: &[&[f32]; NP],
        d: usize,
    ) -> [[f32; NQ]; NP] {
        let chunks = d / LANES;
        let qc: [&[[f32; LANES]]; NQ] = std::array::from_fn(|j| qs[j].as_chunks::<LANES>().0);
        let uc: [&[[f32; LANES]]; NP] = std::array::from_fn(|p| us[p].as_chunks::<LANES>().0);
        let lc: [&[[f32; LANES]]; NP] = std::array::from_fn(|p| ls[p].as_chunks::<LANES>().0);
        let mut acc = [[_mm256_setzero_ps(); NQ]; NP];
        for c in 0..chunks {
            let qv: [__m256; NQ] = std::array::from_fn(|j| load(&qc[j][c]));
            for p in 0..NP {
                let u = load(&uc[p][c]);
                let l = load(&lc[p][c]);
                for j in 0..NQ {
                    let a = _mm256_mul_ps(qv[j], u);
                    let b = _mm256_mul_ps(qv[j], l);
                    acc[p][j] = _mm256_add_ps(acc[p][j], _mm256_max_ps(a, b));
                }
            }
        }
        let body = chunks * LANES;
        let mut out = [[0.0f32; NQ]; NP];
        for p in 0..NP {
            for j in 0..NQ {
                let mut lanes = [0.0f32; LANES];
                // SAFETY: `lanes` has room for 8 f32s; the store is unaligned.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[p][j]) };
                let mut tail = 0.0f32;
                for i in body..d {
                    tail += term(qs[j][i], us[p][i], ls[p][i]);
                }
                out[p][j] = reduce(&lanes, tail);
            }
        }
        out
    }

    impl Kernel for Avx2 {
        #[inline(always)]
        unsafe fn tile<const NP: usize, const NQ: usize>(
            qs: &[&[f32]; NQ],
            us: &[&[f32]; NP],
            ls: &[&[f32]; NP],
            d: usize,
        ) -> [[f32; NQ]; NP] {
            // SAFETY: the caller guarantees AVX2 (the `Kernel::tile` contract).
            unsafe { tile_avx2::<NP, NQ>(qs, us, ls, d) }
        }
    }
}

/// Row `p` (`d` values) of a page-major matrix.
#[inline(always)]
fn row(m: &[f32], d: usize, p: usize) -> &[f32] {
    &m[p * d..(p + 1) * d]
}

/// Score query heads `j0 .. j0 + NQ` against every page row, `NP` pages per tile.
///
/// # Safety
/// The CPU must support `K`'s instruction set.
#[inline(always)]
unsafe fn score_block<K: Kernel, const NP: usize, const NQ: usize>(
    queries: &[f32],
    j0: usize,
    upper: &[f32],
    lower: &[f32],
    d: usize,
    out: &mut [f32],
) {
    let n = upper.len() / d;
    let qs: [&[f32]; NQ] = std::array::from_fn(|j| row(queries, d, j0 + j));
    let mut p0 = 0;
    while p0 + NP <= n {
        let us: [&[f32]; NP] = std::array::from_fn(|i| row(upper, d, p0 + i));
        let ls: [&[f32]; NP] = std::array::from_fn(|i| row(lower, d, p0 + i));
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { K::tile::<NP, NQ>(&qs, &us, &ls, d) };
        for (i, rp) in r.iter().enumerate() {
            for (j, &v) in rp.iter().enumerate() {
                out[(j0 + j) * n + p0 + i] = v;
            }
        }
        p0 += NP;
    }
    while p0 < n {
        let (us, ls) = ([row(upper, d, p0)], [row(lower, d, p0)]);
        // SAFETY: forwarded from this function's contract.
        let r = unsafe { K::tile::<1, NQ>(&qs, &us, &ls, d) };
        for (j, &v) in r[0].iter().enumerate() {
            out[(j0 + j) * n + p0] = v;
        }
        p0 += 1;
    }
}

/// Core loop: `out[g * n + p] = bound_dot(q_g, U_p, L_p)` for every page row `p` of
/// `upper`/`lower` (`n × d`) and every query `g` of `queries` (`G × d`). Queries are taken in
/// blocks of up to 4; within a block every page's summary is read once for the whole block.
/// Callers guarantee `upper.len() == lower.len()`, both multiples of `d`, `queries.len()` a
/// multiple of `d` and `out.len() == G * n`.
///
/// # Safety
/// The CPU must support `K`'s instruction set.
#[inline(always)]
unsafe fn score_rows_body<K: Kernel>(
    queries: &[f32],
    upper: &[f32],
    lower: &[f32],
    d: usize,
    out: &mut [f32],
) {
    let g = queries.len() / d;
    let mut j0 = 0;
    while j0 < g {
        let b = (g - j0).min(4);
        // SAFETY: forwarded from this function's contract.
        unsafe {
            match b {
                4 => score_block::<K, 1, 4>(queries, j0, upper, lower, d, out),
                3 => score_block::<K, 1, 3>(queries, j0, upper, lower, d, out),
                2 => score_block::<K, 2, 2>(queries, j0, upper, lower, d, out),
                _ => score_block::<K, 4, 1>(queries, j0, upper, lower, d, out),
            }
        }
        j0 += b;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn score_rows_avx2(queries: &[f32], upper: &[f32], lower: &[f32], d: usize, out: &mut [f32]) {
    // SAFETY: this function is only compiled and called with AVX2 available.
    unsafe { score_rows_body::<avx2::Avx2>(queries, upper, lower, d, out) }
}

fn score_rows_portable(queries: &[f32], upper: &[f32], lower: &[f32], d: usize, out: &mut [f32]) {
    // SAFETY: the portable kernel needs no special instruction.
    unsafe { score_rows_body::<Portable>(queries, upper, lower, d, out) }
}

fn score_rows(queries: &[f32], upper: &[f32], lower: &[f32], d: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was detected at run time just above.
        unsafe { score_rows_avx2(queries, upper, lower, d, out) };
        return;
    }
    score_rows_portable(queries, upper, lower, d, out)
}

/// Score of one query head against one page summary: `Σ_i max(q_i·U_i, q_i·L_i)` in the
/// canonical order described at [`score_pages`]. All three slices must have the same length.
pub fn page_score(q: &[f32], upper: &[f32], lower: &[f32]) -> Result<f32, SelectError> {
    for (what, v) in [("summary upper", upper), ("summary lower", lower)] {
        if v.len() != q.len() {
            return Err(SelectError::SizeMismatch {
                what,
                expected: q.len(),
                got: v.len(),
            });
        }
    }
    Ok(bound_dot(q, upper, lower))
}

/// Score the query heads `queries` (`G × d`, head-major) against the summarised pages `pages`
/// of one KV head. `out` receives `G × pages.len()` scores, head-major:
/// `out[g * pages.len() + (p − pages.start)]`.
///
/// This is the hot loop of selection (every sparse layer, every step, every page): the upper and
/// lower vectors of the range are streamed once, each page's pair scored against all `G` queries
/// while it is in cache. AVX2 is used when the CPU has it, with bit-identical results.
///
/// # Summation order (part of the contract)
///
/// The sum over `i` is computed in fp32 with 8 lane accumulators: lane `k` accumulates the terms
/// `i ≡ k (mod 8)` for `i < 8·⌊d/8⌋` in increasing `i`; the lanes are combined as
/// `((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))`; the remaining `d mod 8` terms are summed
/// in increasing `i` into a separate accumulator that is added last. Products are separate
/// multiplications (no fused multiply-add) and `max(a, b)` is `if a > b { a } else { b }`. The
/// result is therefore bit-identical whatever instruction set runs it (the AVX2 path and the
/// portable path compute exactly the same operations), and a GPU kernel that follows the same
/// order reproduces it.
pub fn score_pages(
    queries: &[f32],
    summaries: HeadSummaries<'_>,
    pages: Range<usize>,
    out: &mut [f32],
) -> Result<(), SelectError> {
    let d = summaries.head_dim();
    if queries.is_empty() || !queries.len().is_multiple_of(d) {
        return Err(SelectError::SizeMismatch {
            what: "queries of a KV group (G × head_dim, G ≥ 1)",
            expected: d * (queries.len() / d).max(1),
            got: queries.len(),
        });
    }
    if pages.start > pages.end {
        return Err(SelectError::InvalidPageSet {
            what: "page range",
            reason: format!("start {} is past end {}", pages.start, pages.end),
        });
    }
    if pages.end > summaries.num_pages() {
        return Err(SelectError::MissingSummaries {
            needed: pages.end,
            have: summaries.num_pages(),
        });
    }
    let groups = queries.len() / d;
    let n = pages.end - pages.start;
    if out.len() != groups * n {
        return Err(SelectError::SizeMismatch {
            what: "score output (G × pages)",
            expected: groups * n,
            got: out.len(),
        });
    }
    let rows = pages.start * d..pages.end * d;
    let (Some(upper), Some(lower)) = (
        summaries.upper_all().get(rows.clone()),
        summaries.lower_all().get(rows),
    ) else {
        return Err(SelectError::MissingSummaries {
            needed: pages.end,
            have: summaries.num_pages(),
        });
    };
    score_rows(queries, upper, lower, d, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SummaryKind;

    /// Straightforward sequential reference (different summation order).
    fn naive(q: &[f32], u: &[f32], l: &[f32]) -> f64 {
        q.iter()
            .zip(u)
            .zip(l)
            .map(|((&q, &u), &l)| (q as f64 * u as f64).max(q as f64 * l as f64))
            .sum()
    }

    #[test]
    fn hand_computed_score() {
        // q = (1, -2, 0.5), U = (2, 1, -1), L = (-1, -3, -2)
        // terms: max(2, -1) = 2; max(-2, 6) = 6; max(-0.5, -1) = -0.5 → 7.5
        let s = page_score(&[1.0, -2.0, 0.5], &[2.0, 1.0, -1.0], &[-1.0, -3.0, -2.0]).unwrap();
        assert_eq!(s, 7.5);
        assert!(page_score(&[1.0], &[1.0, 2.0], &[1.0]).is_err());
    }

    #[test]
    fn canonical_order_is_documented_order() {
        // d = 19: two full chunks plus a 3-term tail, with values whose sum depends on order.
        let d = 19;
        let q: Vec<f32> = (0..d)
            .map(|i| if i % 3 == 0 { 1.0 } else { -1.0 })
            .collect();
        let u: Vec<f32> = (0..d).map(|i| 1.0e7 / (i as f32 + 1.0) + 0.3).collect();
        let l: Vec<f32> = (0..d).map(|i| -(i as f32) * 1.7e6).collect();
        let t: Vec<f32> = (0..d)
            .map(|i| {
                let a = q[i] * u[i];
                let b = q[i] * l[i];
                if a > b { a } else { b }
            })
            .collect();
        let mut acc = [0.0f32; 8];
        for i in 0..16 {
            acc[i % 8] += t[i];
        }
        let tail = (t[16] + t[17]) + t[18];
        let want = (((acc[0] + acc[4]) + (acc[2] + acc[6]))
            + ((acc[1] + acc[5]) + (acc[3] + acc[7])))
            + tail;
        assert_eq!(page_score(&q, &u, &l).unwrap().to_bits(), want.to_bits());
    }

    #[test]
    fn score_pages_layout_and_paths_agree() {
        let d = 12;
        let pages = 5;
        let upper: Vec<f32> = (0..pages * d)
            .map(|i| ((i * 7) % 11) as f32 - 3.0)
            .collect();
        let lower: Vec<f32> = upper.iter().map(|u| u - 2.5).collect();
        let s = HeadSummaries::new(SummaryKind::MinMax, d, &upper, &lower).unwrap();
        let q: Vec<f32> = (0..2 * d)
            .map(|i| ((i * 5) % 7) as f32 * 0.25 - 0.8)
            .collect();
        let mut out = vec![0.0; 2 * 3];
        score_pages(&q, s, 1..4, &mut out).unwrap();
        let mut portable = vec![0.0; 2 * 3];
        score_rows_portable(&q, &upper[d..4 * d], &lower[d..4 * d], d, &mut portable);
        for g in 0..2 {
            for (j, p) in (1..4).enumerate() {
                let qg = &q[g * d..(g + 1) * d];
                let want = page_score(qg, s.upper(p).unwrap(), s.lower(p).unwrap()).unwrap();
                assert_eq!(out[g * 3 + j].to_bits(), want.to_bits());
                assert_eq!(portable[g * 3 + j].to_bits(), want.to_bits());
                let n = naive(qg, s.upper(p).unwrap(), s.lower(p).unwrap());
                assert!(((out[g * 3 + j] as f64 - n) / n.abs().max(1e-3)).abs() < 1e-5);
            }
        }
        // errors
        assert!(score_pages(&q, s, 0..6, &mut [0.0; 12]).is_err());
        assert!(score_pages(&q[..d - 1], s, 0..1, &mut [0.0]).is_err());
        assert!(score_pages(&[], s, 0..1, &mut []).is_err());
        assert!(score_pages(&q, s, 0..2, &mut [0.0; 3]).is_err());
        let mut none: [f32; 0] = [];
        score_pages(&q, s, 2..2, &mut none).unwrap();
    }
}
