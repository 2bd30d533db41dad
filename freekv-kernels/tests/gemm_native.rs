//! The native tensor-core GEMM (`kernels/gemm.cu`) against an f64 CPU reference over awkward
//! shapes (every combination of tokens 1, 3, 17, 130, 1000; in 64, 100, 576, 4096; out 1, 70,
//! 333, 1000), both tile heights, the vector and the scalar load paths, bf16 and f32 outputs,
//! with and without accumulation; misaligned views (nothing written outside `y`); argument
//! errors; a CUDA-graph capture; and the native GEMM against cuBLAS on decoder-sized products.
//! Outputs are poisoned with NaN first, so an element the kernel does not write fails the test.
//! Inputs are fresh random values each run (the seed is printed; `FREEKV_GEMM_TEST_SEED=N`
//! repeats a run). Prints "skipped: no CUDA device" and passes where there is no GPU.

mod common;

use std::sync::Arc;

use common::*;
use freekv_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use freekv_kernels::ops::gemm_native::{NATIVE_GEMM_BLOCK_M, NativeGemm, NativeGemmConfig};
use freekv_kernels::testing::gpu;
use freekv_kernels::{Gemm, GemmBackend, GemmChoice, KernelError, LinearDims, Matmul};

fn seed() -> u64 {
    let s = std::env::var("FREEKV_GEMM_TEST_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    println!("seed {s} (FREEKV_GEMM_TEST_SEED={s} repeats this run)");
    s
}

fn dims(tokens: usize, in_features: usize, out_features: usize) -> LinearDims {
    LinearDims {
        tokens,
        in_features,
        out_features,
    }
}

/// `y[a, b] = Σ_i x[a, i] · w[b, i]` in f64 (rows split over the CPU's threads).
fn reference(x: &[bf16], w: &[bf16], d: LinearDims) -> Vec<f64> {
    let (t, k, n) = (d.tokens, d.in_features, d.out_features);
    let xf: Vec<f64> = x[..t * k].iter().map(|v| v.to_f64()).collect();
    let wf: Vec<f64> = w[..n * k].iter().map(|v| v.to_f64()).collect();
    let mut out = vec![0.0f64; t * n];
    let threads = std::thread::available_parallelism().map_or(4, |p| p.get());
    let rows_per = t.div_ceil(threads).max(1);
    std::thread::scope(|sc| {
        for (ci, chunk) in out.chunks_mut(rows_per * n).enumerate() {
            let (xf, wf) = (&xf, &wf);
            sc.spawn(move || {
                for (r, row) in chunk.chunks_mut(n).enumerate() {
                    let a = ci * rows_per + r;
                    let xr = &xf[a * k..(a + 1) * k];
                    for (b, o) in row.iter_mut().enumerate() {
                        let wr = &wf[b * k..(b + 1) * k];
                        *o = xr.iter().zip(wr).map(|(p, q)| p * q).sum();
                    }
                }
            });
        }
    });
    out
}

fn plus(want: &[f64], y0: &[bf16]) -> Vec<f64> {
    want.iter().zip(y0).map(|(a, b)| a + b.to_f64()).collect()
}

fn plus_f32(want: &[f64], y0: &[f32]) -> Vec<f64> {
    want.iter().zip(y0).map(|(a, &b)| a + b as f64).collect()
}

/// The other tile height than `auto`'s.
fn other_tile(auto: NativeGemmConfig) -> NativeGemmConfig {
    NativeGemmConfig {
        block_m: if auto.block_m == 128 { 64 } else { 128 },
        ..auto
    }
}

#[test]
fn native_gemm_matches_f64_reference_on_awkward_shapes() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let ng = NativeGemm::for_stream(s).unwrap();
    let mut r = rng(seed());
    let mut worst = [0.0f64; 6];
    let mut cases = 0;
    for &t in &[1usize, 3, 17, 130, 1000] {
        for &k in &[64usize, 100, 576, 4096] {
            for &n in &[1usize, 70, 333, 1000] {
                let d = dims(t, k, n);
                let x = rand_bf16(&mut r, t * k, -1.0, 1.0);
                let w = rand_bf16(&mut r, n * k, -0.1, 0.1);
                let y0 = rand_bf16(&mut r, t * n, -1.0, 1.0);
                let y0f = rand_f32(&mut r, t * n, -1.0, 1.0);
                let want = reference(&x, &w, d);
                let (dx, dw) = (up(s, &x), up(s, &w));
                let auto = NativeGemmConfig::auto(d, ng.sm_count());
                let scalar = NativeGemmConfig {
                    vector_loads: false,
                    ..auto
                };
                let label = |what: &str, c: NativeGemmConfig| {
                    format!(
                        "{what} {t}x{k}x{n} (block_m {}, {} loads)",
                        c.block_m,
                        if c.vector_loads && k % 8 == 0 {
                            "vector"
                        } else {
                            "scalar"
                        }
                    )
                };
                let mut errs = [0.0f64; 6];
                // bf16 out, both tile heights.
                for (i, c) in [auto, other_tile(auto)].into_iter().enumerate() {
                    let mut y = poison_bf16(s, t * n);
                    ng.linear_with(s, &dx, &dw, &mut y, d, false, c).unwrap();
                    errs[i] = assert_close(&label("bf16", c), &f(&down(s, &y)), &want, TOL);
                }
                // f32 out.
                let mut y = poison_f32(s, t * n);
                ng.linear(s, &dx, &dw, &mut y, d, false).unwrap();
                errs[2] = assert_close(&label("f32", auto), &down(s, &y), &want, 1e-4);
                // Accumulation, bf16 and f32 (the latter through the scalar loads).
                let mut y = up(s, &y0);
                ng.linear(s, &dx, &dw, &mut y, d, true).unwrap();
                errs[3] = assert_close(
                    &label("bf16 accumulate", auto),
                    &f(&down(s, &y)),
                    &plus(&want, &y0),
                    TOL,
                );
                let mut y = up(s, &y0f);
                ng.linear_with(s, &dx, &dw, &mut y, d, true, scalar)
                    .unwrap();
                errs[4] = assert_close(
                    &label("f32 accumulate", scalar),
                    &down(s, &y),
                    &plus_f32(&want, &y0f),
                    1e-4,
                );
                // bf16, scalar loads, the other tile height.
                let c = other_tile(scalar);
                let mut y = poison_bf16(s, t * n);
                ng.linear_with(s, &dx, &dw, &mut y, d, false, c).unwrap();
                errs[5] = assert_close(&label("bf16", c), &f(&down(s, &y)), &want, TOL);
                for (w_, e) in worst.iter_mut().zip(errs) {
                    *w_ = w_.max(e);
                }
                cases += 1;
            }
        }
    }
    println!(
        "{cases} shapes; worst rel err: bf16 auto {:.2e}, bf16 other tile {:.2e}, f32 {:.2e}, \
         bf16 accumulate {:.2e}, f32 accumulate scalar {:.2e}, bf16 scalar other tile {:.2e}",
        worst[0], worst[1], worst[2], worst[3], worst[4], worst[5]
    );
}

/// Views that start at odd elements (x, w and y not 16-byte aligned: the scalar path and single
/// stores) and views in the middle of longer buffers: exact results, nothing written outside the
/// `tokens · out` elements of `y`.
#[test]
fn misaligned_views_and_no_writes_outside_y() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let ng = NativeGemm::for_stream(s).unwrap();
    let mut r = rng(seed() ^ 0x5A);
    for &(t, k, n, xo, wo, yo) in &[
        (17usize, 576usize, 333usize, 1usize, 0usize, 1usize),
        (130, 4096, 70, 1, 3, 0),
        (3, 100, 1000, 7, 5, 3),
        (1000, 64, 1, 0, 0, 1),
        (64, 256, 128, 8, 8, 2), // aligned views inside longer buffers
    ] {
        let d = dims(t, k, n);
        let pad = 37;
        let x = rand_bf16(&mut r, xo + t * k + pad, -1.0, 1.0);
        let w = rand_bf16(&mut r, wo + n * k + pad, -0.1, 0.1);
        let want = reference(&x[xo..], &w[wo..], d);
        let (dx, dw) = (up(s, &x), up(s, &w));
        let (xv, wv) = (dx.slice(xo..), dw.slice(wo..));
        for accumulate in [false, true] {
            let y0 = rand_bf16(&mut r, yo + t * n + pad, -1.0, 1.0);
            let mut host = y0.clone();
            if !accumulate {
                for v in &mut host[yo..yo + t * n] {
                    *v = bf16::from_bits(NAN_BF16);
                }
            }
            let mut dy = up(s, &host);
            {
                let mut yv = dy.slice_mut(yo..);
                ng.linear(s, &xv, &wv, &mut yv, d, accumulate).unwrap();
            }
            let got = down(s, &dy);
            let what = format!("{t}x{k}x{n} x+{xo} w+{wo} y+{yo} accumulate {accumulate}");
            let want_y = if accumulate {
                plus(&want, &y0[yo..yo + t * n])
            } else {
                want.clone()
            };
            assert_close(&what, &f(&got[yo..yo + t * n]), &want_y, TOL);
            assert_bits_eq(&format!("{what}: before y"), &got[..yo], &host[..yo]);
            assert_bits_eq(
                &format!("{what}: after y"),
                &got[yo + t * n..],
                &host[yo + t * n..],
            );
        }
        // f32 output at an odd offset (single stores).
        let mut dy = poison_f32(s, yo + t * n + pad);
        {
            let mut yv = dy.slice_mut(yo..);
            ng.linear(s, &xv, &wv, &mut yv, d, false).unwrap();
        }
        let got = down(s, &dy);
        assert_close(
            &format!("f32 {t}x{k}x{n} y+{yo}"),
            &got[yo..yo + t * n],
            &want,
            1e-4,
        );
        assert!(
            got[..yo]
                .iter()
                .chain(&got[yo + t * n..])
                .all(|v| v.to_bits() == NAN_F32),
            "f32 {t}x{k}x{n}: written outside y"
        );
    }
}

#[test]
fn argument_errors() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let ng = NativeGemm::for_stream(s).unwrap();
    let x = up(s, &[bf16::ONE; 64]);
    let w = up(s, &[bf16::ONE; 64]);
    let mut y = poison_bf16(s, 64);
    let bad = |e: KernelError| {
        assert!(
            matches!(
                e,
                KernelError::InvalidArgument {
                    kernel: "gemm_native_bf16",
                    ..
                }
            ),
            "{e}"
        );
    };
    bad(ng
        .linear(s, &x, &w, &mut y, dims(2, 0, 2), false)
        .unwrap_err());
    bad(ng
        .linear(s, &x, &w, &mut y, dims(2, 8, 0), false)
        .unwrap_err());
    bad(ng
        .linear(s, &x, &w, &mut y, dims(9, 8, 2), false)
        .unwrap_err());
    bad(ng
        .linear(s, &x, &w, &mut y, dims(2, 8, 9), false)
        .unwrap_err());
    bad(ng
        .linear(s, &x, &w, &mut y, dims(8, 8, 9), false)
        .unwrap_err());
    bad(ng
        .linear(s, &x, &w, &mut y, dims(usize::MAX, 2, 1), false)
        .unwrap_err());
    let odd = NativeGemmConfig {
        block_m: 32,
        vector_loads: true,
    };
    bad(ng
        .linear_with(s, &x, &w, &mut y, dims(2, 8, 2), false, odd)
        .unwrap_err());
    // Zero tokens: nothing to do, nothing written.
    ng.linear(s, &x, &w, &mut y, dims(0, 8, 2), false).unwrap();
    assert!(down(s, &y).iter().all(|v| v.to_bits() == NAN_BF16));
    for bm in NATIVE_GEMM_BLOCK_M {
        let c = NativeGemmConfig {
            block_m: bm,
            vector_loads: true,
        };
        ng.linear_with(s, &x, &w, &mut y, dims(8, 8, 8), false, c)
            .unwrap();
        assert!(down(s, &y).iter().all(|v| v.to_f32() == 8.0));
    }
}

/// A product captured in a CUDA graph and replayed gives the eager result, bit for bit.
#[test]
fn graph_capture_equals_eager() {
    let Some(g) = gpu() else { return };
    // A stream of its own: the shared one is used by the other tests of this binary.
    let s: Arc<CudaStream> = g.ctx().new_stream().unwrap();
    let ng = NativeGemm::for_stream(&s).unwrap();
    let mut r = rng(seed() ^ 0x6A);
    let d = dims(130, 576, 333);
    let x = up(&s, &rand_bf16(&mut r, 130 * 576, -1.0, 1.0));
    let w = up(&s, &rand_bf16(&mut r, 333 * 576, -0.1, 0.1));
    let mut eager = poison_f32(&s, 130 * 333);
    ng.linear(&s, &x, &w, &mut eager, d, false).unwrap();
    let mut eager_b = poison_bf16(&s, 130 * 333);
    ng.linear(&s, &x, &w, &mut eager_b, d, false).unwrap();
    let mut y: CudaSlice<f32> = poison_f32(&s, 130 * 333);
    let mut yb: CudaSlice<bf16> = poison_bf16(&s, 130 * 333);
    s.synchronize().unwrap();
    s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    ng.linear(&s, &x, &w, &mut y, d, false).unwrap();
    ng.linear(&s, &x, &w, &mut yb, d, false).unwrap();
    ng.linear(&s, &x, &w, &mut yb, d, true).unwrap();
    let graph = s
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("captured graph");
    graph.launch().unwrap();
    s.synchronize().unwrap();
    let (a, b) = (down(&s, &y), down(&s, &eager));
    assert!(
        a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
        "graph replay differs from eager"
    );
    // bf16: y = p, then y += p (rounded once more) — eager the same way.
    ng.linear(&s, &x, &w, &mut eager_b, d, true).unwrap();
    assert_bits_eq("bf16 graph", &down(&s, &yb), &down(&s, &eager_b));
}

/// Native against cuBLAS on decoder-sized products (Llama-3.1-8B-like widths, a prefill chunk
/// and a ragged batch), and `Matmul` with each backend.
#[test]
fn native_matches_cublas_on_decoder_products() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let native = Matmul::new(s.clone(), GemmChoice::Native, 0).unwrap();
    assert_eq!(native.backend(), GemmBackend::Native);
    assert!(native.cublas().is_none() && native.native().is_some());
    let cublas = Gemm::with_workspace(s.clone(), 32 << 20).unwrap();
    let mut r = rng(seed() ^ 0x7B);
    for &(t, k, n) in &[
        (512usize, 4096usize, 6144usize),
        (512, 14336, 4096),
        (37, 4096, 28672),
        (256, 2048, 49152),
    ] {
        let d = dims(t, k, n);
        let x = up(s, &rand_bf16(&mut r, t * k, -1.0, 1.0));
        let w = up(s, &rand_bf16(&mut r, n * k, -0.02, 0.02));
        let mut yc = poison_f32(s, t * n);
        let mut yn = poison_f32(s, t * n);
        cublas.linear_f32(&x, &w, &mut yc, d, false).unwrap();
        native.linear(&x, &w, &mut yn, d, false).unwrap();
        let want: Vec<f64> = down(s, &yc).iter().map(|&v| v as f64).collect();
        let e32 = assert_close(
            &format!("f32 {t}x{k}x{n} native vs cuBLAS"),
            &down(s, &yn),
            &want,
            1e-4,
        );
        let mut bc = poison_bf16(s, t * n);
        let mut bn = poison_bf16(s, t * n);
        cublas.linear(&x, &w, &mut bc, d, false).unwrap();
        native.linear(&x, &w, &mut bn, d, false).unwrap();
        let want: Vec<f64> = f(&down(s, &bc)).iter().map(|&v| v as f64).collect();
        let e16 = assert_close(
            &format!("bf16 {t}x{k}x{n} native vs cuBLAS"),
            &f(&down(s, &bn)),
            &want,
            TOL,
        );
        println!("{t}x{k}x{n}: native vs cuBLAS rel diff f32 {e32:.2e}, bf16 {e16:.2e}");
    }
}

/// `FREEKV_GEMM` values: the three names parse, anything else is an error naming the variable.
#[test]
fn backend_choice_parsing() {
    assert_eq!("native".parse::<GemmChoice>().unwrap(), GemmChoice::Native);
    assert_eq!("cublas".parse::<GemmChoice>().unwrap(), GemmChoice::Cublas);
    assert_eq!("auto".parse::<GemmChoice>().unwrap(), GemmChoice::Auto);
    let e = "cutlass".parse::<GemmChoice>().unwrap_err().to_string();
    assert!(e.contains("FREEKV_GEMM") && e.contains("cutlass"), "{e}");
}
