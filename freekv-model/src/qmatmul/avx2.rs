//! AVX2 + FMA + F16C kernels.
//!
//! Every 32-weight block is expanded to four vectors of 8 `f32` weights inside registers
//! (integer unpack, `cvtdq2ps`, then `d·q` or `fma(d, q, m)`), and those four vectors are
//! multiplied with every token of the tile. Nothing but the quantized bytes is read from the
//! weight matrix.

use std::arch::x86_64::*;
use std::ops::Range;

use super::QK;

/// One weight encoding: how to expand a 32-element block into 4 × 8 `f32`.
pub(super) trait Block {
    /// Encoded bytes per 32 elements.
    const BYTES: usize;
    /// Whether rows may end in a partial block (`cols % 32` trailing elements; plain floats).
    const TAIL: bool = false;
    /// The 32 weights of the block at `p`, in order, as 4 vectors.
    ///
    /// # Safety
    /// `BYTES` readable bytes at `p`; AVX2, FMA and F16C available.
    unsafe fn decode(p: *const u8) -> [__m256; 4];
    /// Element `i` of a row starting at `p` (only used for the tail of plain-float rows).
    ///
    /// # Safety
    /// Element `i` is in bounds.
    unsafe fn elem(_p: *const u8, _i: usize) -> f32 {
        0.0
    }
}

/// The IEEE half at `p` broadcast to 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bcast_half(p: *const u8) -> __m256 {
    // SAFETY: the caller guarantees 2 readable bytes at `p`.
    let bits = unsafe { std::ptr::read_unaligned(p.cast::<i16>()) };
    _mm256_cvtph_ps(_mm_set1_epi16(bits))
}

/// 8 bytes at `p`, zero-extended to 8 × i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_u8x8(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 8 readable bytes at `p`.
    _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(p.cast()) })
}

/// 8 bytes at `p`, sign-extended to 8 × i32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_i8x8(p: *const u8) -> __m256i {
    // SAFETY: the caller guarantees 8 readable bytes at `p`.
    _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p.cast()) })
}

/// Low and high nibbles of 16 bytes at `p`: `[lo(0..8), lo(8..16), hi(0..8), hi(8..16)]`, i.e.
/// weights 0..8, 8..16, 16..24, 24..32 of a Q4 block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles(p: *const u8) -> [__m256i; 4] {
    // SAFETY: the caller guarantees 16 readable bytes at `p`.
    let (a, b) = unsafe { (load_u8x8(p), load_u8x8(p.add(8))) };
    let mask = _mm256_set1_epi32(0xF);
    [
        _mm256_and_si256(a, mask),
        _mm256_and_si256(b, mask),
        _mm256_srli_epi32::<4>(a),
        _mm256_srli_epi32::<4>(b),
    ]
}

pub(super) struct Q4_0;
impl Block for Q4_0 {
    const BYTES: usize = 18;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(p: *const u8) -> [__m256; 4] {
        // SAFETY: 18 readable bytes at `p` (contract).
        let (d, q) = unsafe { (bcast_half(p), nibbles(p.add(2))) };
        let eight = _mm256_set1_epi32(8);
        q.map(|v| _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(v, eight))))
    }
}

pub(super) struct Q4_1;
impl Block for Q4_1 {
    const BYTES: usize = 20;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(p: *const u8) -> [__m256; 4] {
        // SAFETY: 20 readable bytes at `p` (contract).
        let (d, m, q) = unsafe { (bcast_half(p), bcast_half(p.add(2)), nibbles(p.add(4))) };
        q.map(|v| _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(v), m))
    }
}

pub(super) struct Q8_0;
impl Block for Q8_0 {
    const BYTES: usize = 34;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(p: *const u8) -> [__m256; 4] {
        // SAFETY: 34 readable bytes at `p` (contract).
        unsafe {
            let d = bcast_half(p);
            let q = [
                load_i8x8(p.add(2)),
                load_i8x8(p.add(10)),
                load_i8x8(p.add(18)),
                load_i8x8(p.add(26)),
            ];
            q.map(|v| _mm256_mul_ps(d, _mm256_cvtepi32_ps(v)))
        }
    }
}

pub(super) struct F32;
impl Block for F32 {
    const BYTES: usize = 128;
    const TAIL: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(p: *const u8) -> [__m256; 4] {
        // SAFETY: 128 readable bytes at `p` (contract).
        unsafe { [0, 1, 2, 3].map(|k| _mm256_loadu_ps(p.add(32 * k).cast())) }
    }
    unsafe fn elem(p: *const u8, i: usize) -> f32 {
        // SAFETY: element `i` is in bounds (contract).
        unsafe { std::ptr::read_unaligned(p.add(4 * i).cast::<f32>()) }
    }
}

pub(super) struct F16;
impl Block for F16 {
    const BYTES: usize = 64;
    const TAIL: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(p: *const u8) -> [__m256; 4] {
        // SAFETY: 64 readable bytes at `p` (contract).
        unsafe { [0, 1, 2, 3].map(|k| _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * k).cast()))) }
    }
    unsafe fn elem(p: *const u8, i: usize) -> f32 {
        // SAFETY: element `i` is in bounds (contract).
        half::f16::from_bits(unsafe { std::ptr::read_unaligned(p.add(2 * i).cast::<u16>()) })
            .to_f32()
    }
}

pub(super) struct BF16;
impl Block for BF16 {
    const BYTES: usize = 64;
    const TAIL: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode(p: *const u8) -> [__m256; 4] {
        // SAFETY: 64 readable bytes at `p` (contract).
        unsafe {
            [0, 1, 2, 3].map(|k| {
                let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16 * k).cast()));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
            })
        }
    }
    unsafe fn elem(p: *const u8, i: usize) -> f32 {
        // SAFETY: element `i` is in bounds (contract).
        half::bf16::from_bits(unsafe { std::ptr::read_unaligned(p.add(2 * i).cast::<u16>()) })
            .to_f32()
    }
}

/// Horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Rows `rows` of the matrix at `data` against `T` tokens: `y[j·y_stride + r] = Σ_c W[r][c]·x[j·cols + c]`.
/// `A` accumulators per token (4 for a single token, so the FMA chains do not serialize).
///
/// # Safety
/// `data` holds every row in `rows` (`row_bytes` each, `cols` elements), `x` holds `T·cols`
/// floats, `y` is writable at every `j·y_stride + r` and nothing else accesses those elements
/// during the call, and AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows<B: Block, const T: usize, const A: usize>(
    data: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    x: &[f32],
    cols: usize,
    y: *mut f32,
    y_stride: usize,
) {
    debug_assert!(rows.end * row_bytes <= data.len() && T * cols <= x.len());
    let (data, x) = (data.as_ptr(), x.as_ptr());
    let nb = cols / QK;
    for r in rows {
        // SAFETY: all offsets stay inside the row, the tokens and `y` (contract).
        unsafe {
            let rp = data.add(r * row_bytes);
            let mut acc = [[_mm256_setzero_ps(); A]; T];
            for b in 0..nb {
                let w = B::decode(rp.add(b * B::BYTES));
                let xb = x.add(b * QK);
                for (k, wk) in w.iter().enumerate() {
                    for (j, aj) in acc.iter_mut().enumerate() {
                        let a = &mut aj[k % A];
                        *a = _mm256_fmadd_ps(*wk, _mm256_loadu_ps(xb.add(j * cols + 8 * k)), *a);
                    }
                }
            }
            for (j, aj) in acc.iter().enumerate() {
                let mut s = aj[0];
                for a in &aj[1..] {
                    s = _mm256_add_ps(s, *a);
                }
                let mut v = hsum(s);
                if B::TAIL {
                    for c in nb * QK..cols {
                        v += B::elem(rp, c) * *x.add(j * cols + c);
                    }
                }
                *y.add(j * y_stride + r) = v;
            }
        }
    }
}
