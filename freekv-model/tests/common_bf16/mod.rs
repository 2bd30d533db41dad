//! Helpers shared by the CUDA decoder tests.
#![allow(dead_code)]

use freekv_model::ggml::GgmlType;
use freekv_model::gguf::{GgufFile, GgufWriter};
use freekv_model::quant::dequantize_to_vec;
use freekv_model::testing::TinyConfig;

/// A copy of `g` whose every tensor is stored as bf16 (round to nearest even from the
/// dequantized values): the weights the CUDA decoder uploads, for the CPU decoder.
pub fn bf16_copy(g: &GgufFile) -> GgufFile {
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata() {
        w.add_meta(k.clone(), v.clone());
    }
    for t in g.tensors() {
        let vals =
            dequantize_to_vec(t.ty, g.tensor_data(t).unwrap(), t.n_elements() as usize).unwrap();
        w.add_tensor_f32(t.name.clone(), &t.dims, GgmlType::BF16, &vals)
            .unwrap();
    }
    GgufFile::from_bytes("bf16-copy.gguf", w.to_bytes().unwrap()).unwrap()
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite value {x}");
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    assert!(den > 0.0, "reference is all zeros");
    (num / den).sqrt()
}

pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Tiny shapes the CUDA kernels support: head dim 64 (GQA 2, tied Q8_0 head, Q8_0 matrices) and
/// 128 (GQA 2, untied Q8_0 head, Q4_1 matrices).
pub fn tiny_configs() -> Vec<(&'static str, TinyConfig)> {
    vec![
        (
            "d64",
            TinyConfig {
                n_layers: 3,
                hidden: 256,
                n_heads: 4,
                n_kv_heads: 2,
                ffn_hidden: 512,
                matrix_type: GgmlType::Q8_0,
                ..TinyConfig::default()
            },
        ),
        (
            "d128",
            TinyConfig {
                n_layers: 2,
                hidden: 256,
                n_heads: 2,
                n_kv_heads: 1,
                ffn_hidden: 384,
                matrix_type: GgmlType::Q4_1,
                tied: false,
                ..TinyConfig::default()
            },
        ),
    ]
}

/// Rounds to the nearest bf16 (ties to even), as the CUDA kernels store every activation.
pub fn r(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

fn dot(w: &[f32], x: &[f32]) -> f32 {
    w.iter()
        .zip(x)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum::<f64>() as f32
}

/// `rows` outputs of `w · x`, each rounded to bf16 (a cuBLAS product with a bf16 output).
fn linear(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len()).map(|row| r(dot(row, x))).collect()
}

fn norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| r(v * inv * g)).collect()
}

/// The CUDA decoder's arithmetic on the CPU: bf16 weights and bf16 storage of every activation
/// at the points where the device kernels store them (residual stream, normed rows, Q/K/V after
/// the product and after RoPE, attention output, every product's output, the SwiGLU output),
/// sums in f64 (the device sums in f32), f32 logits. A slow, independent yardstick: what an
/// exact bf16 implementation of the model computes.
pub struct Bf16Emulator {
    cfg: freekv_model::LlamaConfig,
    embd: Vec<f32>,
    head: Vec<f32>,
    output_norm: Vec<f32>,
    layers: Vec<[Vec<f32>; 9]>,
}

impl Bf16Emulator {
    pub fn new(g: &GgufFile) -> Self {
        let cfg = freekv_model::LlamaConfig::from_gguf(g).unwrap();
        let w = |name: &str| -> Vec<f32> {
            let t = g.tensor(name).unwrap();
            dequantize_to_vec(t.ty, g.tensor_data(t).unwrap(), t.n_elements() as usize)
                .unwrap()
                .into_iter()
                .map(r)
                .collect()
        };
        let embd = w("token_embd.weight");
        let head = if g.tensor("output.weight").is_some() {
            w("output.weight")
        } else {
            embd.clone()
        };
        let layers = (0..cfg.n_layers)
            .map(|l| {
                let n = |s: &str| w(&format!("blk.{l}.{s}.weight"));
                [
                    n("attn_norm"),
                    n("ffn_norm"),
                    n("attn_q"),
                    n("attn_k"),
                    n("attn_v"),
                    n("attn_output"),
                    n("ffn_gate"),
                    n("ffn_up"),
                    n("ffn_down"),
                ]
            })
            .collect();
        Self {
            output_norm: w("output_norm.weight"),
            cfg,
            embd,
            head,
            layers,
        }
    }

    /// Logits (f32) at the positions `at` of `tokens` (causal, positions from 0).
    pub fn logits(&self, tokens: &[u32], at: &[usize]) -> Vec<Vec<f32>> {
        let c = &self.cfg;
        let (h, d) = (c.hidden, c.head_dim);
        let group = c.n_heads / c.n_kv_heads;
        let eps = c.rms_eps;
        let half = d / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| {
                let f = (c.rope_theta as f64).powf(-2.0 * i as f64 / d as f64) as f32;
                let fac = c.rope_freq_factors.as_ref().map_or(1.0, |v| v[i]);
                f / fac
            })
            .collect();
        let rope = |x: &mut [f32], pos: usize| {
            for hd in x.chunks_exact_mut(d) {
                for (i, &f) in inv.iter().enumerate() {
                    let ang = pos as f32 * f;
                    let (s, co) = (ang.sin(), ang.cos());
                    let (a, b) = (hd[2 * i], hd[2 * i + 1]);
                    hd[2 * i] = r(a * co - b * s);
                    hd[2 * i + 1] = r(a * s + b * co);
                }
            }
        };
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| self.embd[t as usize * h..(t as usize + 1) * h].to_vec())
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        for [attn_norm, ffn_norm, wq, wk, wv, wo, gate, up, down] in &self.layers {
            let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
            for (pos, x) in xs.iter().enumerate() {
                let xn = norm(x, attn_norm, eps);
                let mut q = linear(wq, &xn);
                let mut k = linear(wk, &xn);
                rope(&mut q, pos);
                rope(&mut k, pos);
                qs.push(q);
                ks.push(k);
                vs.push(linear(wv, &xn));
            }
            for (pos, x) in xs.iter_mut().enumerate() {
                let mut att = vec![0.0f32; c.n_heads * d];
                for hq in 0..c.n_heads {
                    let kh = hq / group;
                    let q = &qs[pos][hq * d..(hq + 1) * d];
                    let sc: Vec<f64> = (0..=pos)
                        .map(|j| dot(q, &ks[j][kh * d..(kh + 1) * d]) as f64 * scale as f64)
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = sc.iter().map(|s| (s - mx).exp()).collect();
                    let l: f64 = p.iter().sum();
                    for e in 0..d {
                        let acc: f64 = (0..=pos).map(|j| p[j] * vs[j][kh * d + e] as f64).sum();
                        att[hq * d + e] = r((acc / l) as f32);
                    }
                }
                let o = linear(wo, &att);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a = r(*a + b));
                let xn = norm(x, ffn_norm, eps);
                let g = linear(gate, &xn);
                let u = linear(up, &xn);
                let act: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| r(g / (1.0 + (-g).exp()) * u))
                    .collect();
                let dn = linear(down, &act);
                x.iter_mut().zip(&dn).for_each(|(a, b)| *a = r(*a + b));
            }
        }
        at.iter()
            .map(|&i| {
                let xn = norm(&xs[i], &self.output_norm, eps);
                self.head.chunks_exact(h).map(|row| dot(row, &xn)).collect()
            })
            .collect()
    }
}
