//! The seeded init kernel against its host generator.

mod common;

use common::*;
use freekv_kernels::half::bf16;
use freekv_kernels::ops::init::{InitKernels, uniform_value};
use freekv_kernels::testing::gpu;

#[test]
fn init_uniform_matches_host_generator() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let init = InitKernels::load(&g).unwrap();
    for &(n, seed, scale, offset) in &[
        (1usize, 1u64, 1.0f32, 0.0f32),
        (100_003, 42, 0.035, 0.0),
        (3_000_000, 7, 0.5, 1.0),
    ] {
        let mut out = poison_bf16(s, n);
        init.uniform_bf16(s, &mut out, seed, scale, offset).unwrap();
        let got = down(s, &out);
        for (i, &x) in got.iter().enumerate() {
            let want = bf16::from_f32(uniform_value(seed, i as u64, scale, offset));
            assert!(
                x.to_f32().is_finite()
                    && (x.to_f32() - want.to_f32()).abs() <= 1e-6 + 1e-2 * want.to_f32().abs(),
                "n {n} seed {seed}: element {i}: {x} vs {want}"
            );
        }
        let mean = got.iter().map(|x| x.to_f64()).sum::<f64>() / n as f64;
        assert!(
            (mean - offset as f64).abs() < 0.1 * scale as f64 + 1e-3 || n < 100,
            "mean {mean}"
        );
    }
}

#[test]
fn fill_columns_sets_only_the_leading_columns() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let init = InitKernels::load(&g).unwrap();
    for &(rows, row_len, cols) in &[
        (1usize, 1usize, 1usize),
        (1000, 576, 4),
        (3, 100, 0),
        (7, 9, 9),
    ] {
        let mut out = poison_bf16(s, rows * row_len);
        init.uniform_bf16(s, &mut out, 5, 0.5, 0.0).unwrap();
        init.fill_columns_bf16(s, &mut out, row_len, cols, 1536.0)
            .unwrap();
        let got = down(s, &out);
        for (i, &x) in got.iter().enumerate() {
            let want = if i % row_len < cols {
                1536.0
            } else {
                bf16::from_f32(uniform_value(5, i as u64, 0.5, 0.0)).to_f32()
            };
            assert!(
                (x.to_f32() - want).abs() <= 1e-6 + 1e-2 * want.abs(),
                "rows {rows} len {row_len} cols {cols}: element {i}: {x} vs {want}"
            );
        }
    }
    let mut out = poison_bf16(s, 10);
    assert!(init.fill_columns_bf16(s, &mut out, 3, 1, 1.0).is_err());
    assert!(init.fill_columns_bf16(s, &mut out, 5, 6, 1.0).is_err());
    assert!(init.fill_columns_bf16(s, &mut out, 5, 1, f32::NAN).is_err());
}
