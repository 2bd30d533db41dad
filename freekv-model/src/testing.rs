//! Helpers for tests across the workspace (and for the CLI's model lookup): where the default
//! model and the reference outputs live, a tiny random Llama GGUF built in memory, a `.npy`
//! reader, and a naive `f64` reference forward pass.
//!
//! ```
//! use freekv_model::testing::{TinyConfig, ReferenceLlama, tiny_random_model};
//! let g = tiny_random_model(7, &TinyConfig::default()).unwrap();
//! let r = ReferenceLlama::new(&g).unwrap();
//! let logits = r.forward(&[5, 6, 7]).unwrap();
//! assert_eq!(logits.len(), 3);
//! assert_eq!(logits[0].len(), r.config().vocab_size);
//! ```

use std::path::{Path, PathBuf};

use crate::ModelError;
use crate::config::LlamaConfig;
use crate::ggml::GgmlType;
use crate::gguf::{GgufFile, GgufWriter, MetaValue};
use crate::sampling::Rng;
use crate::tokenizer::{byte_to_char, token_type};

pub use crate::paths::{
    DEFAULT_MODEL_FILE, HOME_ENV, MODEL_ENV, default_model_location, default_model_path,
    freekv_home,
};

/// The reference outputs directory `<manifest_dir>/../../shared/reference`, if present. Pass the
/// crate's `CARGO_MANIFEST_DIR`, or use the [`reference_dir!`](crate::reference_dir) macro.
pub fn reference_dir(manifest_dir: impl AsRef<Path>) -> Option<PathBuf> {
    let d = manifest_dir
        .as_ref()
        .join("..")
        .join("..")
        .join("shared")
        .join("reference");
    d.is_dir().then_some(d)
}

/// [`testing::reference_dir`](crate::testing::reference_dir) for the calling crate (expands
/// `env!("CARGO_MANIFEST_DIR")` at the call site).
#[macro_export]
macro_rules! reference_dir {
    () => {
        $crate::testing::reference_dir(env!("CARGO_MANIFEST_DIR"))
    };
}

/// Reads a `.npy` file holding a 1-D little-endian `float32` array (`<f4`, C order).
pub fn read_npy_f32(path: impl AsRef<Path>) -> Result<Vec<f32>, ModelError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse_npy_f32(&bytes).map_err(|msg| ModelError::Gguf {
        path: path.display().to_string(),
        msg,
    })
}

/// Parses the bytes of a 1-D `<f4` `.npy` file.
pub fn parse_npy_f32(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let major = bytes[6];
    let (hlen, hstart) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            let b = bytes.get(8..12).ok_or("truncated .npy header")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => return Err(format!(".npy version {v} is not supported")),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| ".npy header is not text")?;
    let compact: String = header.chars().filter(|c| !c.is_whitespace()).collect();
    if !compact.contains("'descr':'<f4'") {
        return Err(format!("only little-endian float32 is supported: {header}"));
    }
    if !compact.contains("'fortran_order':False") {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape = compact
        .split("'shape':(")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or("no shape in .npy header")?;
    let dims: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape {shape}")))
        .collect::<Result<_, _>>()?;
    let [n] = dims.as_slice() else {
        return Err(format!("expected a 1-D array, shape ({shape})"));
    };
    let data = &bytes[hstart + hlen..];
    if data.len() != n * 4 {
        return Err(format!(
            "{n} float32 need {} bytes, file has {}",
            n * 4,
            data.len()
        ));
    }
    Ok(data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The shape and encodings of a [`tiny_random_model`].
#[derive(Debug, Clone, PartialEq)]
pub struct TinyConfig {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Model width (a multiple of 32).
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// SwiGLU width (a multiple of 32).
    pub ffn_hidden: usize,
    /// Context length written in the metadata.
    pub context_length: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// Encoding of the seven matrices of each block.
    pub matrix_type: GgmlType,
    /// Encoding of `token_embd.weight`.
    pub embd_type: GgmlType,
    /// Tie the output head to the embedding (no `output.weight`).
    pub tied: bool,
}

impl Default for TinyConfig {
    /// 2 layers, width 64, 4 query heads and 2 KV heads of 16, FFN 128, context 512, Q4_1
    /// matrices, a Q8_0 tied embedding: the default model's layout in miniature.
    fn default() -> Self {
        Self {
            n_layers: 2,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_hidden: 128,
            context_length: 512,
            rope_theta: 10000.0,
            matrix_type: GgmlType::Q4_1,
            embd_type: GgmlType::Q8_0,
            tied: true,
        }
    }
}

/// Special tokens of the tiny vocabulary (ids 0, 1, 2 as in SmolLM2).
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges of the tiny vocabulary, in rank order (byte-level alphabet: `Ġ` is a space).
const TINY_MERGES: [(&str, &str); 41] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("i", "n"),
    ("Ġ", "a"),
    ("e", "r"),
    ("o", "n"),
    ("Ġt", "he"),
    ("r", "e"),
    ("a", "t"),
    ("e", "n"),
    ("Ġ", "s"),
    ("o", "r"),
    ("Ġ", "w"),
    ("e", "s"),
    ("Ġ", "o"),
    ("i", "s"),
    ("a", "n"),
    ("Ġ", "c"),
    ("Ġ", "b"),
    ("Ġ", "f"),
    ("i", "t"),
    ("e", "d"),
    ("Ġ", "p"),
    ("a", "l"),
    ("a", "r"),
    ("Ġ", "m"),
    ("in", "g"),
    ("Ġ", "d"),
    ("o", "u"),
    ("l", "e"),
    ("Ġ", "h"),
    ("n", "d"),
    ("Ġa", "nd"),
    ("Ġ", "i"),
    ("Ġo", "f"),
    ("Ġt", "o"),
    ("s", "t"),
    ("l", "l"),
    ("Ġ", "l"),
    ("Ġc", "a"),
    ("Ġ", "P"),
];

/// Vocabulary size of [`tiny_random_model`]: 3 specials, 256 bytes, 41 merges.
pub const TINY_VOCAB: usize = 3 + 256 + TINY_MERGES.len();

const TINY_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a tiny random model<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

fn u32_meta(n: usize) -> Result<MetaValue, ModelError> {
    u32::try_from(n)
        .map(MetaValue::U32)
        .map_err(|_| ModelError::Config(format!("{n} does not fit a u32")))
}

/// A small random Llama model with a working byte-level BPE tokenizer (`gpt2`/`smollm`, the
/// [`TINY_VOCAB`] tokens) and a ChatML template, as an in-memory GGUF file. Weights are uniform
/// random (seeded), scaled so that activations stay of order one; norms are near 1.
pub fn tiny_random_model(seed: u64, cfg: &TinyConfig) -> Result<GgufFile, ModelError> {
    let bytes = tiny_random_model_bytes(seed, cfg)?;
    GgufFile::from_bytes("tiny-random.gguf", bytes)
}

/// The GGUF bytes of [`tiny_random_model`] (to write to a file).
pub fn tiny_random_model_bytes(seed: u64, cfg: &TinyConfig) -> Result<Vec<u8>, ModelError> {
    tiny_random_model_writer(seed, cfg)?.to_bytes()
}

/// The writer holding [`tiny_random_model`], for tests that change metadata before writing.
pub fn tiny_random_model_writer(seed: u64, cfg: &TinyConfig) -> Result<GgufWriter, ModelError> {
    if cfg.n_heads == 0 || cfg.n_kv_heads == 0 || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads) {
        return Err(ModelError::Config(format!(
            "tiny model: {} heads, {} KV heads",
            cfg.n_heads, cfg.n_kv_heads
        )));
    }
    if !cfg.hidden.is_multiple_of(cfg.n_heads) || !(cfg.hidden / cfg.n_heads).is_multiple_of(2) {
        return Err(ModelError::Config(format!(
            "tiny model: width {} is not an even head size times {} heads",
            cfg.hidden, cfg.n_heads
        )));
    }
    let head_dim = cfg.hidden / cfg.n_heads;
    let kv_dim = head_dim * cfg.n_kv_heads;
    let mut rng = Rng::new(seed);
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", MetaValue::String("llama".into()))
        .add_meta("general.name", MetaValue::String("tiny-random".into()))
        .add_meta("llama.block_count", u32_meta(cfg.n_layers)?)
        .add_meta("llama.embedding_length", u32_meta(cfg.hidden)?)
        .add_meta("llama.feed_forward_length", u32_meta(cfg.ffn_hidden)?)
        .add_meta("llama.attention.head_count", u32_meta(cfg.n_heads)?)
        .add_meta("llama.attention.head_count_kv", u32_meta(cfg.n_kv_heads)?)
        .add_meta("llama.rope.dimension_count", u32_meta(head_dim)?)
        .add_meta("llama.rope.freq_base", MetaValue::F32(cfg.rope_theta))
        .add_meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        )
        .add_meta("llama.context_length", u32_meta(cfg.context_length)?)
        .add_meta("llama.vocab_size", u32_meta(TINY_VOCAB)?);

    // Tokenizer.
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![token_type::CONTROL; TINY_SPECIALS.len()];
    for b in 0..=255u8 {
        tokens.push(byte_to_char(b).to_string());
        types.push(token_type::NORMAL);
    }
    let mut merges = Vec::new();
    for (l, r) in TINY_MERGES {
        tokens.push(format!("{l}{r}"));
        types.push(token_type::NORMAL);
        merges.push(MetaValue::String(format!("{l} {r}")));
    }
    w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .add_meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
        .add_meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()),
        )
        .add_meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
        )
        .add_meta("tokenizer.ggml.merges", MetaValue::Array(merges))
        .add_meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
        .add_meta("tokenizer.ggml.padding_token_id", MetaValue::U32(2))
        .add_meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false))
        .add_meta(
            "tokenizer.chat_template",
            MetaValue::String(TINY_CHAT_TEMPLATE.into()),
        );

    // Weights: `rows × cols` matrices stored with dims [cols, rows].
    let matrix = |rng: &mut Rng, rows: usize, cols: usize, amp: f32| -> Vec<f32> {
        (0..rows * cols).map(|_| rng.uniform(-amp, amp)).collect()
    };
    let unit = |cols: usize| (3.0 / cols as f32).sqrt();
    let norm = |rng: &mut Rng, n: usize| -> Vec<f32> {
        (0..n).map(|_| 1.0 + rng.uniform(-0.2, 0.2)).collect()
    };
    let (h, ff) = (cfg.hidden, cfg.ffn_hidden);
    let embd = matrix(&mut rng, TINY_VOCAB, h, 0.3);
    w.add_tensor_f32(
        "token_embd.weight",
        &[h as u64, TINY_VOCAB as u64],
        cfg.embd_type,
        &embd,
    )?;
    for l in 0..cfg.n_layers {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let an = norm(&mut rng, h);
        w.add_tensor_f32(n("attn_norm"), &[h as u64], GgmlType::F32, &an)?;
        // Larger query/key weights give peaked attention, which tests the softmax harder.
        for (name, rows, cols, amp) in [
            ("attn_q", h, h, 2.0 * unit(h)),
            ("attn_k", kv_dim, h, 2.0 * unit(h)),
            ("attn_v", kv_dim, h, unit(h)),
            ("attn_output", h, h, unit(h)),
            ("ffn_gate", ff, h, unit(h)),
            ("ffn_up", ff, h, unit(h)),
            ("ffn_down", h, ff, unit(ff)),
        ] {
            let m = matrix(&mut rng, rows, cols, amp);
            w.add_tensor_f32(n(name), &[cols as u64, rows as u64], cfg.matrix_type, &m)?;
        }
        let fnorm = norm(&mut rng, h);
        w.add_tensor_f32(n("ffn_norm"), &[h as u64], GgmlType::F32, &fnorm)?;
    }
    let on = norm(&mut rng, h);
    w.add_tensor_f32("output_norm.weight", &[h as u64], GgmlType::F32, &on)?;
    if !cfg.tied {
        let out = matrix(&mut rng, TINY_VOCAB, h, unit(h));
        w.add_tensor_f32(
            "output.weight",
            &[h as u64, TINY_VOCAB as u64],
            cfg.matrix_type,
            &out,
        )?;
    }
    Ok(w)
}

/// One block of [`ReferenceLlama`], weights dequantized to `f64`, matrices row-major.
#[derive(Debug, Clone)]
struct RefLayer {
    attn_norm: Vec<f64>,
    ffn_norm: Vec<f64>,
    wq: Vec<f64>,
    wk: Vec<f64>,
    wv: Vec<f64>,
    wo: Vec<f64>,
    gate: Vec<f64>,
    up: Vec<f64>,
    down: Vec<f64>,
}

/// A naive, independent `f64` Llama forward pass over the dequantized weights of a GGUF file:
/// the yardstick for the fast decoder on small models (it holds every weight as `f64`).
#[derive(Debug, Clone)]
pub struct ReferenceLlama {
    cfg: LlamaConfig,
    embd: Vec<f64>,
    head: Vec<f64>,
    output_norm: Vec<f64>,
    layers: Vec<RefLayer>,
}

fn f64s(g: &GgufFile, name: &str) -> Result<Vec<f64>, ModelError> {
    Ok(g.tensor_f32(name)?.into_iter().map(f64::from).collect())
}

/// `y = W x` for a row-major `rows × x.len()` matrix.
fn matvec64(w: &[f64], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms_norm64(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * inv * g).collect()
}

impl ReferenceLlama {
    /// Dequantizes every weight of `g`.
    pub fn new(g: &GgufFile) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(g)?;
        let embd = f64s(g, "token_embd.weight")?;
        let head = if g.tensor("output.weight").is_some() {
            f64s(g, "output.weight")?
        } else {
            embd.clone()
        };
        let mut layers = Vec::new();
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(RefLayer {
                attn_norm: f64s(g, &n("attn_norm"))?,
                ffn_norm: f64s(g, &n("ffn_norm"))?,
                wq: f64s(g, &n("attn_q"))?,
                wk: f64s(g, &n("attn_k"))?,
                wv: f64s(g, &n("attn_v"))?,
                wo: f64s(g, &n("attn_output"))?,
                gate: f64s(g, &n("ffn_gate"))?,
                up: f64s(g, &n("ffn_up"))?,
                down: f64s(g, &n("ffn_down"))?,
            });
        }
        Ok(Self {
            output_norm: f64s(g, "output_norm.weight")?,
            cfg,
            embd,
            head,
            layers,
        })
    }

    /// Hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Logits at every position of `tokens` (causal attention over the prefix, positions from 0).
    pub fn forward(&self, tokens: &[u32]) -> Result<Vec<Vec<f64>>, ModelError> {
        let c = &self.cfg;
        let (h, d) = (c.hidden, c.head_dim);
        let g = c.n_heads / c.n_kv_heads;
        let eps = c.rms_eps as f64;
        let inv: Vec<f64> = c.inv_freqs().into_iter().map(f64::from).collect();
        let rope = |x: &mut [f64], pos: usize| {
            for head in x.chunks_exact_mut(d) {
                for (i, &f) in inv.iter().enumerate() {
                    let (s, co) = (pos as f64 * f).sin_cos();
                    let (a, b) = (head[2 * i], head[2 * i + 1]);
                    head[2 * i] = a * co - b * s;
                    head[2 * i + 1] = a * s + b * co;
                }
            }
        };
        let mut xs: Vec<Vec<f64>> = Vec::with_capacity(tokens.len());
        for &t in tokens {
            let t = t as usize;
            let row = self.embd.get(t * h..(t + 1) * h).ok_or_else(|| {
                ModelError::Prompt(format!("token id {t} outside the vocabulary"))
            })?;
            xs.push(row.to_vec());
        }
        for layer in &self.layers {
            let mut qs = Vec::new();
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let xn = rms_norm64(x, &layer.attn_norm, eps);
                let mut q = matvec64(&layer.wq, &xn);
                let mut k = matvec64(&layer.wk, &xn);
                rope(&mut q, pos);
                rope(&mut k, pos);
                qs.push(q);
                ks.push(k);
                vs.push(matvec64(&layer.wv, &xn));
            }
            for (pos, x) in xs.iter_mut().enumerate() {
                let mut att = vec![0.0; c.n_heads * d];
                for hd in 0..c.n_heads {
                    let kh = hd / g;
                    let q = &qs[pos][hd * d..(hd + 1) * d];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|j| {
                            let k = &ks[j][kh * d..(kh + 1) * d];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()
                        })
                        .collect();
                    let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
                    let l: f64 = p.iter().sum();
                    for (j, pj) in p.iter().enumerate() {
                        let v = &vs[j][kh * d..(kh + 1) * d];
                        for (o, vv) in att[hd * d..(hd + 1) * d].iter_mut().zip(v) {
                            *o += pj / l * vv;
                        }
                    }
                }
                let o = matvec64(&layer.wo, &att);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let xn = rms_norm64(x, &layer.ffn_norm, eps);
                let gt = matvec64(&layer.gate, &xn);
                let up = matvec64(&layer.up, &xn);
                let act: Vec<f64> = gt
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let dn = matvec64(&layer.down, &act);
                x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
            }
        }
        Ok(xs
            .iter()
            .map(|x| matvec64(&self.head, &rms_norm64(x, &self.output_norm, eps)))
            .collect())
    }
}

/// Relative L2 error `‖a − b‖ / ‖b‖`.
pub fn rel_l2(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }";
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        bytes.extend_from_slice(&(h.len() as u16).to_le_bytes());
        bytes.extend_from_slice(h.as_bytes());
        for x in [1.5f32, -2.0, 3.25] {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(parse_npy_f32(&bytes).unwrap(), vec![1.5, -2.0, 3.25]);
        assert!(parse_npy_f32(&bytes[..bytes.len() - 1]).is_err());
        assert!(parse_npy_f32(b"nope").is_err());
        let f8 = String::from_utf8_lossy(&bytes).replace("<f4", "<f8");
        assert!(parse_npy_f32(f8.as_bytes()).is_err());
    }

    #[test]
    fn tiny_model_is_deterministic_and_valid() {
        let a = tiny_random_model_bytes(1, &TinyConfig::default()).unwrap();
        let b = tiny_random_model_bytes(1, &TinyConfig::default()).unwrap();
        let c = tiny_random_model_bytes(2, &TinyConfig::default()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let g = GgufFile::from_bytes("t", a).unwrap();
        let cfg = LlamaConfig::from_gguf(&g).unwrap();
        assert_eq!(cfg.vocab_size, TINY_VOCAB);
        assert_eq!(cfg.head_dim, 16);
        assert!(cfg.tied_embeddings);
        let tok = crate::tokenizer::Tokenizer::from_gguf(&g).unwrap();
        let ids = tok.encode("the cat and the hat", false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), "the cat and the hat");
        assert!(ids.len() < "the cat and the hat".len(), "merges apply");
        assert!(tok.is_eog(2));
        let bad = TinyConfig {
            n_kv_heads: 3,
            ..TinyConfig::default()
        };
        assert!(tiny_random_model(1, &bad).is_err());
    }

    #[test]
    fn locations_follow_the_environment_rules() {
        // Only checks the pure path logic on the current environment (no variables are set
        // here, to keep tests independent of each other).
        if let Some(loc) = default_model_location()
            && std::env::var_os(MODEL_ENV).is_none()
        {
            assert!(loc.ends_with(Path::new("models").join(DEFAULT_MODEL_FILE)));
        }
        assert!(reference_dir("/nonexistent/x/y").is_none());
    }
}
