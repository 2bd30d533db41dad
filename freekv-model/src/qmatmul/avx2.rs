//! AVX2 + FMA + F16C kernels.
//!
//! Each function has the [`super::RowFn`] contract: `row` is one encoded row of `cols` weights,
//! `x` holds at least `T·cols` floats (`T` tokens), and for Q4_1 `sx` at least `T·cols/32`
//! per-block sums of `x`. Callers must have checked that the CPU has AVX2, FMA and F16C.
//!
//! Per 32-weight block the weights are unpacked once into four vectors of 8 `f32` (exact small
//! integers for the quantized types) and multiplied with every token of the tile: a block partial
//! `s = Σ q·x` (one `mul` + three `fma`), then `acc += d·s`. Q4_1's `m` term is `m·Σx`.

use std::arch::x86_64::*;

use super::QK;

/// Horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The scalar at `p` (an IEEE half) broadcast to 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bcast_half(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes at `p`.
    let bits = unsafe { std::ptr::read_unaligned(p.cast::<u16>()) };
    _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

/// `Σ_k q[k]·x[8k..8k+8]` for one token, as a vector of 8 partial sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_dot(q: &[__m256; 4], xb: *const f32) -> __m256 {
    // SAFETY: the caller guarantees 32 readable floats at `xb`.
    unsafe {
        let mut s = _mm256_mul_ps(q[0], _mm256_loadu_ps(xb));
        s = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(xb.add(8)), s);
        s = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xb.add(16)), s);
        _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xb.add(24)), s)
    }
}

/// Bytes 0..8 and 8..16 of `v` widened to two vectors of 8 `f32` (unsigned or signed bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_u8(v: __m128i) -> [__m256; 2] {
    [
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(v, v))),
    ]
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen_i8(v: __m128i) -> [__m256; 2] {
    [
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v))),
    ]
}

/// Q4_0: `w = d·(q − 8)`, `q − 8` formed in integers.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_0_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    _sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    let nb = cols / QK;
    debug_assert!(row.len() >= nb * 18 && x.len() >= T * cols);
    let mask = _mm_set1_epi8(0x0F);
    let eight = _mm_set1_epi8(8);
    let mut acc = [_mm256_setzero_ps(); T];
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    for b in 0..nb {
        // SAFETY: block `b` of the row and 32 floats per token at `32b` are in bounds (contract).
        unsafe {
            let blk = rp.add(b * 18);
            let d = bcast_half(blk);
            let qs = _mm_loadu_si128(blk.add(2).cast());
            let lo = _mm_sub_epi8(_mm_and_si128(qs, mask), eight);
            let hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(qs), mask), eight);
            let [q0, q1] = widen_i8(lo);
            let [q2, q3] = widen_i8(hi);
            let q = [q0, q1, q2, q3];
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(d, block_dot(&q, xp.add(j * cols + b * QK)), *a);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = hsum(a);
    }
}

/// Q4_1: `w = d·q + m`; `Σ w·x = d·Σ q·x + m·Σ x`.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4_1_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    let nb = cols / QK;
    debug_assert!(row.len() >= nb * 20 && x.len() >= T * cols && sx.len() >= T * nb);
    let mask = _mm_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); T];
    let mut macc = [0.0f32; T];
    let (rp, xp, sp) = (row.as_ptr(), x.as_ptr(), sx.as_ptr());
    for b in 0..nb {
        // SAFETY: block `b` of the row, 32 floats per token at `32b` and the block sums are in
        // bounds (contract).
        unsafe {
            let blk = rp.add(b * 20);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                blk.cast::<i32>(),
            )));
            let d = _mm256_broadcastss_ps(dm);
            let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            let qs = _mm_loadu_si128(blk.add(4).cast());
            let [q0, q1] = widen_u8(_mm_and_si128(qs, mask));
            let [q2, q3] = widen_u8(_mm_and_si128(_mm_srli_epi16::<4>(qs), mask));
            let q = [q0, q1, q2, q3];
            for (j, (a, ma)) in acc.iter_mut().zip(macc.iter_mut()).enumerate() {
                *a = _mm256_fmadd_ps(d, block_dot(&q, xp.add(j * cols + b * QK)), *a);
                *ma += m * *sp.add(j * nb + b);
            }
        }
    }
    for ((o, a), m) in out.iter_mut().zip(acc).zip(macc) {
        *o = hsum(a) + m;
    }
}

/// Q8_0: `w = d·q` with signed 8-bit `q`.
///
/// # Safety
/// See the module docs.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8_0_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    _sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    let nb = cols / QK;
    debug_assert!(row.len() >= nb * 34 && x.len() >= T * cols);
    let mut acc = [_mm256_setzero_ps(); T];
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    for b in 0..nb {
        // SAFETY: block `b` of the row and 32 floats per token at `32b` are in bounds (contract).
        unsafe {
            let blk = rp.add(b * 34);
            let d = bcast_half(blk);
            let lo = _mm_loadu_si128(blk.add(2).cast());
            let hi = _mm_loadu_si128(blk.add(18).cast());
            let [q0, q1] = widen_i8(lo);
            let [q2, q3] = widen_i8(hi);
            let q = [q0, q1, q2, q3];
            for (j, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(d, block_dot(&q, xp.add(j * cols + b * QK)), *a);
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = hsum(a);
    }
}

/// Plain float rows: 32-element steps (4 vectors loaded by `load8`, element offset), then a
/// scalar tail of `cols % 32` elements read by `load1`.
macro_rules! float_row {
    ($name:ident, $es:expr, $load8:expr, $load1:expr) => {
        /// # Safety
        /// See the module docs.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $name<const T: usize>(
            row: &[u8],
            x: &[f32],
            _sx: &[f32],
            cols: usize,
            out: &mut [f32; T],
        ) {
            debug_assert!(row.len() >= cols * $es && x.len() >= T * cols);
            let main = cols / QK * QK;
            let mut acc = [_mm256_setzero_ps(); T];
            let (rp, xp) = (row.as_ptr(), x.as_ptr());
            let mut c = 0;
            while c < main {
                // SAFETY: elements c..c+32 of the row and of each token are in bounds (contract).
                unsafe {
                    let q = [
                        $load8(rp, c),
                        $load8(rp, c + 8),
                        $load8(rp, c + 16),
                        $load8(rp, c + 24),
                    ];
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_add_ps(*a, block_dot(&q, xp.add(j * cols + c)));
                    }
                }
                c += QK;
            }
            let mut tail = [0.0f32; T];
            for c in main..cols {
                // SAFETY: element c < cols of the row and of each token (contract).
                unsafe {
                    let w: f32 = $load1(rp, c);
                    for (j, t) in tail.iter_mut().enumerate() {
                        *t += w * *xp.add(j * cols + c);
                    }
                }
            }
            for ((o, a), t) in out.iter_mut().zip(acc).zip(tail) {
                *o = hsum(a) + t;
            }
        }
    };
}

float_row!(
    f32_row,
    4,
    |p: *const u8, c: usize| _mm256_loadu_ps(p.add(4 * c).cast()),
    |p: *const u8, c: usize| std::ptr::read_unaligned(p.add(4 * c).cast::<f32>())
);
float_row!(
    f16_row,
    2,
    |p: *const u8, c: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * c).cast())),
    |p: *const u8, c: usize| half::f16::from_bits(std::ptr::read_unaligned(
        p.add(2 * c).cast::<u16>()
    ))
    .to_f32()
);
float_row!(
    bf16_row,
    2,
    |p: *const u8, c: usize| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
        _mm_loadu_si128(p.add(2 * c).cast())
    ))),
    |p: *const u8, c: usize| half::bf16::from_bits(std::ptr::read_unaligned(
        p.add(2 * c).cast::<u16>()
    ))
    .to_f32()
);
