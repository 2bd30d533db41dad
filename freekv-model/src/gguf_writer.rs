//! An in-memory GGUF v3 writer, for tests, fuzzing and tiny fixture models.
//!
//! ```
//! use freekv_model::gguf::{GgufFile, GgufWriter, MetaValue};
//! use freekv_model::GgmlType;
//! let mut w = GgufWriter::new();
//! w.add_meta("general.architecture", MetaValue::String("llama".into()))
//!     .add_meta("llama.block_count", MetaValue::U32(2));
//! let values: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
//! w.add_tensor_f32("w", &[32, 2], GgmlType::Q8_0, &values).unwrap();
//! let g = GgufFile::from_bytes("tiny.gguf", w.to_bytes().unwrap()).unwrap();
//! assert_eq!(g.tensor("w").unwrap().dims, vec![32, 2]);
//! ```

use crate::error::ModelError;
use crate::ggml::GgmlType;
use crate::gguf::{DEFAULT_ALIGNMENT, MAX_ALIGNMENT, MetaValue};

/// A tensor waiting to be written.
#[derive(Debug, Clone)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

/// Builds a GGUF v3 image: metadata in insertion order, then tensor infos, then the aligned data.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

fn err(msg: String) -> ModelError {
    ModelError::Gguf {
        path: "<gguf writer>".to_string(),
        msg,
    }
}

impl GgufWriter {
    /// An empty v3 writer with the default alignment (32).
    pub fn new() -> Self {
        Self {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Sets the tensor data alignment; a value other than 32 is also written as
    /// `general.alignment` (u32) unless that key was added explicitly.
    pub fn set_alignment(&mut self, alignment: u64) -> Result<&mut Self, ModelError> {
        if !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
            return Err(err(format!(
                "alignment {alignment} is not a power of two up to {MAX_ALIGNMENT}"
            )));
        }
        self.alignment = alignment;
        Ok(self)
    }

    /// Sets the version number written in the header (2 or 3 produce valid files; any other
    /// value is for negative tests).
    pub fn set_version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Adds (or replaces) a metadata pair.
    pub fn add_meta(&mut self, key: impl Into<String>, value: MetaValue) -> &mut Self {
        let key = key.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Adds a tensor from raw bytes already in `ty`'s encoding; the length must match the dims.
    pub fn add_tensor_bytes(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
    ) -> Result<&mut Self, ModelError> {
        let name = name.into();
        if dims.is_empty() || dims.len() > crate::gguf::MAX_DIMS {
            return Err(err(format!(
                "tensor `{name}`: {} dimensions (must be 1 to 4)",
                dims.len()
            )));
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(err(format!("duplicate tensor name `{name}`")));
        }
        let expected = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|_| {
                dims.first()
                    .is_some_and(|d| d.is_multiple_of(ty.block_elems() as u64))
            })
            .and_then(|n| ty.bytes_for(n));
        if expected != Some(data.len() as u64) {
            return Err(err(format!(
                "tensor `{name}`: {} bytes given, dims {dims:?} of {ty} need {expected:?}",
                data.len()
            )));
        }
        self.tensors.push(PendingTensor {
            name,
            dims: dims.to_vec(),
            ty,
            data,
        });
        Ok(self)
    }

    /// Adds a tensor from `f32` values, quantized to `ty` with [`crate::quant::quantize`].
    pub fn add_tensor_f32(
        &mut self,
        name: impl Into<String>,
        dims: &[u64],
        ty: GgmlType,
        values: &[f32],
    ) -> Result<&mut Self, ModelError> {
        let data = crate::quant::quantize(ty, values)?;
        self.add_tensor_bytes(name, dims, ty, data)
    }

    /// Number of tensors added so far.
    pub fn n_tensors(&self) -> usize {
        self.tensors.len()
    }

    /// Serializes the file. Fails on a heterogeneous metadata array.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let mut meta: Vec<(&str, &MetaValue)> =
            self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let align_value = MetaValue::U32(self.alignment as u32);
        if self.alignment != DEFAULT_ALIGNMENT
            && !self.metadata.iter().any(|(k, _)| k == "general.alignment")
        {
            meta.push(("general.alignment", &align_value));
        }
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            write_string(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            write_value(&mut out, v, k)?;
        }
        let align = |n: u64| n.div_ceil(self.alignment) * self.alignment;
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len() as u64);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off as usize, 0);
            out.extend_from_slice(&t.data);
        }
        Ok(out)
    }

    /// Serializes the file and writes it to `path`.
    pub fn write_to(&self, path: impl AsRef<std::path::Path>) -> Result<(), ModelError> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        std::fs::write(path, bytes).map_err(|source| ModelError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue, key: &str) -> Result<(), ModelError> {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::Array(items) => {
            // An empty array is written with element type u8 (any type reads back the same).
            let elem_ty = items.first().map_or(0, MetaValue::type_id);
            if let Some(bad) = items.iter().find(|i| i.type_id() != elem_ty) {
                return Err(err(format!(
                    "metadata `{key}`: array mixes {} and {} elements",
                    items.first().map_or("?", MetaValue::type_name),
                    bad.type_name()
                )));
            }
            out.extend_from_slice(&elem_ty.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                write_value(out, i, key)?;
            }
        }
    }
    Ok(())
}

/// Shape and seed of a tiny random Llama model, for tests that need a complete model file.
///
/// [`TinyLlamaSpec::writer`] produces a [`GgufWriter`] with llama.cpp's `llama.*` metadata, a
/// minimal GPT-2 byte-level vocabulary (`<|endoftext|>` 0, `<|im_start|>` 1, `<|im_end|>` 2, the
/// 256 byte tokens, then `<extra_N>` fillers; no merges; `tokenizer.ggml.pre = "smollm"`) and
/// every tensor llama.cpp names (`token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v,
/// attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}`, `output_norm`, and `output` unless tied),
/// filled with seeded pseudo-random values. Callers may add more metadata or tensors before
/// serializing.
#[derive(Debug, Clone, PartialEq)]
pub struct TinyLlamaSpec {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Embedding width (a multiple of 32 for the 32-element block types).
    pub hidden: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// SwiGLU hidden width (a multiple of 32 for block types).
    pub ffn_hidden: usize,
    /// Vocabulary size (at least 259: 3 specials and 256 byte tokens).
    pub vocab_size: usize,
    /// `llama.context_length`.
    pub context_length: usize,
    /// `llama.rope.freq_base`.
    pub rope_theta: f32,
    /// `llama.attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// Type of the projection matrices.
    pub weight_type: GgmlType,
    /// Type of `token_embd.weight` (and `output.weight` when untied).
    pub embd_type: GgmlType,
    /// No `output.weight` when true.
    pub tied: bool,
    /// Seed of the weight generator.
    pub seed: u64,
}

impl Default for TinyLlamaSpec {
    /// 2 layers, width 64, 4 query heads over 2 KV heads (head dim 16), FFN 128, vocabulary 320,
    /// context 256, Q4_1 matrices, Q8_0 tied embeddings (the default model's mix).
    fn default() -> Self {
        Self {
            n_layers: 2,
            hidden: 64,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_hidden: 128,
            vocab_size: 320,
            context_length: 256,
            rope_theta: 10000.0,
            rms_eps: 1e-5,
            weight_type: GgmlType::Q4_1,
            embd_type: GgmlType::Q8_0,
            tied: true,
            seed: 0,
        }
    }
}

/// SplitMix64: a tiny deterministic generator (no dependency on `rand` in the library).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32, offset: f32) -> Vec<f32> {
        (0..n).map(|_| offset + scale * self.next_f32()).collect()
    }
}

/// GPT-2's byte-to-unicode mapping: printable bytes map to themselves, the rest to U+0100.. in order.
fn gpt2_byte_char(b: u8) -> char {
    let printable = |x: u8| (b'!'..=b'~').contains(&x) || (0xA1..=0xAC).contains(&x) || x >= 0xAE;
    if printable(b) {
        char::from(b)
    } else {
        let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + rank).unwrap_or('?')
    }
}

impl TinyLlamaSpec {
    /// Head dimension (`hidden / n_heads`).
    pub fn head_dim(&self) -> usize {
        self.hidden / self.n_heads.max(1)
    }

    /// Builds the writer (see the type's documentation).
    pub fn writer(&self) -> Result<GgufWriter, ModelError> {
        let s = self;
        if s.n_heads == 0
            || s.n_kv_heads == 0
            || !s.hidden.is_multiple_of(s.n_heads)
            || !s.n_heads.is_multiple_of(s.n_kv_heads)
        {
            return Err(err(format!(
                "tiny llama: {} heads / {} KV heads do not fit width {}",
                s.n_heads, s.n_kv_heads, s.hidden
            )));
        }
        if s.vocab_size < 259 {
            return Err(err(format!(
                "tiny llama: vocabulary {} is below 259",
                s.vocab_size
            )));
        }
        let hd = s.head_dim();
        let u32v = |x: usize| MetaValue::U32(x as u32);
        let mut w = GgufWriter::new();
        w.add_meta("general.architecture", MetaValue::String("llama".into()))
            .add_meta(
                "general.name",
                MetaValue::String("tiny-random-llama".into()),
            )
            .add_meta("llama.block_count", u32v(s.n_layers))
            .add_meta("llama.context_length", u32v(s.context_length))
            .add_meta("llama.embedding_length", u32v(s.hidden))
            .add_meta("llama.feed_forward_length", u32v(s.ffn_hidden))
            .add_meta("llama.attention.head_count", u32v(s.n_heads))
            .add_meta("llama.attention.head_count_kv", u32v(s.n_kv_heads))
            .add_meta("llama.rope.freq_base", MetaValue::F32(s.rope_theta))
            .add_meta("llama.rope.dimension_count", u32v(hd))
            .add_meta(
                "llama.attention.layer_norm_rms_epsilon",
                MetaValue::F32(s.rms_eps),
            )
            .add_meta("llama.vocab_size", u32v(s.vocab_size));
        let mut tokens: Vec<MetaValue> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
            .iter()
            .map(|t| MetaValue::String((*t).into()))
            .collect();
        tokens.extend((0..=255u8).map(|b| MetaValue::String(gpt2_byte_char(b).to_string())));
        let n_fill = s.vocab_size - tokens.len();
        tokens.extend((0..n_fill).map(|i| MetaValue::String(format!("<extra_{i}>"))));
        let mut types = vec![MetaValue::I32(3); 3];
        types.extend(std::iter::repeat_n(MetaValue::I32(1), 256));
        types.extend(std::iter::repeat_n(MetaValue::I32(4), n_fill));
        w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
            .add_meta("tokenizer.ggml.pre", MetaValue::String("smollm".into()))
            .add_meta("tokenizer.ggml.tokens", MetaValue::Array(tokens))
            .add_meta("tokenizer.ggml.token_type", MetaValue::Array(types))
            .add_meta("tokenizer.ggml.merges", MetaValue::Array(Vec::new()))
            .add_meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
            .add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
            .add_meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));

        let mut rng = SplitMix64(s.seed ^ 0x5EED_0F71_A111);
        let (h, q, kv, f) = (
            s.hidden as u64,
            (s.n_heads * hd) as u64,
            (s.n_kv_heads * hd) as u64,
            s.ffn_hidden as u64,
        );
        let mat =
            |rng: &mut SplitMix64, w: &mut GgufWriter, name: String, fan_in: u64, out: u64, ty| {
                let scale = 1.0 / (fan_in as f32).sqrt();
                let v = rng.vec((fan_in * out) as usize, scale, 0.0);
                w.add_tensor_f32(name, &[fan_in, out], ty, &v).map(|_| ())
            };
        let norm = |rng: &mut SplitMix64, w: &mut GgufWriter, name: String| {
            let v = rng.vec(s.hidden, 0.1, 1.0);
            w.add_tensor_f32(name, &[h], GgmlType::F32, &v).map(|_| ())
        };
        mat(
            &mut rng,
            &mut w,
            "token_embd.weight".into(),
            h,
            s.vocab_size as u64,
            s.embd_type,
        )?;
        for l in 0..s.n_layers {
            let n = |t: &str| format!("blk.{l}.{t}.weight");
            norm(&mut rng, &mut w, n("attn_norm"))?;
            mat(&mut rng, &mut w, n("attn_q"), h, q, s.weight_type)?;
            mat(&mut rng, &mut w, n("attn_k"), h, kv, s.weight_type)?;
            mat(&mut rng, &mut w, n("attn_v"), h, kv, s.weight_type)?;
            mat(&mut rng, &mut w, n("attn_output"), q, h, s.weight_type)?;
            norm(&mut rng, &mut w, n("ffn_norm"))?;
            mat(&mut rng, &mut w, n("ffn_gate"), h, f, s.weight_type)?;
            mat(&mut rng, &mut w, n("ffn_up"), h, f, s.weight_type)?;
            mat(&mut rng, &mut w, n("ffn_down"), f, h, s.weight_type)?;
        }
        norm(&mut rng, &mut w, "output_norm.weight".into())?;
        if !s.tied {
            mat(
                &mut rng,
                &mut w,
                "output.weight".into(),
                h,
                s.vocab_size as u64,
                s.embd_type,
            )?;
        }
        Ok(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_byte_mapping_matches_known_points() {
        assert_eq!(gpt2_byte_char(b'A'), 'A');
        assert_eq!(gpt2_byte_char(b' '), 'Ġ'); // U+0120
        assert_eq!(gpt2_byte_char(b'\n'), 'Ċ'); // U+010A
        assert_eq!(gpt2_byte_char(0), '\u{100}');
        assert_eq!(gpt2_byte_char(0xAD), '\u{143}');
        let all: std::collections::HashSet<char> = (0..=255u8).map(gpt2_byte_char).collect();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let a: Vec<f32> = SplitMix64(5).vec(1000, 1.0, 0.0);
        assert_eq!(a, SplitMix64(5).vec(1000, 1.0, 0.0));
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = a.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1, "{mean}");
    }
}
