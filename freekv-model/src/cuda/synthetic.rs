//! Synthetic models: the shapes of real models with seeded random bf16 weights generated on the
//! device, for speed work where the real weights are not at hand. Their outputs are meaningless
//! text; every figure measured on them must be labelled *synthetic*.
//!
//! A step costs the same whatever the weights hold, except for what depends on the queries:
//! how often FreeKV corrects and how much of a selection changes per step. Plain random weights
//! make consecutive queries unrelated (the worst case). `NAME+persistent=S` draws the same
//! shape with a **persistent residual component**: every token's embedding row shares
//! [`PERSISTENT_DIMS`] dimensions of one large value (the "massive activations" of trained
//! models), holding the fraction `S` of the row's energy, and the embedding is scaled so that
//! it dominates the residual stream through all layers. Consecutive queries of a head then have a
//! cosine similarity that grows with `S` (a sweep of `S` maps query coherence to step time); all
//! other weights are as in the plain model.

use crate::ModelError;
use crate::config::{LlamaConfig, llama3_freq_factors};

/// Prefix of a synthetic model name on the command line: `--model synthetic:llama-3.1-8b`.
pub const SYNTHETIC_PREFIX: &str = "synthetic:";

/// The synthetic shapes offered, as `(name, description)`.
pub const SYNTHETIC_MODELS: [(&str, &str); 3] = [
    (
        "llama-3.1-8b",
        "Llama 3.1 8B shape: 32 layers, hidden 4096, 32/8 heads of 128, FFN 14336, vocab 128256",
    ),
    (
        "qwen-2.5-7b",
        "Qwen 2.5 7B shape: 28 layers, hidden 3584, 28/4 heads of 128, FFN 18944, vocab 152064 (no QKV bias)",
    ),
    (
        "smollm2-135m",
        "SmolLM2 135M shape: 30 layers, hidden 576, 9/3 heads of 64, FFN 1536, vocab 49152, tied head",
    ),
];

/// Dimensions of the embedding that hold the persistent component of `+persistent=S`.
pub const PERSISTENT_DIMS: usize = 4;

/// Standard deviation of the per-token part of the embedding of a `+persistent=S` model (large
/// against what the layers add to the residual, a few units per element per layer).
pub const PERSISTENT_EMBD_STD: f32 = 32.0;

/// Largest persistent share accepted.
pub const MAX_PERSISTENT_SHARE: f32 = 0.999;

/// A parsed synthetic model name: `SHAPE` or `SHAPE+persistent=S`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// One of [`SYNTHETIC_MODELS`].
    pub shape: String,
    /// Share of the embedding energy common to every token, in `[0, MAX_PERSISTENT_SHARE]` (0:
    /// plain random weights).
    pub persistent: f32,
}

impl SyntheticSpec {
    /// Parses `SHAPE` or `SHAPE+persistent=S` (the part after `synthetic:`).
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        let mut parts = name.split('+');
        let shape = parts.next().unwrap_or_default().trim().to_string();
        let mut persistent = 0.0f32;
        for opt in parts {
            match opt.split_once('=') {
                Some(("persistent", v)) => {
                    persistent = v
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|s| (0.0..=MAX_PERSISTENT_SHARE).contains(s))
                        .ok_or_else(|| {
                            ModelError::Config(format!(
                                "synthetic model {name:?}: persistent={v:?} must be a number in \
                                 [0, {MAX_PERSISTENT_SHARE}]"
                            ))
                        })?;
                }
                _ => {
                    return Err(ModelError::Config(format!(
                        "synthetic model {name:?}: unknown option {opt:?} (known: persistent=S)"
                    )));
                }
            }
        }
        synthetic_config(&shape)?;
        Ok(Self { shape, persistent })
    }

    /// The value of the [`PERSISTENT_DIMS`] shared embedding dimensions for hidden size
    /// `hidden`: `std · sqrt(hidden · S / (dims · (1 − S)))`, so that they hold the share `S` of
    /// a row's energy (`None` for a plain model).
    pub fn persistent_value(&self, hidden: usize) -> Option<f32> {
        (self.persistent > 0.0).then(|| {
            let s = self.persistent as f64;
            (PERSISTENT_EMBD_STD as f64
                * (hidden as f64 * s / (PERSISTENT_DIMS as f64 * (1.0 - s))).sqrt())
                as f32
        })
    }
}

/// The name after `synthetic:` when `model` names a synthetic model, else `None`.
pub fn synthetic_name(model: &str) -> Option<&str> {
    model.strip_prefix(SYNTHETIC_PREFIX)
}

/// The hyperparameters of synthetic model `name` (one of [`SYNTHETIC_MODELS`], optionally with
/// options as in [`SyntheticSpec::parse`]).
pub fn synthetic_config(name: &str) -> Result<LlamaConfig, ModelError> {
    if let Some((shape, _)) = name.split_once('+') {
        return SyntheticSpec::parse(name).and_then(|_| synthetic_config(shape));
    }
    #[allow(clippy::too_many_arguments)]
    fn cfg(
        arch: &str,
        n_layers: usize,
        hidden: usize,
        n_heads: usize,
        n_kv_heads: usize,
        ffn_hidden: usize,
        vocab_size: usize,
        context_length: usize,
        rope_theta: f32,
        rms_eps: f32,
        tied: bool,
    ) -> LlamaConfig {
        let head_dim = hidden / n_heads;
        LlamaConfig {
            arch: arch.to_string(),
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_hidden,
            vocab_size,
            context_length,
            rope_theta,
            rope_dim: head_dim,
            rms_eps,
            rope_freq_factors: None,
            tied_embeddings: tied,
        }
    }
    match name {
        "llama-3.1-8b" => {
            let mut c = cfg(
                "llama", 32, 4096, 32, 8, 14336, 128_256, 131_072, 500_000.0, 1e-5, false,
            );
            c.rope_freq_factors = Some(llama3_freq_factors(
                c.rope_theta,
                c.rope_dim,
                8.0,
                1.0,
                4.0,
                8192.0,
            ));
            Ok(c)
        }
        "qwen-2.5-7b" => Ok(cfg(
            "qwen2",
            28,
            3584,
            28,
            4,
            18944,
            152_064,
            131_072,
            1_000_000.0,
            1e-6,
            false,
        )),
        "smollm2-135m" => Ok(cfg(
            "llama", 30, 576, 9, 3, 1536, 49_152, 8192, 100_000.0, 1e-5, true,
        )),
        other => Err(ModelError::Config(format!(
            "unknown synthetic model {other:?}; known: {}",
            SYNTHETIC_MODELS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Bytes of bf16 weights one decode step reads for `cfg` (every layer matrix, the norms and the
/// output head; of the embedding table only the rows looked up, which are neglected).
pub fn decode_weight_bytes(cfg: &LlamaConfig) -> u64 {
    let (h, qd, kvd, ff) = (
        cfg.hidden as u64,
        (cfg.n_heads * cfg.head_dim) as u64,
        (cfg.n_kv_heads * cfg.head_dim) as u64,
        cfg.ffn_hidden as u64,
    );
    let layer = h * (qd + 2 * kvd) + qd * h + 3 * h * ff + 2 * h;
    2 * (cfg.n_layers as u64 * layer + cfg.vocab_size as u64 * h + h)
}

/// Bytes of K and V one token occupies over all layers (bf16).
pub fn kv_bytes_per_token(cfg: &LlamaConfig) -> u64 {
    2 * 2 * (cfg.n_layers * cfg.n_kv_heads * cfg.head_dim) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_names() {
        let l = synthetic_config("llama-3.1-8b").unwrap();
        assert_eq!((l.n_heads, l.n_kv_heads, l.head_dim), (32, 8, 128));
        assert_eq!(l.rope_freq_factors.as_ref().map(Vec::len), Some(64));
        let q = synthetic_config("qwen-2.5-7b").unwrap();
        assert_eq!((q.n_heads, q.n_kv_heads, q.head_dim), (28, 4, 128));
        let s = synthetic_config("smollm2-135m").unwrap();
        assert_eq!((s.head_dim, s.tied_embeddings), (64, true));
        assert!(synthetic_config("gpt-5").is_err());
        assert_eq!(synthetic_name("synthetic:qwen-2.5-7b"), Some("qwen-2.5-7b"));
        assert_eq!(synthetic_name("model.gguf"), None);
        // Llama 3.1 8B: about 7.0 G layer parameters + a 0.5 G head, in bf16.
        let gb = decode_weight_bytes(&l) as f64 / 1e9;
        assert!((14.5..15.5).contains(&gb), "{gb}");
        assert_eq!(kv_bytes_per_token(&l), 131_072);
    }

    #[test]
    fn persistent_option() {
        let p = SyntheticSpec::parse("llama-3.1-8b+persistent=0.9").unwrap();
        assert_eq!((p.shape.as_str(), p.persistent), ("llama-3.1-8b", 0.9));
        assert_eq!(
            synthetic_config("llama-3.1-8b+persistent=0.9").unwrap(),
            synthetic_config("llama-3.1-8b").unwrap()
        );
        // The shared dimensions hold the share S of a row's energy.
        let v = p.persistent_value(4096).unwrap() as f64;
        let shared = PERSISTENT_DIMS as f64 * v * v;
        let own = 4096.0 * (PERSISTENT_EMBD_STD as f64).powi(2);
        assert!((shared / (shared + own) - 0.9).abs() < 1e-4);
        let plain = SyntheticSpec::parse("smollm2-135m").unwrap();
        assert_eq!(plain.persistent, 0.0);
        assert_eq!(plain.persistent_value(576), None);
        for bad in [
            "llama-3.1-8b+persistent=1",
            "llama-3.1-8b+persistent=-0.1",
            "llama-3.1-8b+persistent=x",
            "llama-3.1-8b+persistent=NaN",
            "llama-3.1-8b+coherence=0.5",
            "gpt-5+persistent=0.5",
        ] {
            assert!(SyntheticSpec::parse(bad).is_err(), "{bad}");
            assert!(synthetic_config(bad).is_err(), "{bad}");
        }
    }
}
