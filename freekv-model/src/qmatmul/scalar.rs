//! Portable kernels: the same sums as the AVX2 ones, in plain Rust.
//!
//! Each function has the [`super::RowFn`] contract: `row` is one encoded row of `cols` weights,
//! `x` holds `T` tokens of `cols` floats, `sx` (Q4_1 only) their per-block sums. Every block is
//! unpacked once into `f32` and used for all `T` tokens. Sums use 8 interleaved partial sums, like
//! the 8 lanes of the SIMD kernels.

use half::{bf16, f16};

use super::QK;

/// `Σ w[i]·x[i]` over 32 elements with 8 partial sums.
#[inline(always)]
fn dot32(w: &[f32; QK], x: &[f32]) -> f32 {
    let mut p = [0.0f32; 8];
    for (wc, xc) in w.chunks_exact(8).zip(x.chunks_exact(8)) {
        for ((a, wv), xv) in p.iter_mut().zip(wc).zip(xc) {
            *a += wv * xv;
        }
    }
    ((p[0] + p[4]) + (p[1] + p[5])) + ((p[2] + p[6]) + (p[3] + p[7]))
}

#[inline(always)]
fn half_at(b: &[u8], i: usize) -> f32 {
    match b.get(i..i + 2) {
        Some(&[a, c]) => f16::from_bits(u16::from_le_bytes([a, c])).to_f32(),
        _ => 0.0,
    }
}

/// Runs `unpack` on every block of `BYTES` bytes and accumulates `scale · (w · x_j)` per token,
/// plus `shift · sx[j][b]` when `SHIFT`.
#[inline(always)]
fn blocks<const T: usize, const BYTES: usize, const SHIFT: bool>(
    row: &[u8],
    x: &[f32],
    sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
    unpack: impl Fn(&[u8; BYTES], &mut [f32; QK]) -> (f32, f32),
) {
    let nb = cols / QK;
    let mut acc = [0.0f32; T];
    let mut macc = [0.0f32; T];
    let mut w = [0.0f32; QK];
    let (blks, _) = row.as_chunks::<BYTES>();
    for (b, blk) in blks.iter().enumerate().take(nb) {
        let (d, m) = unpack(blk, &mut w);
        for (j, (a, ma)) in acc.iter_mut().zip(macc.iter_mut()).enumerate() {
            let xb = x
                .get(j * cols + b * QK..j * cols + (b + 1) * QK)
                .unwrap_or_default();
            *a += d * dot32(&w, xb);
            if SHIFT {
                *ma += m * sx.get(j * nb + b).copied().unwrap_or_default();
            }
        }
    }
    for ((o, a), m) in out.iter_mut().zip(acc).zip(macc) {
        *o = a + m;
    }
}

/// Q4_0: `w = d·(q − 8)`.
pub(super) fn q4_0_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    blocks::<T, 18, false>(row, x, sx, cols, out, |blk, w| {
        let (lo, hi) = w.split_at_mut(16);
        for ((q, l), h) in blk[2..].iter().zip(lo).zip(hi) {
            *l = ((q & 0xF) as i32 - 8) as f32;
            *h = ((q >> 4) as i32 - 8) as f32;
        }
        (half_at(blk, 0), 0.0)
    });
}

/// Q4_1: `w = d·q + m`; the `m` part is `m·Σx` from the block sums.
pub(super) fn q4_1_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    blocks::<T, 20, true>(row, x, sx, cols, out, |blk, w| {
        let (lo, hi) = w.split_at_mut(16);
        for ((q, l), h) in blk[4..].iter().zip(lo).zip(hi) {
            *l = (q & 0xF) as f32;
            *h = (q >> 4) as f32;
        }
        (half_at(blk, 0), half_at(blk, 2))
    });
}

/// Q8_0: `w = d·q`.
pub(super) fn q8_0_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    blocks::<T, 34, false>(row, x, sx, cols, out, |blk, w| {
        for (q, o) in blk[2..].iter().zip(w.iter_mut()) {
            *o = (*q as i8) as f32;
        }
        (half_at(blk, 0), 0.0)
    });
}

/// Plain float rows: 32-element steps as above (scale 1), then a tail of `cols % 32` elements.
#[inline(always)]
fn floats<const T: usize, const ES: usize>(
    row: &[u8],
    x: &[f32],
    cols: usize,
    out: &mut [f32; T],
    conv: impl Fn(&[u8; ES]) -> f32,
) {
    let (elems, _) = row.as_chunks::<ES>();
    let main = cols / QK * QK;
    let mut acc = [0.0f32; T];
    let mut w = [0.0f32; QK];
    for (b, chunk) in elems.chunks_exact(QK).enumerate() {
        for (o, e) in w.iter_mut().zip(chunk) {
            *o = conv(e);
        }
        for (j, a) in acc.iter_mut().enumerate() {
            let xb = x
                .get(j * cols + b * QK..j * cols + (b + 1) * QK)
                .unwrap_or_default();
            *a += dot32(&w, xb);
        }
    }
    let mut tail = [0.0f32; T];
    for (c, e) in elems.iter().enumerate().take(cols).skip(main) {
        let wv = conv(e);
        for (j, t) in tail.iter_mut().enumerate() {
            *t += wv * x.get(j * cols + c).copied().unwrap_or_default();
        }
    }
    for ((o, a), t) in out.iter_mut().zip(acc).zip(tail) {
        *o = a + t;
    }
}

/// F32 rows.
pub(super) fn f32_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    _sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    floats::<T, 4>(row, x, cols, out, |e| f32::from_le_bytes(*e));
}

/// F16 rows.
pub(super) fn f16_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    _sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    floats::<T, 2>(row, x, cols, out, |e| {
        f16::from_bits(u16::from_le_bytes(*e)).to_f32()
    });
}

/// BF16 rows.
pub(super) fn bf16_row<const T: usize>(
    row: &[u8],
    x: &[f32],
    _sx: &[f32],
    cols: usize,
    out: &mut [f32; T],
) {
    floats::<T, 2>(row, x, cols, out, |e| {
        bf16::from_bits(u16::from_le_bytes(*e)).to_f32()
    });
}
