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
