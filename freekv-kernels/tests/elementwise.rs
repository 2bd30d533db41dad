//! Embedding, RMSNorm, RoPE, SwiGLU and KV append against scalar CPU references.
#![allow(clippy::needless_range_loop)] // index-based scalar references read like the math

mod common;

use common::*;
use freekv_kernels::half::bf16;
use freekv_kernels::testing::gpu;
use freekv_kernels::{
    KernelError, KvSource, PageTableLayout, RopeConfig, RopeLayout, RopeStyle, Strided,
};
use freekv_layout::PageGeometry;
use rand::Rng;

#[test]
fn embedding_gathers_rows_and_zeroes_bad_ids() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0xE1);
    for &(vocab, dim) in &[(1000usize, 576usize), (49152, 64), (17, 3)] {
        let table = rand_bf16(&mut r, vocab * dim, -1.0, 1.0);
        let mut ids: Vec<u32> = (0..37).map(|_| r.random_range(0..vocab as u32)).collect();
        ids[5] = vocab as u32; // out of range -> zero row
        ids[9] = u32::MAX;
        let d_table = up(s, &table);
        let d_ids = up(s, &ids);
        let mut out = poison_bf16(s, ids.len() * dim);
        g.kernels()
            .embedding(s, &d_table, vocab, dim, &d_ids, &mut out)
            .unwrap();
        let mut out32 = poison_f32(s, ids.len() * dim);
        g.kernels()
            .embedding_f32(s, &d_table, vocab, dim, &d_ids, &mut out32)
            .unwrap();
        let got = down(s, &out);
        let got32 = down(s, &out32);
        let mut want = Vec::with_capacity(ids.len() * dim);
        for &id in &ids {
            if (id as usize) < vocab {
                want.extend_from_slice(&table[id as usize * dim..(id as usize + 1) * dim]);
            } else {
                want.extend(std::iter::repeat_n(bf16::ZERO, dim));
            }
        }
        assert_bits_eq("embedding", &got, &want);
        let want32: Vec<f32> = want.iter().map(|x| x.to_f32()).collect();
        assert_eq!(got32, want32, "embedding_f32");
    }
    // Size errors name the kernel.
    let d_table = up(s, &[bf16::ONE; 10]);
    let d_ids = up(s, &[0u32; 4]);
    let mut out = poison_bf16(s, 4 * 5);
    let e = g
        .kernels()
        .embedding(s, &d_table, 3, 5, &d_ids, &mut out)
        .unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::InvalidArgument {
                kernel: "embedding_bf16",
                ..
            }
        ),
        "{e}"
    );
}

fn rmsnorm_ref(
    x: &[bf16],
    res: Option<&[bf16]>,
    w: &[bf16],
    rows: usize,
    dim: usize,
    eps: f32,
) -> (Vec<bf16>, Vec<f64>) {
    let mut xs = x.to_vec();
    let mut y = vec![0.0f64; rows * dim];
    for r in 0..rows {
        let row = &mut xs[r * dim..(r + 1) * dim];
        if let Some(res) = res {
            for (j, v) in row.iter_mut().enumerate() {
                *v = bf16::from_f32(v.to_f32() + res[r * dim + j].to_f32());
            }
        }
        let ss: f64 = row.iter().map(|v| (v.to_f32() as f64).powi(2)).sum();
        let inv = 1.0 / (ss / dim as f64 + eps as f64).sqrt();
        for j in 0..dim {
            y[r * dim + j] = row[j].to_f32() as f64 * inv * w[j].to_f32() as f64;
        }
    }
    (xs, y)
}

#[test]
fn add_rmsnorm_matches_reference() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0xA2);
    for &(rows, dim) in &[
        (1usize, 576usize),
        (7, 4096),
        (33, 896),
        (3, 8192),
        (2, 100),
    ] {
        let x = rand_bf16(&mut r, rows * dim, -3.0, 3.0);
        let res = rand_bf16(&mut r, rows * dim, -3.0, 3.0);
        let w = rand_bf16(&mut r, dim, 0.5, 1.5);
        let eps = 1e-5;
        let (want_x, want_y) = rmsnorm_ref(&x, Some(&res), &w, rows, dim, eps);
        let mut dx = up(s, &x);
        let dres = up(s, &res);
        let dw = up(s, &w);
        let mut y = poison_bf16(s, rows * dim);
        g.kernels()
            .add_rmsnorm(s, &mut dx, &dres, &dw, &mut y, rows, dim, eps)
            .unwrap();
        assert_bits_eq("add_rmsnorm x", &down(s, &dx), &want_x);
        let rel = assert_close("add_rmsnorm y", &f(&down(s, &y)), &want_y, TOL);
        // Plain RMSNorm (no residual) leaves x alone.
        let (_, want_y2) = rmsnorm_ref(&x, None, &w, rows, dim, eps);
        let dx2 = up(s, &x);
        let mut y2 = poison_bf16(s, rows * dim);
        g.kernels()
            .rmsnorm(s, &dx2, &dw, &mut y2, rows, dim, eps)
            .unwrap();
        assert_bits_eq("rmsnorm x untouched", &down(s, &dx2), &x);
        let rel2 = assert_close("rmsnorm y", &f(&down(s, &y2)), &want_y2, TOL);
        println!("rmsnorm rows={rows} dim={dim}: rel err {rel:.2e} / {rel2:.2e}");
    }
}

#[allow(clippy::too_many_arguments)]
fn rope_ref(
    x: &[bf16],
    tokens: usize,
    heads: usize,
    d: usize,
    rows: Strided,
    pos: &[i32],
    theta: f32,
    style: RopeStyle,
    factors: Option<&[f32]>,
) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|v| v.to_f32() as f64).collect();
    let half = d / 2;
    for t in 0..tokens {
        for h in 0..heads {
            let base = rows.offset + t * rows.stride + h * d;
            for i in 0..half {
                let mut inv = (theta as f64).powf(-2.0 * i as f64 / d as f64) as f32;
                if let Some(fc) = factors {
                    inv /= fc[i];
                }
                let ang = (pos[t] as f32 * inv) as f64;
                let (sn, c) = ang.sin_cos();
                let (a, b) = match style {
                    RopeStyle::Normal => (base + 2 * i, base + 2 * i + 1),
                    RopeStyle::Neox => (base + i, base + i + half),
                };
                let (x0, x1) = (x[a].to_f32() as f64, x[b].to_f32() as f64);
                out[a] = x0 * c - x1 * sn;
                out[b] = x0 * sn + x1 * c;
            }
        }
    }
    out
}

#[test]
fn rope_both_styles_any_even_dim() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0x20BE);
    // (tokens, heads, head_dim, extra columns around the heads, with factors)
    let cases = [
        (5usize, 9usize, 64usize, 0usize, false),
        (40, 32, 128, 0, true),
        (3, 3, 2, 0, false),
        (17, 4, 96, 40, true),
        (8, 2, 256, 16, false),
    ];
    for (ci, &(tokens, heads, d, extra, with_f)) in cases.iter().enumerate() {
        for style in [RopeStyle::Normal, RopeStyle::Neox] {
            let offset = extra / 2;
            let rows = Strided {
                offset,
                stride: heads * d + extra,
            };
            let len = offset + (tokens - 1) * rows.stride + heads * d + (extra - offset);
            let x = rand_bf16(&mut r, len, -2.0, 2.0);
            let pos: Vec<i32> = (0..tokens)
                .map(|i| if i == 0 { 0 } else { r.random_range(0..40_000) })
                .collect();
            let factors: Option<Vec<f32>> =
                with_f.then(|| (0..d / 2).map(|_| r.random_range(1.0f32..8.0)).collect());
            let theta = if ci % 2 == 0 { 10_000.0 } else { 500_000.0 };
            let want = rope_ref(
                &x,
                tokens,
                heads,
                d,
                rows,
                &pos,
                theta,
                style,
                factors.as_deref(),
            );
            let mut dx = up(s, &x);
            let dpos = up(s, &pos);
            let dfac = factors.as_ref().map(|f| up(s, f));
            let layout = RopeLayout {
                tokens,
                heads,
                head_dim: d,
                rows,
            };
            let cfg = RopeConfig {
                theta,
                style,
                freq_factors: dfac.as_ref(),
            };
            g.kernels().rope(s, &mut dx, &layout, &dpos, &cfg).unwrap();
            let got = down(s, &dx);
            let rel = assert_close(&format!("rope {style:?} d={d}"), &f(&got), &want, TOL);
            // Columns outside the heads are untouched.
            for t in 0..tokens {
                let row0 = t * rows.stride;
                for j in (0..offset).chain(offset + heads * d..rows.stride) {
                    if row0 + j < len {
                        assert_eq!(
                            got[row0 + j].to_bits(),
                            x[row0 + j].to_bits(),
                            "rope touched column {j}"
                        );
                    }
                }
            }
            println!("rope {style:?} tokens={tokens} heads={heads} d={d}: rel err {rel:.2e}");
        }
    }
    let mut dx = up(s, &[bf16::ONE; 30]);
    let dpos = up(s, &[0i32; 2]);
    let bad = RopeLayout {
        tokens: 2,
        heads: 1,
        head_dim: 15,
        rows: Strided::contiguous(15),
    };
    let cfg = RopeConfig {
        theta: 1e4,
        style: RopeStyle::Normal,
        freq_factors: None,
    };
    let e = g.kernels().rope(s, &mut dx, &bad, &dpos, &cfg).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::InvalidArgument {
                kernel: "rope_bf16",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn swiglu_split_and_fused() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0x5C1);
    for &(rows, cols) in &[(1usize, 1536usize), (9, 14336), (64, 100)] {
        let gate = rand_bf16(&mut r, rows * cols, -6.0, 6.0);
        let upv = rand_bf16(&mut r, rows * cols, -2.0, 2.0);
        let want: Vec<f64> = gate
            .iter()
            .zip(&upv)
            .map(|(g, u)| {
                let g = g.to_f32() as f64;
                g / (1.0 + (-g).exp()) * u.to_f32() as f64
            })
            .collect();
        let (dg, du) = (up(s, &gate), up(s, &upv));
        let mut out = poison_bf16(s, rows * cols);
        g.kernels()
            .swiglu(s, &dg, &du, &mut out, rows, cols)
            .unwrap();
        let rel = assert_close("swiglu", &f(&down(s, &out)), &want, TOL);
        let mut fused = Vec::with_capacity(2 * rows * cols);
        for i in 0..rows {
            fused.extend_from_slice(&gate[i * cols..(i + 1) * cols]);
            fused.extend_from_slice(&upv[i * cols..(i + 1) * cols]);
        }
        let dfused = up(s, &fused);
        let mut out2 = poison_bf16(s, rows * cols);
        g.kernels()
            .swiglu_fused(s, &dfused, &mut out2, rows, cols)
            .unwrap();
        assert_bits_eq("swiglu fused == split", &down(s, &out2), &down(s, &out));
        println!("swiglu rows={rows} cols={cols}: rel err {rel:.2e}");
    }
}

#[test]
fn kv_append_writes_nhd_pages_through_page_tables() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(0x4A99);
    for &(page_size, kv_heads, d) in &[(16usize, 8usize, 128usize), (32, 3, 64), (16, 1, 64)] {
        let geom = PageGeometry::new(page_size, kv_heads, d).unwrap();
        let row = kv_heads * d;
        // Ragged sequences: existing lengths and new tokens per sequence.
        let old_lens = [0usize, 5, 31, 100];
        let new_lens = [7usize, 1, 40, 3];
        let nseq = old_lens.len();
        let stride = 8usize;
        let num_pages = nseq * stride + 3;
        let perm = permutation(&mut r, num_pages);
        let table: Vec<i32> = (0..nseq * stride).map(|i| perm[i] as i32).collect();
        let mut tok_seq = Vec::new();
        let mut pos = Vec::new();
        for b in 0..nseq {
            for i in 0..new_lens[b] {
                tok_seq.push(b as i32);
                pos.push((old_lens[b] + i) as i32);
            }
        }
        // Two tokens that must be skipped: bad sequence and a position beyond the table.
        tok_seq.push(nseq as i32);
        pos.push(0);
        tok_seq.push(0);
        pos.push((stride * page_size) as i32);
        let tokens = tok_seq.len();
        // Fused [k | v | pad] source rows.
        let src_stride = 2 * row + 8;
        let src = rand_bf16(&mut r, tokens * src_stride, -1.0, 1.0);
        let pool0 = rand_bf16(&mut r, num_pages * geom.page_elems(), -1.0, 1.0);
        let mut want = pool0.clone();
        for t in 0..tokens {
            let b = tok_seq[t] as usize;
            let p = pos[t] as usize;
            if b >= nseq || p / page_size >= stride {
                continue;
            }
            let page = table[b * stride + p / page_size] as usize;
            let base = page * geom.page_elems();
            for h in 0..kv_heads {
                for j in 0..d {
                    want[base + geom.nhd_index(0, p % page_size, h, j)] =
                        src[t * src_stride + h * d + j];
                    want[base + geom.nhd_index(1, p % page_size, h, j)] =
                        src[t * src_stride + row + h * d + j];
                }
            }
        }
        let mut dpool = up(s, &pool0);
        let dsrc = up(s, &src);
        let (dtab, dseq, dpos) = (up(s, &table), up(s, &tok_seq), up(s, &pos));
        let ksrc = KvSource {
            tokens,
            k: Strided {
                offset: 0,
                stride: src_stride,
            },
            v: Strided {
                offset: row,
                stride: src_stride,
            },
        };
        let tl = PageTableLayout {
            num_seqs: nseq,
            stride,
        };
        g.kernels()
            .kv_append(
                s, &mut dpool, &geom, &dsrc, &dsrc, &ksrc, &dtab, &tl, &dseq, &dpos,
            )
            .unwrap();
        assert_bits_eq(
            &format!("kv_append P={page_size} Hkv={kv_heads} d={d}"),
            &down(s, &dpool),
            &want,
        );
    }
}
