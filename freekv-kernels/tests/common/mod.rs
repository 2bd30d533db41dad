//! Shared helpers of the GPU tests: random bf16 data, NaN poisoning, relative-error checks.
#![allow(dead_code)]

use std::sync::Arc;

use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Quiet-NaN bit patterns written into outputs before each run.
pub const NAN_BF16: u16 = 0x7fc1;
pub const NAN_F32: u32 = 0x7fc0_0001;

/// Required bound on max|got − want| / max|want|.
pub const TOL: f64 = 1e-2;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Uniform bf16 values in [lo, hi).
pub fn rand_bf16(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(lo..hi)))
        .collect()
}

pub fn rand_f32(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

pub fn f(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

pub fn up<T: freekv_kernels::cudarc::driver::DeviceRepr>(
    s: &Arc<CudaStream>,
    v: &[T],
) -> CudaSlice<T> {
    s.clone_htod(v).unwrap()
}

/// A device buffer of `n` bf16 NaNs.
pub fn poison_bf16(s: &Arc<CudaStream>, n: usize) -> CudaSlice<bf16> {
    s.clone_htod(&vec![bf16::from_bits(NAN_BF16); n]).unwrap()
}

/// A device buffer of `n` f32 NaNs.
pub fn poison_f32(s: &Arc<CudaStream>, n: usize) -> CudaSlice<f32> {
    s.clone_htod(&vec![f32::from_bits(NAN_F32); n]).unwrap()
}

/// A device buffer of `n` i32 set to a sentinel that no valid answer takes.
pub fn poison_i32(s: &Arc<CudaStream>, n: usize) -> CudaSlice<i32> {
    s.clone_htod(&vec![i32::MIN; n]).unwrap()
}

pub fn down<T: freekv_kernels::cudarc::driver::DeviceRepr + Default + Clone>(
    s: &Arc<CudaStream>,
    d: &CudaSlice<T>,
) -> Vec<T> {
    s.synchronize().unwrap();
    let v = s.clone_dtoh(d).unwrap();
    s.synchronize().unwrap();
    v
}

/// Checks `got` against `want`: no NaN/inf in `got`, a non-trivial reference, and
/// max|got − want| / max|want| <= tol. Returns the measured relative error.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!(
            "{what}: non-finite output {} at index {i} (want {})",
            got[i], want[i]
        );
    }
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    assert!(
        scale.is_finite() && scale > 0.0,
        "{what}: reference is all zero or non-finite"
    );
    let (mut worst, mut at) = (0.0f64, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        if e > worst {
            worst = e;
            at = i;
        }
    }
    let rel = worst / scale;
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.0e} (index {at}: got {}, want {}, scale {scale:.3e})",
        got[at],
        want[at]
    );
    rel
}

/// Bit-exact comparison of bf16 buffers (NaN patterns included).
pub fn assert_bits_eq(what: &str, got: &[bf16], want: &[bf16]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: element {i} got {g} want {w}"
        );
    }
}

/// A random permutation of 0..n.
pub fn permutation(rng: &mut StdRng, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
    v
}
