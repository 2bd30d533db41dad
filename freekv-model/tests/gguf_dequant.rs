//! Dequantization of every supported type against hand-built blocks with hand-computed values,
//! golden bytes of the reference quantizers, and quantize → dequantize round trips on random data.

use freekv_model::GgmlType;
use freekv_model::quant::{
    BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, dequantize, dequantize_to_vec,
    quantize,
};
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Asserts `got ≈ want` elementwise: relative error 1e-6, or absolute 1e-6 near zero.
#[track_caller]
fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = 1e-6 * w.abs().max(1.0);
        assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w}");
    }
}

fn deq(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let v = dequantize_to_vec(ty, bytes, n).unwrap();
    // The slice API gives the same result.
    let mut out = vec![f32::NAN; n];
    dequantize(ty, bytes, &mut out).unwrap();
    assert_eq!(v, out);
    v
}

#[test]
fn f32_values() {
    let want = [1.5f32, -2.25, 0.0, 1e-3, f32::MAX, -7.0e-38];
    let bytes: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::F32, &bytes, 6), want);
}

#[test]
fn f16_values() {
    // IEEE half bit patterns and their values.
    let bits: [u16; 7] = [0x3C00, 0xC000, 0x3555, 0x7BFF, 0x0001, 0x8000, 0x3800];
    let want = [
        1.0f32,
        -2.0,
        0.333_251_95,
        65504.0,
        5.960_464_5e-8,
        -0.0,
        0.5,
    ];
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    let got = deq(GgmlType::F16, &bytes, 7);
    assert_close(&got, &want);
    assert!(got[5].is_sign_negative());
}

#[test]
fn bf16_values() {
    // bfloat16 is the top half of an f32.
    let bits: [u16; 5] = [0x3F80, 0xC040, 0x3E80, 0x4049, 0x7F80];
    let want = [1.0f32, -3.0, 0.25, 3.140625, f32::INFINITY];
    let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::BF16, &bytes, 5), want);
}

#[test]
fn q8_0_block() {
    // d = 0.5 (0x3800), qs[j] = j - 16 as i8, then a second block with d = -2 (0xC000), qs = 127, -128, 0...
    let mut bytes = vec![0x00, 0x38];
    bytes.extend((0..32).map(|j| (j as i8 - 16) as u8));
    bytes.extend([0x00, 0xC0, 127, 0x80]);
    bytes.extend([0u8; 30]);
    let got = deq(GgmlType::Q8_0, &bytes, 64);
    let mut want: Vec<f32> = vec![
        -8.0, -7.5, -7.0, -6.5, -6.0, -5.5, -5.0, -4.5, -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0,
        -0.5, //
        0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5,
    ];
    want.extend([-254.0, 256.0]);
    want.extend([0.0; 30]);
    assert_close(&got, &want);
}

#[test]
fn q4_0_block() {
    // d = 2 (0x4000); byte j = low nibble j, high nibble 15 - j.
    // Weight j = 2 * (j - 8); weight 16 + j = 2 * (15 - j - 8).
    let mut bytes = vec![0x00, 0x40];
    bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = deq(GgmlType::Q4_0, &bytes, 32);
    let want = [
        -16.0, -14.0, -12.0, -10.0, -8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0,
        14.0, //
        14.0, 12.0, 10.0, 8.0, 6.0, 4.0, 2.0, 0.0, -2.0, -4.0, -6.0, -8.0, -10.0, -12.0, -14.0,
        -16.0,
    ];
    assert_close(&got, &want);
}

#[test]
fn q4_1_block() {
    // d = 0.5 (0x3800), m = -1 (0xBC00); same nibbles as above: weight = 0.5 * q - 1.
    let mut bytes = vec![0x00, 0x38, 0x00, 0xBC];
    bytes.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let got = deq(GgmlType::Q4_1, &bytes, 32);
    let want = [
        -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, //
        6.5, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0,
    ];
    assert_close(&got, &want);
}

/// Logical 6-bit sub-block scales and mins used for the K-quant blocks, and their packing
/// (worked out by hand from ggml's `get_scale_min_k4`):
/// bytes 0..4 = scale j | (scale j+4 >> 4) << 6, bytes 4..8 = min j | (min j+4 >> 4) << 6,
/// bytes 8..12 = (scale j+4 & 15) | (min j+4 & 15) << 4.
const K_SCALES: [u8; 8] = [1, 2, 3, 63, 17, 33, 50, 9];
const K_MINS: [u8; 8] = [0, 1, 2, 3, 40, 5, 63, 20];
const K_PACKED: [u8; 12] = [65, 130, 195, 63, 128, 1, 194, 67, 129, 81, 242, 73];

/// The 4-bit quant of byte `l` of group `c`: low nibble and high nibble.
fn k_nibbles(c: usize, l: usize) -> (u8, u8) {
    (((l + 3 * c) & 0xF) as u8, ((31 - l + c) & 0xF) as u8)
}

#[test]
fn q4_k_block() {
    // d = 1 (0x3C00), dmin = 0.5 (0x3800).
    let mut bytes = vec![0x00, 0x3C, 0x00, 0x38];
    bytes.extend(K_PACKED);
    for c in 0..4 {
        for l in 0..32 {
            let (lo, hi) = k_nibbles(c, l);
            bytes.push(lo | (hi << 4));
        }
    }
    assert_eq!(bytes.len(), 144);
    let mut want = Vec::new();
    for c in 0..4 {
        for half in 0..2 {
            let s = 2 * c + half;
            for l in 0..32 {
                let (lo, hi) = k_nibbles(c, l);
                let q = if half == 0 { lo } else { hi };
                want.push(1.0 * K_SCALES[s] as f32 * q as f32 - 0.5 * K_MINS[s] as f32);
            }
        }
    }
    assert_close(&deq(GgmlType::Q4K, &bytes, 256), &want);
}

#[test]
fn q5_k_block() {
    // d = 0.25 (0x3400), dmin = 2 (0x4000); qh[l] = 37 l + 11 (mod 256): bit 2c adds 16 to the
    // low-nibble weight l of group c, bit 2c + 1 to the high-nibble weight.
    let qh: Vec<u8> = (0..32).map(|l| (37 * l + 11) as u8).collect();
    let mut bytes = vec![0x00, 0x34, 0x00, 0x40];
    bytes.extend(K_PACKED);
    bytes.extend(&qh);
    for c in 0..4 {
        for l in 0..32 {
            let (lo, hi) = k_nibbles(c, l);
            bytes.push(lo | (hi << 4));
        }
    }
    assert_eq!(bytes.len(), 176);
    let mut want = Vec::new();
    for c in 0..4 {
        for half in 0..2 {
            let s = 2 * c + half;
            for (l, &qhl) in qh.iter().enumerate() {
                let (lo, hi) = k_nibbles(c, l);
                let q4 = if half == 0 { lo } else { hi };
                let bit = (qhl >> (2 * c + half)) & 1;
                let q = q4 as f32 + 16.0 * bit as f32;
                want.push(0.25 * K_SCALES[s] as f32 * q - 2.0 * K_MINS[s] as f32);
            }
        }
    }
    assert_close(&deq(GgmlType::Q5K, &bytes, 256), &want);
}

#[test]
fn q6_k_block() {
    // Chosen 6-bit quants q[w] = (7 w + 3) mod 64, packed by hand per ggml's layout: weight
    // w = 128 h + 32 k + l (k = 0..4, l = 0..32) keeps its low 4 bits in ql[64 h + l + 32 (k & 1)]
    // (low nibble for k < 2, high nibble for k >= 2) and its high 2 bits in bits 2k..2k+2 of
    // qh[32 h + l]; its scale is scales[8 h + l / 16 + 2 k]; value = d * scale * (q - 32).
    let q: Vec<u8> = (0..256).map(|w| ((7 * w + 3) % 64) as u8).collect();
    let scales: [i8; 16] = [
        1, -2, 3, -4, 5, -6, 7, -8, 9, -10, 11, -12, 13, -14, 127, -128,
    ];
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (w, &qw) in q.iter().enumerate() {
        let (h, k, l) = (w / 128, (w % 128) / 32, w % 32);
        let li = 64 * h + l + 32 * (k & 1);
        ql[li] |= if k < 2 { qw & 0xF } else { (qw & 0xF) << 4 };
        qh[32 * h + l] |= (qw >> 4) << (2 * k);
    }
    let mut bytes = ql.to_vec();
    bytes.extend(qh);
    bytes.extend(scales.map(|s| s as u8));
    bytes.extend([0x00, 0x34]); // d = 0.25
    assert_eq!(bytes.len(), 210);
    let want: Vec<f32> = (0..256)
        .map(|w| {
            let (h, k, l) = (w / 128, (w % 128) / 32, w % 32);
            0.25 * scales[8 * h + l / 16 + 2 * k] as f32 * (q[w] as f32 - 32.0)
        })
        .collect();
    assert_close(&deq(GgmlType::Q6K, &bytes, 256), &want);
}

#[test]
fn block_structs_match_byte_layouts() {
    let mut bytes = vec![0x00, 0x3C, 0x00, 0xBC];
    bytes.extend(0..16u8);
    let b: BlockQ4_1 = bytemuck::pod_read_unaligned(&bytes);
    assert_eq!(b.d, f16::ONE);
    assert_eq!(b.m, f16::NEG_ONE);
    assert_eq!(b.qs[15], 15);
    let b: BlockQ4_0 = bytemuck::pod_read_unaligned(&bytes[..18]);
    assert_eq!(b.d, f16::ONE);
    assert_eq!(b.qs[0], 0x00);
    assert_eq!(b.qs[1], 0xBC);
    let mut q8 = vec![0x00, 0x40];
    q8.extend([0xFFu8; 32]);
    let b: BlockQ8_0 = bytemuck::pod_read_unaligned(&q8);
    assert_eq!((b.d.to_f32(), b.qs[31]), (2.0, -1));
    let mut q6 = vec![0u8; 210];
    q6[192] = 0xFF;
    q6[208..].copy_from_slice(&[0x00, 0x38]);
    let b: BlockQ6K = bytemuck::pod_read_unaligned(&q6);
    assert_eq!((b.scales[0], b.d.to_f32()), (-1, 0.5));
    let b: BlockQ4K = bytemuck::Zeroable::zeroed();
    assert_eq!(bytemuck::bytes_of(&b).len(), 144);
    let b: BlockQ5K = bytemuck::Zeroable::zeroed();
    assert_eq!(bytemuck::bytes_of(&b).len(), 176);
}

#[test]
fn quantizer_golden_bytes() {
    // x[j] = j - 16: Q4_0 picks max = -16, d = 2, q = trunc(x / 2 + 8.5) clamped to 15.
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 16.0).collect();
    let q = quantize(GgmlType::Q4_0, &x).unwrap();
    let qv: [u8; 32] = [
        0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13,
        14, 14, 15, 15, 15,
    ];
    let mut want = vec![0x00, 0x40];
    want.extend((0..16).map(|j| qv[j] | (qv[j + 16] << 4)));
    assert_eq!(q, want);

    // Q4_1: min = -16 (0xCC00), d = 31/15 -> f16 0x4022, q = round(j * 15 / 31).
    let q = quantize(GgmlType::Q4_1, &x).unwrap();
    let qv: [u8; 32] = [
        0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13,
        14, 14, 15, 15,
    ];
    let mut want = vec![0x22, 0x40, 0x00, 0xCC];
    want.extend((0..16).map(|j| qv[j] | (qv[j + 16] << 4)));
    assert_eq!(q, want);

    // Q8_0 of x[j] = j - 17: amax 17, d = 17/127 -> f16 0x3049, q = round(x * 127 / 17).
    let x: Vec<f32> = (0..32).map(|j| j as f32 - 17.0).collect();
    let q = quantize(GgmlType::Q8_0, &x).unwrap();
    let qv: [i8; 32] = [
        -127, -120, -112, -105, -97, -90, -82, -75, -67, -60, -52, -45, -37, -30, -22, -15, -7, 0,
        7, 15, 22, 30, 37, 45, 52, 60, 67, 75, 82, 90, 97, 105,
    ];
    let mut want = vec![0x49, 0x30];
    want.extend(qv.map(|v| v as u8));
    assert_eq!(q, want);

    // An all-zero block quantizes to zeros (d = 0) and back.
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let q = quantize(ty, &[0.0; 32]).unwrap();
        assert!(deq(ty, &q, 32).iter().all(|&v| v == 0.0), "{ty}");
    }
}

/// Random values with a few outliers, in blocks of different magnitudes.
fn random_data(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let scale = [0.01f32, 1.0, 30.0][(i / 32) % 3];
            let v: f32 = rng.random_range(-1.0..1.0);
            if rng.random_range(0..50) == 0 {
                v * scale * 8.0
            } else {
                v * scale
            }
        })
        .collect()
}

#[test]
fn round_trips_within_format_bounds() {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 32 * 300;
    let x = random_data(&mut rng, n);
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
    ] {
        let q = quantize(ty, &x).unwrap();
        assert_eq!(q.len() as u64, ty.bytes_for(n as u64).unwrap());
        let y = deq(ty, &q, n);
        for (b, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let (lo, hi) = xb
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let h16 = 2f32.powi(-11); // f16 relative rounding of the stored scale / min
            for (i, (&a, &r)) in xb.iter().zip(yb).enumerate() {
                let bound = match ty {
                    GgmlType::F32 => 0.0,
                    // Below 2^-14 halves are subnormal with a fixed spacing of 2^-24.
                    GgmlType::F16 => (a.abs() * h16).max(2f32.powi(-25)),
                    GgmlType::BF16 => a.abs() * 2f32.powi(-8),
                    // Half a step of amax / 127, plus the scale's rounding times |q| <= 127.
                    GgmlType::Q8_0 => amax / 127.0 * (0.5 + 127.0 * h16) * 1.0001,
                    // One full step amax / 8 (the side opposite the max clamps at 7), plus rounding.
                    GgmlType::Q4_0 => amax / 8.0 * (1.0 + 8.0 * h16) * 1.0001,
                    // Half a step (max - min) / 15, plus the rounding of d (|q| <= 15) and of min.
                    GgmlType::Q4_1 => {
                        ((hi - lo) / 15.0 * (0.5 + 15.0 * h16) + lo.abs() * h16) * 1.0001
                    }
                    _ => unreachable!(),
                };
                assert!(
                    (a - r).abs() <= bound,
                    "{ty} block {b} elem {i}: {a} -> {r} (bound {bound})"
                );
            }
        }
        // The quantizers are round-to-nearest: the mean error is well below the worst case.
        if matches!(ty, GgmlType::Q8_0 | GgmlType::Q4_1) {
            let mean_rel: f64 = x
                .chunks(32)
                .zip(y.chunks(32))
                .map(|(xb, yb)| {
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    xb.iter()
                        .zip(yb)
                        .map(|(a, b)| ((a - b).abs() as f64) / amax)
                        .sum::<f64>()
                        / 32.0
                })
                .sum::<f64>()
                / (n / 32) as f64;
            let step = if ty == GgmlType::Q8_0 {
                1.0 / 127.0
            } else {
                2.0 / 15.0
            };
            assert!(
                mean_rel < 0.35 * step,
                "{ty}: mean relative error {mean_rel}"
            );
        }
    }
}

#[test]
fn large_inputs_use_the_parallel_path_and_agree() {
    // Above the parallel threshold: result equals block-by-block dequantization.
    let mut rng = StdRng::seed_from_u64(3);
    let n = 256 * 1024;
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q6K, GgmlType::F16] {
        let bytes: Vec<u8> = if matches!(ty, GgmlType::Q6K) {
            // Random bytes with finite scales: force each block's f16 `d` to a small value.
            let mut b: Vec<u8> = (0..ty.bytes_for(n as u64).unwrap())
                .map(|_| rng.random())
                .collect();
            for blk in b.chunks_mut(210) {
                blk[208..]
                    .copy_from_slice(&f16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes());
            }
            b
        } else {
            quantize(ty, &random_data(&mut rng, n)).unwrap()
        };
        let all = dequantize_to_vec(ty, &bytes, n).unwrap();
        let per_block = ty.block_elems() * 64;
        let bb = ty.block_bytes() * 64;
        for (i, (o, d)) in all.chunks(per_block).zip(bytes.chunks(bb)).enumerate() {
            let small = dequantize_to_vec(ty, d, per_block).unwrap();
            assert_eq!(o, &small[..], "{ty} chunk {i}");
        }
    }
}
