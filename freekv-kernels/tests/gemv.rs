//! The skinny products of the `gemv` module (plain, RMSNorm prologue, RMSNorm + SwiGLU) against
//! f64 CPU references on fresh random bf16 inputs, and the fused RoPE + KV append against the
//! composition of the two existing kernels (bit for bit). Outputs are poisoned with NaN first.
#![allow(clippy::needless_range_loop)] // index-based scalar references read like the math

mod common;

use common::*;
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use freekv_kernels::ops::gemv::{GemvConfig, GemvKernels, QkvRows, gemv_supported};
use freekv_kernels::testing::gpu;
use freekv_kernels::{
    KernelError, KvSource, LinearDims, PageTableLayout, RopeConfig, RopeLayout, RopeStyle, Strided,
};
use freekv_layout::PageGeometry;
use rand::Rng;
use std::sync::Arc;

fn dims(tokens: usize, in_features: usize, out_features: usize) -> LinearDims {
    LinearDims {
        tokens,
        in_features,
        out_features,
    }
}

/// `x · wᵀ` in f64 (`x` `[t, k]`, `w` `[n, k]`), with `x` optionally scaled per row and column.
fn reference(x: &[f32], w: &[f32], t: usize, k: usize, n: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; t * n];
    for a in 0..t {
        let xr = &x[a * k..(a + 1) * k];
        for b in 0..n {
            let wr = &w[b * k..(b + 1) * k];
            y[a * n + b] = xr.iter().zip(wr).map(|(&p, &q)| p as f64 * q as f64).sum();
        }
    }
    y
}

/// RMSNorm of each row of `x` in f64, as f32 (no rounding to bf16: the fused kernels do not
/// round the normalised activations either).
fn rmsnorm_ref(x: &[f32], g: &[f32], t: usize, k: usize, eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; t * k];
    for a in 0..t {
        let xr = &x[a * k..(a + 1) * k];
        let ms = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..k {
            out[a * k + i] = (xr[i] as f64 * inv * g[i] as f64) as f32;
        }
    }
    out
}

/// Output buffer of `n` NaNs plus `extra` trailing NaNs that must stay untouched.
fn check_tail_bf16(what: &str, s: &Arc<CudaStream>, y: &CudaSlice<bf16>, n: usize) -> Vec<f32> {
    let v = down(s, y);
    assert!(
        v[n..].iter().all(|x| x.to_bits() == NAN_BF16),
        "{what}: wrote past the output"
    );
    f(&v[..n])
}

fn check_tail_f32(what: &str, s: &Arc<CudaStream>, y: &CudaSlice<f32>, n: usize) -> Vec<f32> {
    let v = down(s, y);
    assert!(
        v[n..].iter().all(|x| x.to_bits() == NAN_F32),
        "{what}: wrote past the output"
    );
    v[..n].to_vec()
}

#[test]
fn linear_matches_reference() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let gv = g.kernels().gemv();
    let mut r = rng(0x6E31);
    for &(t, k, n) in &[
        (1usize, 4096usize, 1000usize),
        (2, 576, 1537),
        (3, 296, 77),
        (4, 1024, 515),
        (5, 8, 33),
        (6, 2048, 260),
        (7, 136, 999),
        (8, 14336, 300),
        (8, 4096, 1024),
        (1, 14336, 17),
        (1, 64, 3),
    ] {
        let x = rand_bf16(&mut r, t * k, -1.0, 1.0);
        let w = rand_bf16(&mut r, n * k, -0.1, 0.1);
        let y0 = rand_bf16(&mut r, t * n, -1.0, 1.0);
        let want = reference(&f(&x), &f(&w), t, k, n);
        let d = dims(t, k, n);
        assert!(gemv_supported(d));
        let (dx, dw) = (up(s, &x), up(s, &w));
        let mut y = poison_bf16(s, t * n + 7);
        gv.linear(s, &dx, &dw, &mut y, d, false).unwrap();
        let e1 = assert_close(
            "gemv bf16",
            &check_tail_bf16("gemv bf16", s, &y, t * n),
            &want,
            TOL,
        );
        let mut y32 = poison_f32(s, t * n + 7);
        gv.linear(s, &dx, &dw, &mut y32, d, false).unwrap();
        let e2 = assert_close(
            "gemv f32",
            &check_tail_f32("gemv f32", s, &y32, t * n),
            &want,
            1e-4,
        );
        // Accumulate into an existing output (the residual add), bf16 and f32.
        let want_acc: Vec<f64> = want
            .iter()
            .zip(&y0)
            .map(|(a, b)| a + b.to_f32() as f64)
            .collect();
        let mut ya = up(s, &y0);
        gv.linear(s, &dx, &dw, &mut ya, d, true).unwrap();
        let e3 = assert_close("gemv accumulate", &f(&down(s, &ya)), &want_acc, TOL);
        let mut ya32 = up(s, &f(&y0));
        gv.linear(s, &dx, &dw, &mut ya32, d, true).unwrap();
        let e4 = assert_close("gemv accumulate f32", &down(s, &ya32), &want_acc, 1e-4);
        println!("gemv {t}x{k}x{n}: rel err {e1:.2e} / {e2:.2e} / {e3:.2e} / {e4:.2e}");
    }
}

#[test]
fn every_launch_shape_matches_reference() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let gv = g.kernels().gemv();
    let mut r = rng(0x5EED);
    // k = 1032: 129 chunks, an odd count that exercises the unrolled loop's remainder for every
    // thread count; n = 203: a partial last block for every rows-per-block.
    let (k, n) = (1032usize, 203usize);
    for t in 1..=8usize {
        let x = rand_bf16(&mut r, t * k, -1.0, 1.0);
        let w = rand_bf16(&mut r, n * k, -0.1, 0.1);
        let want = reference(&f(&x), &f(&w), t, k, n);
        let (dx, dw) = (up(s, &x), up(s, &w));
        let cands = GemvConfig::candidates(t);
        assert!(cands.len() >= 6, "{t}: {cands:?}");
        let mut worst = 0.0f64;
        for cfg in cands.into_iter().chain([GemvConfig {
            rows_per_block: 2,
            threads: 32,
        }]) {
            let mut y = poison_bf16(s, t * n + 3);
            gv.linear_with(s, &dx, &dw, &mut y, dims(t, k, n), false, cfg)
                .unwrap();
            let got = check_tail_bf16("gemv shape", s, &y, t * n);
            worst = worst.max(assert_close(&format!("gemv {t} {cfg:?}"), &got, &want, TOL));
        }
        println!("gemv t={t}: every launch shape within {worst:.2e}");
    }
}

#[test]
fn rmsnorm_products_match_reference() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let gv = g.kernels().gemv();
    let mut r = rng(0xA0A0);
    let eps = 1e-5f32;
    for &(t, k, n) in &[
        (1usize, 4096usize, 1536usize),
        (2, 576, 77),
        (3, 1032, 640),
        (4, 2048, 1001),
        (5, 8, 9),
        (8, 4096, 512),
        (7, 14336, 64),
    ] {
        // Residual-stream-like rows with different scales, norm weights around 1.
        let mut x = Vec::with_capacity(t * k);
        for a in 0..t {
            let scale = 0.5 + a as f32;
            x.extend(rand_bf16(&mut r, k, -scale, scale));
        }
        let gw = rand_bf16(&mut r, k, 0.5, 1.5);
        let w = rand_bf16(&mut r, 2 * n * k, -0.1, 0.1);
        let xn = rmsnorm_ref(&f(&x), &f(&gw), t, k, eps);
        let (dx, dg, dw) = (up(s, &x), up(s, &gw), up(s, &w));
        // Plain product with the norm prologue, over the first n rows of w.
        let want = reference(&xn, &f(&w[..n * k]), t, k, n);
        let dwn = dw.slice(0..n * k);
        let mut y = poison_bf16(s, t * n + 5);
        gv.rmsnorm_linear(s, &dx, &dg, eps, &dwn, &mut y, dims(t, k, n))
            .unwrap();
        let e1 = assert_close(
            "rmsnorm gemv bf16",
            &check_tail_bf16("rmsnorm gemv", s, &y, t * n),
            &want,
            TOL,
        );
        let mut y32 = poison_f32(s, t * n + 5);
        gv.rmsnorm_linear(s, &dx, &dg, eps, &dwn, &mut y32, dims(t, k, n))
            .unwrap();
        // The tensor-core path (3+ rows) feeds x·g to the mma as bf16, like the unfused path
        // feeds the normalised bf16 activations to cuBLAS: ~1e-3 of the largest output.
        let e2 = assert_close(
            "rmsnorm gemv f32",
            &check_tail_f32("rmsnorm gemv f32", s, &y32, t * n),
            &want,
            3e-3,
        );
        // SwiGLU over [gate | up] = all 2n rows of w.
        let gu = reference(&xn, &f(&w), t, k, 2 * n);
        let mut want_sw = vec![0.0f64; t * n];
        for a in 0..t {
            for j in 0..n {
                let (ga, ub) = (gu[a * 2 * n + j], gu[a * 2 * n + n + j]);
                want_sw[a * n + j] = ga / (1.0 + (-ga).exp()) * ub;
            }
        }
        let mut act = poison_bf16(s, t * n + 5);
        gv.rmsnorm_swiglu(s, &dx, &dg, eps, &dw, &mut act, dims(t, k, n))
            .unwrap();
        let e3 = assert_close(
            "rmsnorm swiglu",
            &check_tail_bf16("rmsnorm swiglu", s, &act, t * n),
            &want_sw,
            TOL,
        );
        println!("rmsnorm products {t}x{k}x{n}: rel err {e1:.2e} / {e2:.2e} / {e3:.2e}");
    }
}

#[test]
fn standalone_module_matches_kernels() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let own = GemvKernels::for_stream(s).unwrap();
    assert_eq!(own.sm_count(), g.kernels().gemv().sm_count());
    let mut r = rng(77);
    let (t, k, n) = (3usize, 512usize, 300usize);
    let x = up(s, &rand_bf16(&mut r, t * k, -1.0, 1.0));
    let w = up(s, &rand_bf16(&mut r, n * k, -0.1, 0.1));
    let mut a = poison_bf16(s, t * n);
    let mut b = poison_bf16(s, t * n);
    own.linear(s, &x, &w, &mut a, dims(t, k, n), false).unwrap();
    g.kernels()
        .gemv()
        .linear(s, &x, &w, &mut b, dims(t, k, n), false)
        .unwrap();
    let (a, b) = (down(s, &a), down(s, &b));
    assert!(a.iter().all(|v| v.is_finite()));
    assert_bits_eq("standalone vs Kernels", &a, &b);
}

#[test]
fn rejects_bad_arguments() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let gv = g.kernels().gemv();
    let x = up(s, &vec![bf16::ONE; 9 * 200]);
    let w = up(s, &vec![bf16::ONE; 64 * 200]);
    let norm = up(s, &vec![bf16::ONE; 200]);
    let mut y = poison_bf16(s, 9 * 64);
    let is_arg = |e: KernelError| {
        assert!(matches!(e, KernelError::InvalidArgument { .. }), "{e}");
        e.to_string()
    };
    // k not a multiple of 8; too many tokens; buffers too short.
    is_arg(
        gv.linear(s, &x, &w, &mut y, dims(1, 100, 64), false)
            .unwrap_err(),
    );
    is_arg(
        gv.linear(s, &x, &w, &mut y, dims(9, 200, 64), false)
            .unwrap_err(),
    );
    is_arg(
        gv.linear(s, &x, &w, &mut y, dims(8, 200, 65), false)
            .unwrap_err(),
    );
    // Misaligned x (one element in).
    let xv = x.slice(1..);
    let m = is_arg(
        gv.linear(s, &xv, &w, &mut y, dims(1, 200, 64), false)
            .unwrap_err(),
    );
    assert!(m.contains("aligned"), "{m}");
    // Launch shapes that are not compiled or not allowed.
    for cfg in [
        GemvConfig {
            rows_per_block: 8,
            threads: 128,
        },
        GemvConfig {
            rows_per_block: 3,
            threads: 128,
        },
        GemvConfig {
            rows_per_block: 2,
            threads: 48,
        },
        GemvConfig {
            rows_per_block: 2,
            threads: 512,
        },
    ] {
        is_arg(
            gv.linear_with(s, &x, &w, &mut y, dims(4, 200, 64), false, cfg)
                .unwrap_err(),
        );
    }
    // Bad eps; short norm weight.
    is_arg(
        gv.rmsnorm_linear(s, &x, &norm, f32::NAN, &w, &mut y, dims(1, 200, 64))
            .unwrap_err(),
    );
    let short = norm.slice(0..100);
    is_arg(
        gv.rmsnorm_linear(s, &x, &short, 1e-5, &w, &mut y, dims(1, 200, 64))
            .unwrap_err(),
    );
    // SwiGLU needs 2·ff weight rows.
    is_arg(
        gv.rmsnorm_swiglu(s, &x, &norm, 1e-5, &w, &mut y, dims(1, 200, 33))
            .unwrap_err(),
    );
    // Nothing was written by any rejected call.
    assert!(down(s, &y).iter().all(|v| v.to_bits() == NAN_BF16));
}

struct KvCase {
    q_heads: usize,
    kv_heads: usize,
    d: usize,
    style: RopeStyle,
    factors: bool,
}

#[test]
fn rope_kv_append_equals_rope_then_append() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let k = g.kernels();
    let mut r = rng(0xB0B);
    for case in [
        KvCase {
            q_heads: 32,
            kv_heads: 8,
            d: 128,
            style: RopeStyle::Normal,
            factors: true,
        },
        KvCase {
            q_heads: 9,
            kv_heads: 3,
            d: 64,
            style: RopeStyle::Neox,
            factors: false,
        },
        KvCase {
            q_heads: 4,
            kv_heads: 2,
            d: 6,
            style: RopeStyle::Normal,
            factors: false,
        },
    ] {
        let (qh, kvh, d) = (case.q_heads, case.kv_heads, case.d);
        let page = 16usize;
        let geom = PageGeometry::new(page, kvh, d).unwrap();
        let (num_seqs, pps) = (3usize, 4usize);
        let num_pages = num_seqs * pps + 1;
        // Tokens: several sequences, one bad sequence id, one position past the table.
        let token_seq: Vec<i32> = vec![0, 1, 2, 1, -1, 0, 2];
        let positions: Vec<i32> = vec![5, 17, 63, 0, 3, 64 * 2, 40];
        let t = token_seq.len();
        let mut table: Vec<i32> = (0..(num_seqs * pps) as i32).collect();
        // Scramble the table (a permutation of pages 1..): pages are not in sequence order.
        let perm = permutation(&mut r, num_seqs * pps);
        for (i, p) in perm.into_iter().enumerate() {
            table[i] = p as i32 + 1;
        }
        let fused = QkvRows::fused(t, qh, kvh, d);
        let qkv = rand_bf16(&mut r, t * fused.row_stride, -2.0, 2.0);
        let pages0 = rand_bf16(&mut r, num_pages * geom.page_elems(), -1.0, 1.0);
        let factors: Vec<f32> = (0..d / 2).map(|_| r.random_range(1.0f32..8.0)).collect();
        let dfactors = up(s, &factors);
        let rope = RopeConfig {
            theta: 500_000.0,
            style: case.style,
            freq_factors: case.factors.then_some(&dfactors),
        };
        let (dpos, dseq, dtable) = (up(s, &positions), up(s, &token_seq), up(s, &table));
        let tl = PageTableLayout {
            num_seqs,
            stride: pps,
        };
        // The composition: one RoPE launch over Q and K (K follows Q), then the append.
        let mut qkv_a = up(s, &qkv);
        let mut pages_a = up(s, &pages0);
        let layout = RopeLayout {
            tokens: t,
            heads: qh + kvh,
            head_dim: d,
            rows: Strided::contiguous(fused.row_stride),
        };
        k.rope(s, &mut qkv_a, &layout, &dpos, &rope).unwrap();
        let src = KvSource {
            tokens: t,
            k: Strided {
                offset: fused.k_offset,
                stride: fused.row_stride,
            },
            v: Strided {
                offset: fused.v_offset,
                stride: fused.row_stride,
            },
        };
        k.kv_append(
            s,
            &mut pages_a,
            &geom,
            &qkv_a,
            &qkv_a,
            &src,
            &dtable,
            &tl,
            &dseq,
            &dpos,
        )
        .unwrap();
        // The fused kernel.
        let mut qkv_b = up(s, &qkv);
        let mut pages_b = up(s, &pages0);
        k.gemv()
            .rope_kv_append(
                s,
                &mut qkv_b,
                &fused,
                &dpos,
                &rope,
                &mut pages_b,
                &geom,
                &dtable,
                &tl,
                &dseq,
            )
            .unwrap();
        let (qa, qb) = (down(s, &qkv_a), down(s, &qkv_b));
        let (pa, pb) = (down(s, &pages_a), down(s, &pages_b));
        assert_bits_eq("rotated qkv", &qb, &qa);
        assert_bits_eq("pages", &pb, &pa);
        // The append happened: valid tokens' slots hold their (rotated) K and V rows.
        let row = kvh * d;
        let mut appended = 0;
        for i in 0..t {
            let (sq, pos) = (token_seq[i], positions[i] as usize);
            if sq < 0 || pos / page >= pps {
                continue;
            }
            let pg = table[sq as usize * pps + pos / page] as usize;
            let slot = pos % page;
            let kdst = (pg * 2 * page + slot) * row;
            let vdst = ((pg * 2 + 1) * page + slot) * row;
            let base = i * fused.row_stride;
            assert_bits_eq(
                "appended K",
                &pb[kdst..kdst + row],
                &qb[base + fused.k_offset..base + fused.k_offset + row],
            );
            assert_bits_eq(
                "appended V",
                &pb[vdst..vdst + row],
                &qkv[base + fused.v_offset..base + fused.v_offset + row],
            );
            appended += 1;
        }
        assert_eq!(appended, 5);
        // And the rotation changed Q (position 5 of token 0 is not the identity).
        assert!(qb[..qh * d].iter().zip(&qkv).any(|(a, b)| a != b));
        println!(
            "rope_kv_append q{qh} kv{kvh} d{d} {:?}: bit-identical",
            case.style
        );
    }
}

#[test]
fn rope_kv_append_other_layouts_and_errors() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let k = g.kernels();
    let mut r = rng(0xC0C);
    let (qh, kvh, d, page) = (4usize, 2usize, 64usize, 8usize);
    let geom = PageGeometry::new(page, kvh, d).unwrap();
    // Row layout [V | pad | K | Q | pad]: nothing follows the fused order.
    let (v_off, k_off, q_off, stride) = (0, kvh * d + 8, 2 * kvh * d + 8, (qh + 2 * kvh) * d + 24);
    let rows = QkvRows {
        tokens: 3,
        q_heads: qh,
        row_stride: stride,
        q_offset: q_off,
        k_offset: k_off,
        v_offset: v_off,
    };
    let qkv = rand_bf16(&mut r, 3 * stride, -1.0, 1.0);
    let pages0 = rand_bf16(&mut r, 4 * geom.page_elems(), -1.0, 1.0);
    let (dpos, dseq) = (up(s, &[1i32, 9, 30]), up(s, &[0i32, 0, 0]));
    let dtable = up(s, &[3i32, 2, 1, 0]);
    let tl = PageTableLayout {
        num_seqs: 1,
        stride: 4,
    };
    let rope = RopeConfig {
        theta: 10_000.0,
        style: RopeStyle::Neox,
        freq_factors: None,
    };
    let mut qkv_a = up(s, &qkv);
    let mut pages_a = up(s, &pages0);
    for (off, heads) in [(q_off, qh), (k_off, kvh)] {
        let layout = RopeLayout {
            tokens: 3,
            heads,
            head_dim: d,
            rows: Strided {
                offset: off,
                stride,
            },
        };
        k.rope(s, &mut qkv_a, &layout, &dpos, &rope).unwrap();
    }
    let src = KvSource {
        tokens: 3,
        k: Strided {
            offset: k_off,
            stride,
        },
        v: Strided {
            offset: v_off,
            stride,
        },
    };
    k.kv_append(
        s,
        &mut pages_a,
        &geom,
        &qkv_a,
        &qkv_a,
        &src,
        &dtable,
        &tl,
        &dseq,
        &dpos,
    )
    .unwrap();
    let mut qkv_b = up(s, &qkv);
    let mut pages_b = up(s, &pages0);
    k.gemv()
        .rope_kv_append(
            s,
            &mut qkv_b,
            &rows,
            &dpos,
            &rope,
            &mut pages_b,
            &geom,
            &dtable,
            &tl,
            &dseq,
        )
        .unwrap();
    assert_bits_eq("qkv", &down(s, &qkv_b), &down(s, &qkv_a));
    let (pa, pb) = (down(s, &pages_a), down(s, &pages_b));
    assert_bits_eq("pages", &pb, &pa);
    assert!(
        pb.iter().zip(&pages0).any(|(a, b)| a != b),
        "nothing appended"
    );
    // Overlapping Q and K; a row stride too small for the heads.
    for bad in [
        QkvRows {
            k_offset: q_off + 8,
            ..rows
        },
        QkvRows {
            row_stride: q_off + qh * d - 1,
            ..rows
        },
    ] {
        let e = k
            .gemv()
            .rope_kv_append(
                s,
                &mut qkv_b,
                &bad,
                &dpos,
                &rope,
                &mut pages_b,
                &geom,
                &dtable,
                &tl,
                &dseq,
            )
            .unwrap_err();
        assert!(matches!(e, KernelError::InvalidArgument { .. }), "{e}");
    }
}

/// Runs a dependent chain of every fused op (norm product → RoPE + KV append → norm SwiGLU →
/// accumulating product → f32 product), `reps` times, and returns (x, logits, pages).
#[allow(clippy::too_many_arguments)]
fn chain(
    gv: &GemvKernels,
    s: &Arc<CudaStream>,
    t: usize,
    host: &ChainInputs,
    graph: bool,
) -> (Vec<bf16>, Vec<f32>, Vec<bf16>) {
    let (h, qh, kvh, d, ff, v) = (512usize, 8usize, 4usize, 64usize, 512usize, 300usize);
    let qkv_w = (qh + 2 * kvh) * d;
    let geom = PageGeometry::new(16, kvh, d).unwrap();
    let mut x = up(s, &host.x[..t * h]);
    let (g1, g2) = (up(s, &host.g1), up(s, &host.g2));
    let (w1, w2, w3, w4) = (
        up(s, &host.w1),
        up(s, &host.w2),
        up(s, &host.w3),
        up(s, &host.w4),
    );
    let mut qkv = poison_bf16(s, t * qkv_w);
    let mut act = poison_bf16(s, t * ff);
    let mut logits = poison_f32(s, t * v);
    let mut pages = up(s, &host.pages);
    let pos = up(s, &(0..t as i32).map(|i| 3 + 5 * i).collect::<Vec<_>>());
    let seq = up(s, &(0..t as i32).collect::<Vec<_>>());
    let table = up(s, &(0..(t * 4) as i32).collect::<Vec<_>>());
    let tl = PageTableLayout {
        num_seqs: t,
        stride: 4,
    };
    let rope = RopeConfig {
        theta: 10_000.0,
        style: RopeStyle::Neox,
        freq_factors: None,
    };
    let rows = QkvRows::fused(t, qh, kvh, d);
    let dd = |i: usize, o: usize| dims(t, i, o);
    let mut run = |x: &mut CudaSlice<bf16>| {
        for _ in 0..3 {
            gv.rmsnorm_linear(s, x, &g1, 1e-5, &w1, &mut qkv, dd(h, qkv_w))
                .unwrap();
            gv.rope_kv_append(
                s, &mut qkv, &rows, &pos, &rope, &mut pages, &geom, &table, &tl, &seq,
            )
            .unwrap();
            gv.rmsnorm_swiglu(s, &qkv, &g2, 1e-5, &w2, &mut act, dd(qkv_w, ff))
                .unwrap();
            gv.linear(s, &act, &w3, x, dd(ff, h), true).unwrap();
        }
        gv.linear(s, x, &w4, &mut logits, dd(h, v), false).unwrap();
    };
    if graph {
        use freekv_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        run(&mut x);
        let gr = s.end_capture(CUgraphInstantiate_flags(0)).unwrap().unwrap();
        gr.launch().unwrap();
        s.synchronize().unwrap();
    } else {
        run(&mut x);
    }
    (down(s, &x), down(s, &logits), down(s, &pages))
}

struct ChainInputs {
    x: Vec<bf16>,
    g1: Vec<bf16>,
    g2: Vec<bf16>,
    w1: Vec<bf16>,
    w2: Vec<bf16>,
    w3: Vec<bf16>,
    w4: Vec<bf16>,
    pages: Vec<bf16>,
}

/// Programmatic dependent launches (eager and captured in a graph) give the same bits as plain
/// launches over a chain where every kernel consumes the previous one's output.
#[test]
fn programmatic_launches_equal_plain_launches() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0xD1D);
    let (h, qkv_w, ff, v) = (512usize, 1024usize, 512usize, 300usize);
    let host = ChainInputs {
        x: rand_bf16(&mut r, 8 * h, -1.0, 1.0),
        g1: rand_bf16(&mut r, h, 0.5, 1.5),
        g2: rand_bf16(&mut r, qkv_w, 0.5, 1.5),
        w1: rand_bf16(&mut r, qkv_w * h, -0.05, 0.05),
        w2: rand_bf16(&mut r, 2 * ff * qkv_w, -0.05, 0.05),
        w3: rand_bf16(&mut r, h * ff, -0.05, 0.05),
        w4: rand_bf16(&mut r, v * h, -0.05, 0.05),
        pages: rand_bf16(
            &mut r,
            8 * 4 * PageGeometry::new(16, 4, 64).unwrap().page_elems(),
            -1.0,
            1.0,
        ),
    };
    let gv = GemvKernels::for_stream(s).unwrap();
    for t in [1usize, 2, 5, 8] {
        gv.set_pdl(false);
        assert!(!gv.pdl());
        let want = chain(&gv, s, t, &host, false);
        assert!(want.1.iter().all(|x| x.is_finite()), "t={t}: logits");
        gv.set_pdl(true);
        for graph in [false, true] {
            let got = chain(&gv, s, t, &host, graph);
            assert_bits_eq(&format!("t={t} graph={graph}: x"), &got.0, &want.0);
            assert_bits_eq(&format!("t={t} graph={graph}: pages"), &got.2, &want.2);
            assert_eq!(
                got.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "t={t} graph={graph}: logits"
            );
        }
        println!("programmatic launches t={t}: bit-identical (eager and graph)");
    }
}
