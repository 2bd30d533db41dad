//! cuBLAS bf16 GEMM (fp32 accumulation) against an f64 reference.
#![allow(clippy::needless_range_loop)] // index-based scalar references read like the math

mod common;

use common::*;
use freekv_kernels::testing::gpu;
use freekv_kernels::{Gemm, KernelError, LinearDims};

#[test]
fn linear_bf16_and_f32_outputs() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    // cuBLAS itself, whatever FREEKV_GEMM chose for the shared handle.
    let gemm = Gemm::new(s.clone()).unwrap();
    let mut r = rng(0x6E);
    for &(t, i, o) in &[
        (1usize, 576usize, 1536usize),
        (5, 4096, 1024),
        (64, 896, 4864),
        (3, 100, 49),
    ] {
        let x = rand_bf16(&mut r, t * i, -1.0, 1.0);
        let w = rand_bf16(&mut r, o * i, -0.1, 0.1);
        let y0 = rand_bf16(&mut r, t * o, -1.0, 1.0);
        let mut want = vec![0.0f64; t * o];
        for a in 0..t {
            for b in 0..o {
                want[a * o + b] = (0..i)
                    .map(|c| x[a * i + c].to_f32() as f64 * w[b * i + c].to_f32() as f64)
                    .sum();
            }
        }
        let dims = LinearDims {
            tokens: t,
            in_features: i,
            out_features: o,
        };
        let (dx, dw) = (up(s, &x), up(s, &w));
        let mut y = poison_bf16(s, t * o);
        gemm.linear(&dx, &dw, &mut y, dims, false).unwrap();
        let e1 = assert_close("gemm bf16", &f(&down(s, &y)), &want, TOL);
        let mut y32 = poison_f32(s, t * o);
        gemm.linear_f32(&dx, &dw, &mut y32, dims, false).unwrap();
        let e2 = assert_close("gemm f32", &down(s, &y32), &want, 1e-4);
        // Accumulate into an existing output.
        let mut ya = up(s, &y0);
        gemm.linear(&dx, &dw, &mut ya, dims, true).unwrap();
        let want_acc: Vec<f64> = want
            .iter()
            .zip(&y0)
            .map(|(a, b)| a + b.to_f32() as f64)
            .collect();
        let e3 = assert_close("gemm accumulate", &f(&down(s, &ya)), &want_acc, TOL);
        println!("gemm {t}x{i}x{o}: rel err {e1:.2e} / {e2:.2e} / {e3:.2e}");
    }
    let dx = up(s, &[freekv_kernels::half::bf16::ONE; 4]);
    let mut y = poison_bf16(s, 4);
    let bad = LinearDims {
        tokens: 2,
        in_features: 4,
        out_features: 2,
    };
    let e = gemm.linear(&dx, &dx, &mut y, bad, false).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::InvalidArgument {
                kernel: "gemm_bf16",
                ..
            }
        ),
        "{e}"
    );
}
