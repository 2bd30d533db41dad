//! Llama-family hyperparameters read from GGUF metadata.
//!
//! Keys are `{arch}.…` with `arch = general.architecture` (`llama`, `qwen2`, `mistral`, … — any
//! architecture using llama.cpp's standard key names):
//!
//! | field | key | default |
//! |---|---|---|
//! | `n_layers` | `{arch}.block_count` | required |
//! | `hidden` | `{arch}.embedding_length` | required |
//! | `n_heads` | `{arch}.attention.head_count` | required |
//! | `n_kv_heads` | `{arch}.attention.head_count_kv` | `n_heads` |
//! | `head_dim` | `{arch}.attention.key_length` | `hidden / n_heads` |
//! | `ffn_hidden` | `{arch}.feed_forward_length` | required |
//! | `vocab_size` | `{arch}.vocab_size` | length of `tokenizer.ggml.tokens`, else `token_embd.weight` rows |
//! | `context_length` | `{arch}.context_length` | required |
//! | `rope_theta` | `{arch}.rope.freq_base` | 10000 |
//! | `rope_dim` | `{arch}.rope.dimension_count` | `head_dim` |
//! | `rms_eps` | `{arch}.attention.layer_norm_rms_epsilon` | required |
//!
//! RoPE scaling: the `rope_freqs.weight` tensor (what llama.cpp's converter writes for Llama 3.x)
//! wins; otherwise `{arch}.rope.scaling.type` = `llama3` uses `{arch}.rope.scaling.factor`,
//! `.low_freq_factor` (default 1), `.high_freq_factor` (default 4) and
//! `.original_context_length` (default 8192); `linear` uses a constant factor; `none` or absent
//! means no scaling. Other types (`yarn`, `longrope`) are rejected.
//!
//! ```
//! use freekv_model::config::LlamaConfig;
//! use freekv_model::gguf::{GgufFile, TinyLlamaSpec};
//! let bytes = TinyLlamaSpec::default().writer().unwrap().to_bytes().unwrap();
//! let cfg = LlamaConfig::from_gguf(&GgufFile::from_bytes("tiny.gguf", bytes).unwrap()).unwrap();
//! assert_eq!((cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), (4, 2, 16));
//! assert_eq!(cfg.inv_freqs().len(), 8);
//! ```

use crate::error::ModelError;
use crate::gguf::{GgufFile, MetaValue};

/// Upper bounds that catch corrupt metadata before anything is sized by it.
const MAX_LAYERS: usize = 4096;
const MAX_HIDDEN: usize = 1 << 20;
const MAX_HEADS: usize = 4096;
const MAX_HEAD_DIM: usize = 4096;
const MAX_FFN: usize = 1 << 22;
const MAX_VOCAB: usize = 1 << 24;
const MAX_CONTEXT: usize = 1 << 28;

/// Hyperparameters of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture`.
    pub arch: String,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Model (embedding) width.
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Width of the SwiGLU hidden layer.
    pub ffn_hidden: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Training context length.
    pub context_length: usize,
    /// RoPE base θ.
    pub rope_theta: f32,
    /// Number of rotated dimensions per head (even, ≤ `head_dim`).
    pub rope_dim: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Per-frequency divisors (`rope_dim / 2` of them) for Llama 3 / linear RoPE scaling.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// True when there is no `output.weight`: the LM head is `token_embd.weight`.
    pub tied_embeddings: bool,
}

fn bad(key: &str, msg: impl Into<String>) -> ModelError {
    ModelError::BadMetadata {
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn opt_usize(g: &GgufFile, key: &str, max: usize) -> Result<Option<usize>, ModelError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let n = v.as_u64().ok_or_else(|| match v {
                MetaValue::Array(_) => bad(key, "per-layer values (an array) are not supported"),
                _ => bad(
                    key,
                    format!(
                        "expected a non-negative integer, found {} {v}",
                        v.type_name()
                    ),
                ),
            })?;
            match usize::try_from(n) {
                Ok(n) if n >= 1 && n <= max => Ok(Some(n)),
                _ => Err(bad(key, format!("value {n} is outside 1..={max}"))),
            }
        }
    }
}

fn req_usize(g: &GgufFile, key: &str, max: usize) -> Result<usize, ModelError> {
    opt_usize(g, key, max)?.ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
}

fn opt_f32(g: &GgufFile, key: &str) -> Result<Option<f32>, ModelError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let x = v.as_f64().ok_or_else(|| {
                bad(
                    key,
                    format!("expected a number, found {} {v}", v.type_name()),
                )
            })?;
            let x = x as f32;
            if !x.is_finite() {
                return Err(bad(key, format!("value {x} is not finite")));
            }
            Ok(Some(x))
        }
    }
}

impl LlamaConfig {
    /// Reads and validates the hyperparameters of `g`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let arch_key = "general.architecture";
        let arch = g
            .get(arch_key)
            .ok_or_else(|| ModelError::MissingMetadata(arch_key.to_string()))?
            .as_str()
            .ok_or_else(|| bad(arch_key, "expected a string"))?
            .to_string();
        if arch.is_empty()
            || !arch
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(bad(arch_key, format!("invalid architecture name {arch:?}")));
        }
        let k = |s: &str| format!("{arch}.{s}");

        let n_layers = req_usize(g, &k("block_count"), MAX_LAYERS)?;
        let hidden = req_usize(g, &k("embedding_length"), MAX_HIDDEN)?;
        let n_heads = req_usize(g, &k("attention.head_count"), MAX_HEADS)?;
        let n_kv_heads = opt_usize(g, &k("attention.head_count_kv"), MAX_HEADS)?.unwrap_or(n_heads);
        let ffn_hidden = req_usize(g, &k("feed_forward_length"), MAX_FFN)?;
        let context_length = req_usize(g, &k("context_length"), MAX_CONTEXT)?;

        let head_dim = match opt_usize(g, &k("attention.key_length"), MAX_HEAD_DIM)? {
            Some(d) => d,
            None => {
                if !hidden.is_multiple_of(n_heads) {
                    return Err(bad(
                        &k("attention.head_count"),
                        format!("{n_heads} heads do not divide the embedding length {hidden}"),
                    ));
                }
                hidden / n_heads
            }
        };
        if let Some(vd) = opt_usize(g, &k("attention.value_length"), MAX_HEAD_DIM)?
            && vd != head_dim
        {
            return Err(bad(
                &k("attention.value_length"),
                format!("value head width {vd} differs from key head width {head_dim}"),
            ));
        }
        if !n_heads.is_multiple_of(n_kv_heads) {
            return Err(bad(
                &k("attention.head_count_kv"),
                format!("{n_kv_heads} KV heads do not divide {n_heads} query heads"),
            ));
        }
        if !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
            return Err(bad(
                &k("attention.key_length"),
                format!("head dimension {head_dim} must be even"),
            ));
        }
        let rope_dim = opt_usize(g, &k("rope.dimension_count"), MAX_HEAD_DIM)?.unwrap_or(head_dim);
        if !rope_dim.is_multiple_of(2) || rope_dim > head_dim {
            return Err(bad(
                &k("rope.dimension_count"),
                format!(
                    "{rope_dim} rotated dimensions: must be even and at most the head dimension {head_dim}"
                ),
            ));
        }
        let rope_theta = opt_f32(g, &k("rope.freq_base"))?.unwrap_or(10000.0);
        if rope_theta <= 1.0 {
            return Err(bad(
                &k("rope.freq_base"),
                format!("RoPE base {rope_theta} must be greater than 1"),
            ));
        }
        let eps_key = k("attention.layer_norm_rms_epsilon");
        let rms_eps =
            opt_f32(g, &eps_key)?.ok_or_else(|| ModelError::MissingMetadata(eps_key.clone()))?;
        if !(rms_eps > 0.0 && rms_eps < 1.0) {
            return Err(bad(
                &eps_key,
                format!("epsilon {rms_eps} must be in (0, 1)"),
            ));
        }

        let vocab_size = Self::vocab_size(g, &k("vocab_size"))?;
        let embd_name = "token_embd.weight";
        let embd = g
            .tensor(embd_name)
            .ok_or_else(|| ModelError::MissingTensor(embd_name.to_string()))?;
        if embd.dims != [hidden as u64, vocab_size as u64] {
            return Err(ModelError::Shape(format!(
                "{embd_name} has dims {:?}, expected [{hidden}, {vocab_size}] (embedding length, vocabulary)",
                embd.dims
            )));
        }
        let tied_embeddings = g.tensor("output.weight").is_none();

        let mut cfg = Self {
            arch,
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_hidden,
            vocab_size,
            context_length,
            rope_theta,
            rope_dim,
            rms_eps,
            rope_freq_factors: None,
            tied_embeddings,
        };
        cfg.rope_freq_factors = cfg.read_rope_scaling(g)?;
        Ok(cfg)
    }

    fn vocab_size(g: &GgufFile, key: &str) -> Result<usize, ModelError> {
        if let Some(v) = opt_usize(g, key, MAX_VOCAB)? {
            return Ok(v);
        }
        if let Some(n) = g
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .map(<[_]>::len)
        {
            if n == 0 || n > MAX_VOCAB {
                return Err(bad(
                    "tokenizer.ggml.tokens",
                    format!("{n} tokens is outside 1..={MAX_VOCAB}"),
                ));
            }
            return Ok(n);
        }
        match g
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
        {
            Some(n) if n >= 1 && n <= MAX_VOCAB as u64 => Ok(n as usize),
            Some(n) => Err(ModelError::Shape(format!(
                "token_embd.weight has {n} rows, outside 1..={MAX_VOCAB}"
            ))),
            None => Err(ModelError::MissingMetadata(key.to_string())),
        }
    }

    fn read_rope_scaling(&self, g: &GgufFile) -> Result<Option<Vec<f32>>, ModelError> {
        let n = self.rope_dim / 2;
        if let Some(t) = g.tensor("rope_freqs.weight") {
            if t.n_elements() != n as u64 {
                return Err(ModelError::Shape(format!(
                    "rope_freqs.weight has {} elements, expected rope_dim / 2 = {n}",
                    t.n_elements()
                )));
            }
            let f = g.tensor_f32("rope_freqs.weight")?;
            if let Some(bad_f) = f.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                return Err(ModelError::Shape(format!(
                    "rope_freqs.weight holds the invalid factor {bad_f}"
                )));
            }
            return Ok(Some(f));
        }
        let k = |s: &str| format!("{}.rope.scaling.{s}", self.arch);
        let type_key = k("type");
        let ty = match g.get(&type_key) {
            None => return Ok(None),
            Some(v) => v
                .as_str()
                .ok_or_else(|| bad(&type_key, "expected a string"))?,
        };
        let factor_key = k("factor");
        let factor = || -> Result<f32, ModelError> {
            let f = opt_f32(g, &factor_key)?
                .ok_or_else(|| ModelError::MissingMetadata(factor_key.clone()))?;
            if f < 1.0 {
                return Err(bad(
                    &factor_key,
                    format!("scaling factor {f} must be at least 1"),
                ));
            }
            Ok(f)
        };
        match ty {
            "none" | "" => Ok(None),
            "linear" => {
                let f = factor()?;
                Ok(if f == 1.0 { None } else { Some(vec![f; n]) })
            }
            "llama3" => {
                let factor = factor()?;
                let low = opt_f32(g, &k("low_freq_factor"))?.unwrap_or(1.0);
                let high = opt_f32(g, &k("high_freq_factor"))?.unwrap_or(4.0);
                let orig = opt_f32(g, &k("original_context_length"))?.unwrap_or(8192.0);
                if !(low > 0.0 && high > low && orig > 0.0) {
                    return Err(bad(
                        &k("high_freq_factor"),
                        format!(
                            "llama3 scaling needs 0 < low_freq_factor ({low}) < high_freq_factor ({high}) and original_context_length > 0 ({orig})"
                        ),
                    ));
                }
                Ok(Some(llama3_freq_factors(
                    self.rope_theta,
                    self.rope_dim,
                    factor,
                    low,
                    high,
                    orig,
                )))
            }
            other => Err(bad(
                &type_key,
                format!("RoPE scaling type {other:?} is not supported (only none, linear, llama3)"),
            )),
        }
    }

    /// The `rope_dim / 2` RoPE inverse frequencies `theta^(-2i/rope_dim)`, each divided by its
    /// frequency factor when scaling is present.
    pub fn inv_freqs(&self) -> Vec<f32> {
        let n = self.rope_dim / 2;
        (0..n)
            .map(|i| {
                let f = (self.rope_theta as f64).powf(-2.0 * i as f64 / self.rope_dim as f64);
                let factor = self
                    .rope_freq_factors
                    .as_ref()
                    .and_then(|v| v.get(i))
                    .copied()
                    .unwrap_or(1.0);
                (f / factor as f64) as f32
            })
            .collect()
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// Llama 3 RoPE frequency factors (as in llama.cpp's converter and HF's `_compute_llama3_parameters`):
/// 1 for short wavelengths, `factor` for long ones, a smooth blend in between.
pub fn llama3_freq_factors(
    theta: f32,
    rope_dim: usize,
    factor: f32,
    low: f32,
    high: f32,
    orig_ctx: f32,
) -> Vec<f32> {
    let low_wavelen = orig_ctx as f64 / low as f64;
    let high_wavelen = orig_ctx as f64 / high as f64;
    (0..rope_dim / 2)
        .map(|i| {
            let freq = (theta as f64).powf(-2.0 * i as f64 / rope_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (orig_ctx as f64 / wavelen - low as f64) / (high as f64 - low as f64);
                (1.0 / ((1.0 - smooth) / factor as f64 + smooth)) as f32
            }
        })
        .collect()
}
