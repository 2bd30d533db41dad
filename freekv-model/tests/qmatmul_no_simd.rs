//! `FREEKV_NO_SIMD=1` forces the scalar kernels in the default entry points. One test per file:
//! the variable is set before anything reads it.

use freekv_model::qmatmul::parallel::ThreadPool;
use freekv_model::qmatmul::{Isa, NO_SIMD_ENV, QMatrix};
use freekv_model::{GgmlType, quant};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn no_simd_env_selects_scalar_kernels() {
    // SAFETY: this binary's only test; no other thread reads the environment yet.
    unsafe { std::env::set_var(NO_SIMD_ENV, "1") };
    assert_eq!(Isa::active(), Isa::Scalar);

    let mut rng = StdRng::seed_from_u64(99);
    let (rows, cols) = (45, 128);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let data = quant::quantize(GgmlType::Q4_1, &w).unwrap();
    let m = QMatrix::new(GgmlType::Q4_1, rows, cols, &data).unwrap();
    let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let (mut a, mut b) = (vec![0.0f32; rows], vec![0.0f32; rows]);
    m.matvec(&x, &mut a).unwrap();
    m.matvec_with(&ThreadPool::new(1), Isa::Scalar, &x, &mut b)
        .unwrap();
    assert_eq!(a, b);
    if Isa::Avx2.is_supported() {
        // the SIMD kernels sum in a different order, so they differ in the last bits somewhere
        let mut c = vec![0.0f32; rows];
        m.matvec_with(&ThreadPool::new(1), Isa::Avx2, &x, &mut c)
            .unwrap();
        assert!(
            a.iter().zip(&c).any(|(p, q)| p != q),
            "scalar and SIMD results are bit-identical"
        );
    }
}
