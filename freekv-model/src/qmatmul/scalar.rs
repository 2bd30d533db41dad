//! Portable kernels: the same products as the AVX2 ones, in plain Rust.
//!
//! Every 32-weight block is dequantized once into `f32` (with the reference formulas) and used for
//! all tokens of the tile; sums use 8 interleaved partial sums per token, like the 8 lanes of the
//! SIMD kernels.

use std::ops::Range;

use half::{bf16, f16};

use super::QK;

/// One weight encoding: how to expand a 32-element block.
pub(super) trait Block {
    /// Encoded bytes per 32 elements.
    const BYTES: usize;
    /// Bytes per element for plain-float rows that may end in a partial block, else 0.
    const ELEM: usize = 0;
    /// The 32 weights of `blk` (`BYTES` long).
    fn decode(blk: &[u8], w: &mut [f32; QK]);
    /// One element of a plain-float row (`ELEM` bytes).
    fn elem(_e: &[u8]) -> f32 {
        0.0
    }
}

fn half_at(b: &[u8], i: usize) -> f32 {
    match b.get(i..i + 2) {
        Some(&[a, c]) => f16::from_bits(u16::from_le_bytes([a, c])).to_f32(),
        _ => 0.0,
    }
}

pub(super) struct Q4_0;
impl Block for Q4_0 {
    const BYTES: usize = 18;
    #[inline(always)]
    fn decode(blk: &[u8], w: &mut [f32; QK]) {
        let d = half_at(blk, 0);
        let (lo, hi) = w.split_at_mut(16);
        for ((q, l), h) in blk.iter().skip(2).zip(lo).zip(hi) {
            *l = ((q & 0xF) as i32 - 8) as f32 * d;
            *h = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub(super) struct Q4_1;
impl Block for Q4_1 {
    const BYTES: usize = 20;
    #[inline(always)]
    fn decode(blk: &[u8], w: &mut [f32; QK]) {
        let (d, m) = (half_at(blk, 0), half_at(blk, 2));
        let (lo, hi) = w.split_at_mut(16);
        for ((q, l), h) in blk.iter().skip(4).zip(lo).zip(hi) {
            *l = (q & 0xF) as f32 * d + m;
            *h = (q >> 4) as f32 * d + m;
        }
    }
}

pub(super) struct Q8_0;
impl Block for Q8_0 {
    const BYTES: usize = 34;
    #[inline(always)]
    fn decode(blk: &[u8], w: &mut [f32; QK]) {
        let d = half_at(blk, 0);
        for (q, o) in blk.iter().skip(2).zip(w.iter_mut()) {
            *o = (*q as i8) as f32 * d;
        }
    }
}

pub(super) struct F32;
impl Block for F32 {
    const BYTES: usize = 128;
    const ELEM: usize = 4;
    #[inline(always)]
    fn decode(blk: &[u8], w: &mut [f32; QK]) {
        for (e, o) in blk.chunks_exact(4).zip(w.iter_mut()) {
            *o = Self::elem(e);
        }
    }
    #[inline(always)]
    fn elem(e: &[u8]) -> f32 {
        match *e {
            [a, b, c, d] => f32::from_le_bytes([a, b, c, d]),
            _ => 0.0,
        }
    }
}

pub(super) struct F16;
impl Block for F16 {
    const BYTES: usize = 64;
    const ELEM: usize = 2;
    #[inline(always)]
    fn decode(blk: &[u8], w: &mut [f32; QK]) {
        for (e, o) in blk.chunks_exact(2).zip(w.iter_mut()) {
            *o = Self::elem(e);
        }
    }
    #[inline(always)]
    fn elem(e: &[u8]) -> f32 {
        half_at(e, 0)
    }
}

pub(super) struct BF16;
impl Block for BF16 {
    const BYTES: usize = 64;
    const ELEM: usize = 2;
    #[inline(always)]
    fn decode(blk: &[u8], w: &mut [f32; QK]) {
        for (e, o) in blk.chunks_exact(2).zip(w.iter_mut()) {
            *o = Self::elem(e);
        }
    }
    #[inline(always)]
    fn elem(e: &[u8]) -> f32 {
        match *e {
            [a, b] => bf16::from_bits(u16::from_le_bytes([a, b])).to_f32(),
            _ => 0.0,
        }
    }
}

/// Rows `rows` of the matrix in `data` against `T` tokens:
/// `y[j·y_stride + r] = Σ_c W[r][c]·x[j·cols + c]`. Rows or tokens out of bounds are skipped (the
/// caller validated the sizes, so that does not happen).
///
/// # Safety
/// `y` is writable at every `j·y_stride + r` (`j < T`, `r` in `rows`) and nothing else accesses
/// those elements during the call.
pub(super) unsafe fn rows<B: Block, const T: usize>(
    data: &[u8],
    row_bytes: usize,
    rows: Range<usize>,
    x: &[f32],
    cols: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let nb = cols / QK;
    let mut w = [0.0f32; QK];
    for r in rows {
        let Some(row) = data.get(r * row_bytes..(r + 1) * row_bytes) else {
            return;
        };
        let mut acc = [[0.0f32; 8]; T];
        for (b, blk) in row.chunks_exact(B::BYTES).take(nb).enumerate() {
            B::decode(blk, &mut w);
            for (j, a) in acc.iter_mut().enumerate() {
                let xb = x
                    .get(j * cols + b * QK..j * cols + (b + 1) * QK)
                    .unwrap_or_default();
                for (wc, xc) in w.chunks_exact(8).zip(xb.chunks_exact(8)) {
                    for ((p, wv), xv) in a.iter_mut().zip(wc).zip(xc) {
                        *p += wv * xv;
                    }
                }
            }
        }
        for (j, p) in acc.iter().enumerate() {
            let mut v = ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]));
            if B::ELEM > 0 {
                for c in nb * QK..cols {
                    let e = row.get(c * B::ELEM..(c + 1) * B::ELEM).unwrap_or_default();
                    v += B::elem(e) * x.get(j * cols + c).copied().unwrap_or_default();
                }
            }
            // SAFETY: writable and exclusive (contract).
            unsafe { *y.add(j * y_stride + r) = v };
        }
    }
}
