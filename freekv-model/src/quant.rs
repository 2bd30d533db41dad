//! ggml block formats: `Pod` block structs, dequantization to `f32`, and reference quantizers.
//!
//! Supported for dequantization: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K. Supported for
//! quantization (round-to-nearest, bit-identical to ggml's `quantize_row_*_ref`): F32, F16, BF16,
//! Q4_0, Q4_1, Q8_0.
//!
//! Layouts are those of ggml's `ggml-common.h`; every block is `repr(C)`, 2-byte aligned and
//! without padding, so mmapped tensor bytes can be viewed as blocks with `bytemuck` when aligned
//! (use [`bytemuck::pod_read_unaligned`] otherwise).
//!
//! ```
//! use freekv_model::quant::{dequantize_to_vec, quantize};
//! use freekv_model::GgmlType;
//! let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
//! let q = quantize(GgmlType::Q8_0, &x).unwrap();
//! assert_eq!(q.len(), 34);
//! let y = dequantize_to_vec(GgmlType::Q8_0, &q, 32).unwrap();
//! assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() <= 16.0 / 127.0));
//! ```

use bytemuck::{Pod, Zeroable};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::ModelError;
use crate::ggml::GgmlType;

#[cfg(target_endian = "big")]
compile_error!(
    "freekv-model reads little-endian GGUF data in place and supports only little-endian targets"
);

/// Elements per block of the k-quant formats.
pub const QK_K: usize = 256;
/// Elements per block of the 32-element formats.
pub const QK: usize = 32;

/// Q4_0: 32 weights, `w = d * (q - 8)` with 4-bit `q`. 18 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Byte `j`: low nibble = weight `j`, high nibble = weight `j + 16`.
    pub qs: [u8; 16],
}

/// Q4_1: 32 weights, `w = d * q + m` with 4-bit `q`. 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum (offset).
    pub m: f16,
    /// Same nibble order as [`BlockQ4_0`].
    pub qs: [u8; 16],
}

/// Q8_0: 32 weights, `w = d * q` with signed 8-bit `q`. 34 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quants.
    pub qs: [i8; 32],
}

/// Q4_K: 256 weights in 8 sub-blocks of 32 with 6-bit scales and mins. 144 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ4K {
    /// Super-block scale of the sub-block scales.
    pub d: f16,
    /// Super-block scale of the sub-block mins.
    pub dmin: f16,
    /// 8 scales and 8 mins, 6 bits each (see [`get_scale_min_k4`]).
    pub scales: [u8; 12],
    /// 4-bit quants: 4 groups of 32 bytes, low nibbles first sub-block, high nibbles the next.
    pub qs: [u8; 128],
}

/// Q5_K: 256 weights, like Q4_K plus a fifth bit per weight in `qh`. 176 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ5K {
    /// Super-block scale of the sub-block scales.
    pub d: f16,
    /// Super-block scale of the sub-block mins.
    pub dmin: f16,
    /// 8 scales and 8 mins, 6 bits each (see [`get_scale_min_k4`]).
    pub scales: [u8; 12],
    /// High bits: bit `2c` / `2c + 1` of byte `l` belong to group `c`'s low / high nibble weight `l`.
    pub qh: [u8; 32],
    /// Low 4 bits, laid out as in Q4_K.
    pub qs: [u8; 128],
}

/// Q6_K: 256 weights in 16 sub-blocks of 16 with signed 8-bit scales. 210 bytes (`d` last).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Pod, Zeroable)]
pub struct BlockQ6K {
    /// Low 4 bits of the quants.
    pub ql: [u8; 128],
    /// High 2 bits of the quants.
    pub qh: [u8; 64],
    /// One scale per 16 weights.
    pub scales: [i8; 16],
    /// Super-block scale.
    pub d: f16,
}

const _: () = {
    assert!(std::mem::size_of::<BlockQ4_0>() == 18);
    assert!(std::mem::size_of::<BlockQ4_1>() == 20);
    assert!(std::mem::size_of::<BlockQ8_0>() == 34);
    assert!(std::mem::size_of::<BlockQ4K>() == 144);
    assert!(std::mem::size_of::<BlockQ5K>() == 176);
    assert!(std::mem::size_of::<BlockQ6K>() == 210);
    assert!(std::mem::align_of::<BlockQ6K>() == 2);
};

/// Converts IEEE half bits to `f32`, exactly (subnormals, infinities and NaN included).
///
/// Branch-free so that loops over it vectorize; `half::f16::to_f32` checks for F16C at run time
/// and calls out of line on every element, which is an order of magnitude slower here.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let o = ((h & 0x7FFF) << 13) + ((127 - 15) << 23);
    let exp = h & 0x7C00;
    // Infinity / NaN: push the exponent to all ones. Subnormal (and zero): renormalize by
    // subtracting the implicit bit through a float subtraction, which is exact.
    let inf_nan = o + ((128 - 16) << 23);
    let subnormal = (f32::from_bits(o + (1 << 23)) - f32::from_bits(113 << 23)).to_bits();
    let r = if exp == 0x7C00 {
        inf_nan
    } else if exp == 0 {
        subnormal
    } else {
        o
    };
    f32::from_bits(r | sign)
}

#[inline(always)]
fn h2f(h: f16) -> f32 {
    f16_to_f32(h.to_bits())
}

/// Unpacks the 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block.
#[inline]
pub fn get_scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    let at = |i: usize| s.get(i).copied().unwrap_or(0);
    if j < 4 {
        (at(j) & 63, at(j + 4) & 63)
    } else {
        (
            (at(j + 4) & 0xF) | ((at(j.wrapping_sub(4)) >> 6) << 4),
            (at(j + 4) >> 4) | ((at(j) >> 6) << 4),
        )
    }
}

impl BlockQ4_0 {
    /// Dequantizes the block into `out`.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; QK]) {
        let d = h2f(self.d);
        let (lo, hi) = out.split_at_mut(16);
        for ((q, l), h) in self.qs.iter().zip(lo).zip(hi) {
            *l = ((q & 0xF) as i32 - 8) as f32 * d;
            *h = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

impl BlockQ4_1 {
    /// Dequantizes the block into `out`.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; QK]) {
        let d = h2f(self.d);
        let m = h2f(self.m);
        let (lo, hi) = out.split_at_mut(16);
        for ((q, l), h) in self.qs.iter().zip(lo).zip(hi) {
            *l = (q & 0xF) as f32 * d + m;
            *h = (q >> 4) as f32 * d + m;
        }
    }
}

impl BlockQ8_0 {
    /// Dequantizes the block into `out`.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; QK]) {
        let d = h2f(self.d);
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = q as f32 * d;
        }
    }
}

impl BlockQ4K {
    /// Dequantizes the block into `out`.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = h2f(self.d);
        let min = h2f(self.dmin);
        for (c, (y, q)) in out
            .chunks_exact_mut(64)
            .zip(self.qs.chunks_exact(32))
            .enumerate()
        {
            let (sc1, m1) = get_scale_min_k4(2 * c, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let (lo, hi) = y.split_at_mut(32);
            for ((&q, l), h) in q.iter().zip(lo).zip(hi) {
                *l = d1 * (q & 0xF) as f32 - m1;
                *h = d2 * (q >> 4) as f32 - m2;
            }
        }
    }
}

impl BlockQ5K {
    /// Dequantizes the block into `out`.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = h2f(self.d);
        let min = h2f(self.dmin);
        for (c, (y, q)) in out
            .chunks_exact_mut(64)
            .zip(self.qs.chunks_exact(32))
            .enumerate()
        {
            let (sc1, m1) = get_scale_min_k4(2 * c, &self.scales);
            let (sc2, m2) = get_scale_min_k4(2 * c + 1, &self.scales);
            let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
            let u1 = 1u8 << (2 * c);
            let u2 = 2u8 << (2 * c);
            let (lo, hi) = y.split_at_mut(32);
            for (((&q, &h), l), hv) in q.iter().zip(&self.qh).zip(lo).zip(hi) {
                let b1 = if h & u1 != 0 { 16 } else { 0 };
                let b2 = if h & u2 != 0 { 16 } else { 0 };
                *l = d1 * ((q & 0xF) + b1) as f32 - m1;
                *hv = d2 * ((q >> 4) + b2) as f32 - m2;
            }
        }
    }
}

impl BlockQ6K {
    /// Dequantizes the block into `out`.
    #[inline]
    pub fn dequantize(&self, out: &mut [f32; QK_K]) {
        let d = h2f(self.d);
        let (ql, _) = self.ql.as_chunks::<64>();
        let (qh, _) = self.qh.as_chunks::<32>();
        let (sc, _) = self.scales.as_chunks::<8>();
        let (ys, _) = out.as_chunks_mut::<128>();
        // Two halves of 128 weights; within each, 4 rows of 32 share the bytes of ql/qh.
        for (((y, ql), qh), sc) in ys.iter_mut().zip(ql).zip(qh).zip(sc) {
            for is in 0..2 {
                let s = [
                    d * sc[is] as f32,
                    d * sc[is + 2] as f32,
                    d * sc[is + 4] as f32,
                    d * sc[is + 6] as f32,
                ];
                for l in 16 * is..16 * is + 16 {
                    let (a, b, hb) = (ql[l], ql[l + 32], qh[l]);
                    let q1 = ((a & 0xF) | ((hb & 3) << 4)) as i32 - 32;
                    let q2 = ((b & 0xF) | (((hb >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((a >> 4) | (((hb >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((b >> 4) | (((hb >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = s[0] * q1 as f32;
                    y[l + 32] = s[1] * q2 as f32;
                    y[l + 64] = s[2] * q3 as f32;
                    y[l + 96] = s[3] * q4 as f32;
                }
            }
        }
    }
}

/// Elements per parallel work item when dequantizing large tensors.
const PAR_CHUNK_ELEMS: usize = 1 << 16;

fn check_sizes(ty: GgmlType, data_len: usize, n: usize) -> Result<(), ModelError> {
    if !ty.is_supported() {
        return Err(ModelError::Shape(format!(
            "dequantization of {ty} tensors is not supported"
        )));
    }
    let need = ty.bytes_for(n as u64);
    if need != Some(data_len as u64) {
        return Err(ModelError::Shape(match need {
            None => format!(
                "{n} elements are not a whole number of {ty} blocks of {}",
                ty.block_elems()
            ),
            Some(b) => format!("{n} {ty} elements need {b} bytes, got {data_len}"),
        }));
    }
    Ok(())
}

/// Dequantizes `data` (in `ty`'s encoding) into `out`; `data.len()` must equal
/// `ty.bytes_for(out.len())`. Large inputs are split over the rayon pool.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), ModelError> {
    check_sizes(ty, data.len(), out.len())?;
    if out.len() >= 2 * PAR_CHUNK_ELEMS {
        // PAR_CHUNK_ELEMS is a multiple of every block size (1, 32, 256).
        let in_chunk = PAR_CHUNK_ELEMS / ty.block_elems() * ty.block_bytes();
        out.par_chunks_mut(PAR_CHUNK_ELEMS)
            .zip(data.par_chunks(in_chunk))
            .for_each(|(o, d)| dequantize_serial(ty, d, o));
    } else {
        dequantize_serial(ty, data, out);
    }
    Ok(())
}

/// Dequantizes `n` elements of `data` into a new vector.
pub fn dequantize_to_vec(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, ModelError> {
    check_sizes(ty, data.len(), n)?;
    let mut out = vec![0f32; n];
    dequantize(ty, data, &mut out)?;
    Ok(out)
}

/// Converts little-endian f16 bytes to f32 (as many as both sides hold), with F16C when the
/// CPU has it and the lengths match exactly.
fn f16_slice_to_f32(data: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if data.len() == 2 * out.len()
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("avx")
    {
        // SAFETY: the features the function needs were just detected.
        unsafe { f16_slice_to_f32_f16c(data, out) };
        return;
    }
    let (inp, _) = data.as_chunks::<2>();
    for (o, i) in out.iter_mut().zip(inp) {
        *o = f16_to_f32(u16::from_le_bytes(*i));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn f16_slice_to_f32_f16c(data: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    let (inp, in_rest) = data.as_chunks::<16>();
    let (outp, out_rest) = out.as_chunks_mut::<8>();
    for (i, o) in inp.iter().zip(outp.iter_mut()) {
        // SAFETY: `i` is 16 readable bytes and `o` 8 writable f32s; both intrinsics are unaligned.
        unsafe {
            let h = _mm_loadu_si128(i.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    // The last fewer-than-8 elements (the caller guarantees data.len() == 2 * out.len()).
    let (tail_in, _) = in_rest.as_chunks::<2>();
    for (o, i) in out_rest.iter_mut().zip(tail_in) {
        *o = f16_to_f32(u16::from_le_bytes(*i));
    }
}

/// Dequantizes whole blocks; sizes were checked by the caller (extra input or output is ignored).
fn dequantize_serial(ty: GgmlType, data: &[u8], out: &mut [f32]) {
    fn blocks<B: Pod, const IN: usize, const N: usize>(
        data: &[u8],
        out: &mut [f32],
        f: impl Fn(&B, &mut [f32; N]),
    ) {
        let (inp, _) = data.as_chunks::<IN>();
        let (outp, _) = out.as_chunks_mut::<N>();
        for (i, o) in inp.iter().zip(outp) {
            let b: B = bytemuck::pod_read_unaligned(i);
            f(&b, o);
        }
    }
    match ty {
        GgmlType::F32 => {
            let (inp, _) = data.as_chunks::<4>();
            for (o, i) in out.iter_mut().zip(inp) {
                *o = f32::from_le_bytes(*i);
            }
        }
        GgmlType::F16 => f16_slice_to_f32(data, out),
        GgmlType::BF16 => {
            let (inp, _) = data.as_chunks::<2>();
            for (o, i) in out.iter_mut().zip(inp) {
                *o = f32::from_bits((u16::from_le_bytes(*i) as u32) << 16);
            }
        }
        GgmlType::Q4_0 => blocks::<BlockQ4_0, 18, QK>(data, out, BlockQ4_0::dequantize),
        GgmlType::Q4_1 => blocks::<BlockQ4_1, 20, QK>(data, out, BlockQ4_1::dequantize),
        GgmlType::Q8_0 => blocks::<BlockQ8_0, 34, QK>(data, out, BlockQ8_0::dequantize),
        GgmlType::Q4K => blocks::<BlockQ4K, 144, QK_K>(data, out, BlockQ4K::dequantize),
        GgmlType::Q5K => blocks::<BlockQ5K, 176, QK_K>(data, out, BlockQ5K::dequantize),
        GgmlType::Q6K => blocks::<BlockQ6K, 210, QK_K>(data, out, BlockQ6K::dequantize),
        // Rejected by check_sizes.
        _ => {}
    }
}

/// Quantizes `src` to `ty` with ggml's reference round-to-nearest quantizers
/// (`quantize_row_q4_0_ref` etc.). Supports F32, F16, BF16, Q4_0, Q4_1 and Q8_0; `src.len()` must
/// be a whole number of blocks.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, ModelError> {
    let n_bytes = ty.bytes_for(src.len() as u64).ok_or_else(|| {
        ModelError::Shape(format!(
            "{} elements are not a whole number of {ty} blocks of {}",
            src.len(),
            ty.block_elems()
        ))
    })?;
    let mut out = Vec::with_capacity(n_bytes as usize);
    match ty {
        GgmlType::F32 => src
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        GgmlType::F16 => src
            .iter()
            .for_each(|&x| out.extend_from_slice(&f16::from_f32(x).to_le_bytes())),
        GgmlType::BF16 => src
            .iter()
            .for_each(|&x| out.extend_from_slice(&bf16::from_f32(x).to_le_bytes())),
        GgmlType::Q4_0 => {
            for x in src.as_chunks::<QK>().0 {
                out.extend_from_slice(bytemuck::bytes_of(&quantize_block_q4_0(x)));
            }
        }
        GgmlType::Q4_1 => {
            for x in src.as_chunks::<QK>().0 {
                out.extend_from_slice(bytemuck::bytes_of(&quantize_block_q4_1(x)));
            }
        }
        GgmlType::Q8_0 => {
            for x in src.as_chunks::<QK>().0 {
                out.extend_from_slice(bytemuck::bytes_of(&quantize_block_q8_0(x)));
            }
        }
        other => {
            return Err(ModelError::Shape(format!(
                "quantization to {other} is not implemented"
            )));
        }
    }
    Ok(out)
}

/// ggml `quantize_row_q4_0_ref` for one block.
pub fn quantize_block_q4_0(x: &[f32; QK]) -> BlockQ4_0 {
    let mut amax = 0f32;
    let mut max = 0f32;
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0u8; 16];
    let (lo, hi) = x.split_at(16);
    for ((q, &a), &b) in qs.iter_mut().zip(lo).zip(hi) {
        // `as i8` truncates toward zero like C's (int8_t) cast (and saturates instead of UB).
        let q0 = ((a * id + 8.5) as i8).min(15) as u8;
        let q1 = ((b * id + 8.5) as i8).min(15) as u8;
        *q = q0 | (q1 << 4);
    }
    BlockQ4_0 {
        d: f16::from_f32(d),
        qs,
    }
}

/// ggml `quantize_row_q4_1_ref` for one block.
pub fn quantize_block_q4_1(x: &[f32; QK]) -> BlockQ4_1 {
    let mut min = f32::MAX;
    let mut max = -f32::MAX;
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    let d = (max - min) / 15.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0u8; 16];
    let (lo, hi) = x.split_at(16);
    for ((q, &a), &b) in qs.iter_mut().zip(lo).zip(hi) {
        let q0 = (((a - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((b - min) * id + 0.5) as i8).min(15) as u8;
        *q = q0 | (q1 << 4);
    }
    BlockQ4_1 {
        d: f16::from_f32(d),
        m: f16::from_f32(min),
        qs,
    }
}

/// ggml `quantize_row_q8_0_ref` for one block.
pub fn quantize_block_q8_0(x: &[f32; QK]) -> BlockQ8_0 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; 32];
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    BlockQ8_0 {
        d: f16::from_f32(d),
        qs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_mismatch_is_an_error() {
        assert!(dequantize_to_vec(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
        assert!(dequantize_to_vec(GgmlType::Q8_0, &[0u8; 34], 31).is_err());
        assert!(dequantize_to_vec(GgmlType::Q5_0, &[0u8; 22], 32).is_err());
        assert!(quantize(GgmlType::Q4_0, &[0.0; 31]).is_err());
        assert!(quantize(GgmlType::Q6K, &[0.0; 256]).is_err());
    }

    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{bits:#06x}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn f16_slices_with_tails() {
        // Lengths around the 8-wide vector step; every output position checked.
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 100] {
            let bits: Vec<u16> = (0..n as u16)
                .map(|i| i.wrapping_mul(2731) ^ 0x3C00)
                .collect();
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let mut out = vec![f32::NAN; n];
            f16_slice_to_f32(&bytes, &mut out);
            for (b, o) in bits.iter().zip(&out) {
                let want = f16::from_bits(*b).to_f32();
                assert!(
                    want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan()),
                    "{n}: {b:#x}"
                );
            }
        }
    }

    #[test]
    fn scale_min_unpacking() {
        // j < 4: low 6 bits of bytes j and j+4; j >= 4: nibbles of byte j+4 plus top bits.
        let mut s = [0u8; 12];
        s[0] = 0b11_000101; // scale 0 = 5, top bits 3 -> high bits of scale 4
        s[4] = 0b10_000111; // min 0 = 7, top bits 2 -> high bits of min 4
        s[8] = 0x9A; // scale 4 low nibble 0xA, min 4 low nibble 0x9
        assert_eq!(get_scale_min_k4(0, &s), (5, 7));
        assert_eq!(get_scale_min_k4(4, &s), (0xA | (3 << 4), 0x9 | (2 << 4)));
    }
}
