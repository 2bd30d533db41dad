//! `QMatrix` products against dequantize-then-f64-dot, for every supported type, both kernel
//! families, matvec and matmul with several token counts, on seeded random data.

use freekv_model::qmatmul::parallel::ThreadPool;
use freekv_model::qmatmul::{Isa, QMatrix, matmul_many, matmul_many_with};
use freekv_model::{GgmlType, quant};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TYPES: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Random but valid encoded bytes for `rows × cols` weights: random payload bytes, finite f16 scales
/// of realistic size.
fn random_matrix(rng: &mut StdRng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n = rows * cols;
    let half_scale =
        |rng: &mut StdRng, lo: f32, hi: f32| f16::from_f32(rng.random_range(lo..hi)).to_le_bytes();
    match ty {
        GgmlType::F32 => (0..n)
            .flat_map(|_| rng.random_range(-1.0f32..1.0).to_le_bytes())
            .collect(),
        GgmlType::F16 => (0..n)
            .flat_map(|_| f16::from_f32(rng.random_range(-1.0f32..1.0)).to_le_bytes())
            .collect(),
        GgmlType::BF16 => (0..n)
            .flat_map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_le_bytes())
            .collect(),
        _ => {
            let (be, bb) = (ty.block_elems(), ty.block_bytes());
            let mut out = Vec::with_capacity(n / be * bb);
            for _ in 0..n / be {
                let mut blk = vec![0u8; bb];
                rng.fill(&mut blk[..]);
                // (offset, range) of each f16 field
                let fields: &[(usize, f32, f32)] = match ty {
                    GgmlType::Q4_0 | GgmlType::Q8_0 => &[(0, -0.05, 0.05)],
                    GgmlType::Q4_1 => &[(0, 0.001, 0.05), (2, -0.4, 0.1)],
                    GgmlType::Q4K | GgmlType::Q5K => &[(0, 0.0005, 0.01), (2, 0.0005, 0.01)],
                    GgmlType::Q6K => &[(208, -0.01, 0.01)],
                    _ => unreachable!(),
                };
                for &(off, lo, hi) in fields {
                    blk[off..off + 2].copy_from_slice(&half_scale(rng, lo, hi));
                }
                out.extend_from_slice(&blk);
            }
            out
        }
    }
}

/// Column counts exercised per type: block multiples, and for plain floats also an odd tail.
fn col_counts(ty: GgmlType) -> &'static [usize] {
    match ty.block_elems() {
        1 => &[37, 576],
        32 => &[96, 576],
        _ => &[256, 512],
    }
}

/// Checks `y` against `Σ w·x` in f64 from the dequantized weights: per element the error must be at
/// most 1e-5 of `Σ|w·x|` (the sum's own scale), and the norm-wise relative error at most 1e-5.
/// Returns the largest per-element error relative to `Σ|w·x|`.
fn check(label: &str, w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, y: &[f32]) -> f64 {
    let (mut err2, mut ref2, mut worst) = (0.0f64, 0.0f64, 0.0f64);
    for t in 0..n {
        let xt = &x[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let wr = &w[r * cols..(r + 1) * cols];
            let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
            let scale: f64 = wr
                .iter()
                .zip(xt)
                .map(|(&a, &b)| (a as f64 * b as f64).abs())
                .sum();
            let got = y[t * rows + r] as f64;
            assert!(got.is_finite(), "{label}: y[{t}][{r}] = {got}");
            assert!(
                (got - exact).abs() <= 1e-5 * scale,
                "{label}: y[{t}][{r}] = {got}, want {exact} (scale {scale})"
            );
            worst = worst.max((got - exact).abs() / scale);
            err2 += (got - exact).powi(2);
            ref2 += exact.powi(2);
        }
    }
    assert!(ref2 > 0.0, "{label}: degenerate reference");
    let rel = (err2 / ref2).sqrt();
    assert!(rel <= 1e-5, "{label}: norm-wise relative error {rel:e}");
    worst
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    if Isa::Avx2.is_supported() {
        v.push(Isa::Avx2);
    } else {
        println!("skipped: AVX2/FMA/F16C kernels (not supported by this CPU)");
    }
    v
}

#[test]
fn every_type_both_isas_matvec_and_matmul_match_reference() {
    let pool = ThreadPool::new(3);
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for ty in TYPES {
        let mut worst = [0.0f64; 2];
        for &cols in col_counts(ty) {
            for rows in [7usize, 67] {
                let data = random_matrix(&mut rng, ty, rows, cols);
                let m = QMatrix::new(ty, rows, cols, &data).unwrap();
                let w = quant::dequantize_to_vec(ty, &data, rows * cols).unwrap();
                let x: Vec<f32> = (0..13 * cols)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect();
                for isa in isas() {
                    let label = format!("{ty} {rows}x{cols} {isa:?}");
                    // matvec, token by token
                    let mut per_token = vec![0.0f32; 13 * rows];
                    for t in 0..13 {
                        m.matvec_with(
                            &pool,
                            isa,
                            &x[t * cols..(t + 1) * cols],
                            &mut per_token[t * rows..(t + 1) * rows],
                        )
                        .unwrap();
                    }
                    check(
                        &format!("{label} matvec"),
                        &w,
                        rows,
                        cols,
                        &x,
                        13,
                        &per_token,
                    );
                    for n in [1usize, 3, 8, 13] {
                        let mut y = vec![f32::NAN; n * rows];
                        m.matmul_with(&pool, isa, &x[..n * cols], n, &mut y)
                            .unwrap();
                        let e = check(&format!("{label} matmul n={n}"), &w, rows, cols, &x, n, &y);
                        worst[usize::from(isa != Isa::Scalar)] =
                            worst[usize::from(isa != Isa::Scalar)].max(e);
                    }
                }
            }
        }
        println!(
            "{ty}: worst |y - exact| / Σ|w·x|: scalar {:.2e}, simd {:.2e}",
            worst[0], worst[1]
        );
    }
}

#[test]
fn pool_size_does_not_change_results() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols) = (101, 576);
    let data = random_matrix(&mut rng, GgmlType::Q4_1, rows, cols);
    let m = QMatrix::new(GgmlType::Q4_1, rows, cols, &data).unwrap();
    let x: Vec<f32> = (0..5 * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mut first: Option<Vec<f32>> = None;
    for threads in [1, 2, 4] {
        let pool = ThreadPool::new(threads);
        let mut y = vec![0.0f32; 5 * rows];
        m.matmul_with(&pool, Isa::best(), &x, 5, &mut y).unwrap();
        match &first {
            None => first = Some(y),
            Some(f) => assert_eq!(f, &y, "{threads} threads"),
        }
    }
}

#[test]
fn default_entry_points_use_the_active_kernels() {
    let mut rng = StdRng::seed_from_u64(11);
    let (rows, cols) = (33, 96);
    let data = random_matrix(&mut rng, GgmlType::Q8_0, rows, cols);
    let m = QMatrix::new(GgmlType::Q8_0, rows, cols, &data).unwrap();
    let x: Vec<f32> = (0..4 * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let (mut a, mut b) = (vec![0.0f32; 4 * rows], vec![0.0f32; 4 * rows]);
    m.matmul(&x, 4, &mut a).unwrap();
    m.matmul_with(&ThreadPool::new(1), Isa::active(), &x, 4, &mut b)
        .unwrap();
    assert_eq!(a, b);
    let (mut c, mut d) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    m.matvec(&x[..cols], &mut c).unwrap();
    m.matvec_with(&ThreadPool::new(2), Isa::active(), &x[..cols], &mut d)
        .unwrap();
    assert_eq!(c, d);
}

#[test]
fn row_to_f32_is_the_dequantized_row() {
    let mut rng = StdRng::seed_from_u64(3);
    for ty in TYPES {
        let cols = col_counts(ty)[0];
        let rows = 5;
        let data = random_matrix(&mut rng, ty, rows, cols);
        let m = QMatrix::new(ty, rows, cols, &data).unwrap();
        let w = quant::dequantize_to_vec(ty, &data, rows * cols).unwrap();
        let mut out = vec![0.0f32; cols];
        for r in 0..rows {
            m.row_to_f32(r, &mut out).unwrap();
            assert_eq!(out, w[r * cols..(r + 1) * cols], "{ty} row {r}");
        }
        assert!(
            m.row_to_f32(rows, &mut out).is_err(),
            "{ty}: row out of range"
        );
        assert!(
            m.row_to_f32(0, &mut out[1..]).is_err(),
            "{ty}: short output"
        );
    }
}

#[test]
fn bad_sizes_are_errors() {
    let data = vec![0u8; 3 * 40];
    // constructor
    assert!(QMatrix::new(GgmlType::Q4_1, 3, 64, &data).is_ok());
    assert!(
        QMatrix::new(GgmlType::Q4_1, 3, 48, &data).is_err(),
        "cols not a block multiple"
    );
    assert!(
        QMatrix::new(GgmlType::Q4_1, 4, 64, &data).is_err(),
        "data too short"
    );
    assert!(
        QMatrix::new(GgmlType::Q4_1, 2, 64, &data).is_err(),
        "data too long"
    );
    assert!(QMatrix::new(GgmlType::Q4_1, 0, 64, &[]).is_err(), "no rows");
    assert!(
        QMatrix::new(GgmlType::Q5_1, 5, 32, &data).is_err(),
        "unsupported type"
    );
    assert!(
        QMatrix::new(GgmlType::Q4K, 1, 255, &[0u8; 144]).is_err(),
        "k-quant cols"
    );
    assert!(
        QMatrix::new(GgmlType::F32, usize::MAX / 2, 4, &data).is_err(),
        "overflowing size"
    );
    // products
    let m = QMatrix::new(GgmlType::Q4_1, 3, 64, &data).unwrap();
    let pool = ThreadPool::new(2);
    let x = vec![0.0f32; 2 * 64];
    let mut y = vec![0.0f32; 2 * 3];
    assert!(m.matvec(&x[..63], &mut y[..3]).is_err(), "short x");
    assert!(m.matvec(&x[..64], &mut y[..2]).is_err(), "short y");
    assert!(m.matvec(&x[..64], &mut y[..4]).is_err(), "long y");
    assert!(m.matmul(&x, 2, &mut y[..5]).is_err(), "matmul y");
    assert!(m.matmul(&x, 3, &mut y).is_err(), "matmul n");
    assert!(m.matmul(&x, usize::MAX, &mut y).is_err(), "matmul huge n");
    assert!(m.matmul_with(&pool, Isa::Scalar, &x, 2, &mut y).is_ok());
    assert!(m.matmul(&[], 0, &mut []).is_ok(), "zero tokens");
    if !Isa::Avx2.is_supported() {
        assert!(
            m.matmul_with(&pool, Isa::Avx2, &x, 2, &mut y).is_err(),
            "unsupported isa"
        );
    }
}

#[test]
fn matmul_many_equals_separate_products() {
    let mut rng = StdRng::seed_from_u64(21);
    let cols = 256;
    let specs = [
        (GgmlType::Q4_1, 67),
        (GgmlType::Q8_0, 13),
        (GgmlType::F16, 5),
        (GgmlType::Q6K, 9),
    ];
    let datas: Vec<Vec<u8>> = specs
        .iter()
        .map(|&(ty, r)| random_matrix(&mut rng, ty, r, cols))
        .collect();
    let mats: Vec<QMatrix<'_>> = specs
        .iter()
        .zip(&datas)
        .map(|(&(ty, r), d)| QMatrix::new(ty, r, cols, d).unwrap())
        .collect();
    let pool = ThreadPool::new(3);
    for isa in isas() {
        for n in [1usize, 5] {
            let x: Vec<f32> = (0..n * cols)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let mut outs: Vec<Vec<f32>> =
                mats.iter().map(|m| vec![f32::NAN; n * m.rows()]).collect();
            let mut views: Vec<&mut [f32]> = outs.iter_mut().map(Vec::as_mut_slice).collect();
            matmul_many_with(&pool, isa, &mats, &x, n, &mut views).unwrap();
            for (m, got) in mats.iter().zip(&outs) {
                let mut want = vec![0.0f32; n * m.rows()];
                m.matmul_with(&pool, isa, &x, n, &mut want).unwrap();
                assert_eq!(got, &want, "{} {isa:?} n={n}", m.ty());
            }
        }
    }
    // errors
    let x = vec![0.0f32; cols];
    let mut a = vec![0.0f32; 67];
    let mut b = [0.0f32; 13];
    assert!(
        matmul_many(&mats[..2], &x, 1, &mut [&mut a[..]]).is_err(),
        "fewer outputs than matrices"
    );
    assert!(
        matmul_many(&mats[..2], &x, 1, &mut [&mut a[..], &mut b[..12]]).is_err(),
        "short output"
    );
    assert!(
        matmul_many(&mats[..2], &x[..cols - 1], 1, &mut [&mut a[..], &mut b[..]]).is_err(),
        "short input"
    );
    let other = random_matrix(&mut rng, GgmlType::Q8_0, 13, 2 * cols);
    let wide = QMatrix::new(GgmlType::Q8_0, 13, 2 * cols, &other).unwrap();
    assert!(
        matmul_many(&[mats[0], wide], &x, 1, &mut [&mut a[..], &mut b[..]]).is_err(),
        "column mismatch"
    );
    assert!(matmul_many(&mats[..2], &x, 1, &mut [&mut a[..], &mut b[..]]).is_ok());
    assert!(matmul_many(&[], &x, 1, &mut []).is_ok(), "no matrices");
}
