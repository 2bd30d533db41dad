//! A hardened reader for GGUF v2/v3 model files.
//!
//! [`GgufFile::open`] memory-maps the file, parses the header, every metadata key/value pair and
//! every tensor info into owned structures, and validates every count, length, type id, offset and
//! size against the file before anything is allocated or sliced. Tensor bytes are then available
//! zero-copy through [`GgufFile::tensor_data`] or dequantized through [`GgufFile::tensor_f32`].
//!
//! Format (all little-endian):
//!
//! ```text
//! magic "GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
//! kv_count x   key: string | value_type u32 | value
//! tensor_count x  name: string | n_dims u32 | ne[n_dims] u64 | ggml_type u32 | offset u64
//! padding to `general.alignment` (default 32), then the tensor data section
//! string = len u64 | bytes (UTF-8); array = elem_type u32 | count u64 | elements
//! ```
//!
//! A malformed file never panics and never causes an out-of-bounds read: every problem is a
//! [`ModelError::Gguf`] naming the file, what is wrong and where.
//!
//! ```
//! use freekv_model::gguf::{GgufFile, GgufWriter, MetaValue};
//! use freekv_model::GgmlType;
//! let mut w = GgufWriter::new();
//! w.add_meta("general.architecture", MetaValue::String("llama".into()));
//! w.add_tensor_f32("x", &[4], GgmlType::F32, &[1.0, 2.0, 3.0, 4.0]).unwrap();
//! let g = GgufFile::from_bytes("mem.gguf", w.to_bytes().unwrap()).unwrap();
//! assert_eq!(g.get("general.architecture").and_then(|v| v.as_str()), Some("llama"));
//! assert_eq!(g.tensor_f32("x").unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::ModelError;
use crate::ggml::GgmlType;

#[path = "gguf_writer.rs"]
pub mod writer;
pub use writer::{GgufWriter, TinyLlamaSpec};

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Tensor data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest accepted `general.alignment`.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// Deepest accepted nesting of metadata arrays (an array of arrays has depth 2).
pub const MAX_ARRAY_DEPTH: u32 = 8;
/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 4;
/// Most metadata array elements in one file, all arrays together. Each element becomes a
/// [`MetaValue`] of 32 bytes, up to 32 times its size in the file (a `u8`), so counts checked
/// against the file's size alone would still let a crafted file ask for 32 times its size in
/// memory. Real files hold about a million (a 256K vocabulary, its types and merges).
pub const MAX_META_ELEMENTS: u64 = 1 << 24;

/// Metadata value type ids as stored in the file.
mod vt {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    U64(u64),
    I64(i64),
    F64(f64),
    /// A homogeneous array (the element type is that of the elements; may be nested).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The string, for `String` values.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any non-negative integer value as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value that fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Any numeric value (integer or float) as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v as f64),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value of a `Bool`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements of an `Array`.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of this value's type (`"u32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "u8",
            Self::I8(_) => "i8",
            Self::U16(_) => "u16",
            Self::I16(_) => "i16",
            Self::U32(_) => "u32",
            Self::I32(_) => "i32",
            Self::F32(_) => "f32",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::U64(_) => "u64",
            Self::I64(_) => "i64",
            Self::F64(_) => "f64",
            Self::Array(_) => "array",
        }
    }

    /// The GGUF value type id of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => vt::U8,
            Self::I8(_) => vt::I8,
            Self::U16(_) => vt::U16,
            Self::I16(_) => vt::I16,
            Self::U32(_) => vt::U32,
            Self::I32(_) => vt::I32,
            Self::F32(_) => vt::F32,
            Self::Bool(_) => vt::BOOL,
            Self::String(_) => vt::STRING,
            Self::U64(_) => vt::U64,
            Self::I64(_) => vt::I64,
            Self::F64(_) => vt::F64,
            Self::Array(_) => vt::ARRAY,
        }
    }
}

/// A short, single-line rendering of a value; arrays longer than 16 items are shown as
/// `[N items of TYPE]` and long strings are cut.
impl std::fmt::Display for MetaValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::String(s) => {
                let mut shown: String = s.chars().take(100).collect();
                if shown.len() < s.len() {
                    shown.push('…');
                    write!(f, "{shown:?} ({} bytes)", s.len())
                } else {
                    write!(f, "{shown:?}")
                }
            }
            Self::Array(a) if a.len() > 16 => {
                let elem = a.first().map_or("?", MetaValue::type_name);
                write!(f, "[{} items of {elem}]", a.len())
            }
            Self::Array(a) => {
                f.write_str("[")?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Self::U8(v) => write!(f, "{v}"),
            Self::I8(v) => write!(f, "{v}"),
            Self::U16(v) => write!(f, "{v}"),
            Self::I16(v) => write!(f, "{v}"),
            Self::U32(v) => write!(f, "{v}"),
            Self::I32(v) => write!(f, "{v}"),
            Self::U64(v) => write!(f, "{v}"),
            Self::I64(v) => write!(f, "{v}"),
            Self::F32(v) => write!(f, "{v}"),
            Self::F64(v) => write!(f, "{v}"),
            Self::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name (`"blk.0.attn_q.weight"`).
    pub name: String,
    /// Dimensions `ne[]`, fastest-varying first: a matrix `[in, out]` is row-major `W[out][in]`.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Size of the tensor's data in bytes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements (product of the dimensions; saturates instead of overflowing, which
    /// cannot happen for infos produced by [`GgufFile`]).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }
}

/// What identifies the contents of a file on disk, as `fstat` reports it for the open descriptor:
/// size, modification time and (on Unix) the inode change time with the metadata whose changes
/// also move it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// Inode change time (seconds, nanoseconds): unlike the modification time, no user tool can
    /// set it back, so a rewrite that restores the modification time still moves it.
    changed: Option<(i64, i64)>,
    /// Link count, mode, owner and group: changes of these also move the inode change time and
    /// are harmless (a file renamed over the path drops the old file's link count to 0).
    meta: Option<(u64, u32, u32, u32)>,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let (changed, other) = {
            use std::os::unix::fs::MetadataExt;
            (
                Some((meta.ctime(), meta.ctime_nsec())),
                Some((meta.nlink(), meta.mode(), meta.uid(), meta.gid())),
            )
        };
        #[cfg(not(unix))]
        let (changed, other) = (None, None);
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            changed,
            meta: other,
        }
    }

    /// Whether the contents may differ from `self`'s: another size or modification time, or an
    /// inode change that no metadata change explains.
    fn contents_differ(&self, now: &Self) -> bool {
        self.len != now.len
            || self.modified != now.modified
            || (self.changed != now.changed && self.meta == now.meta)
    }
}

/// The bytes behind a [`GgufFile`].
enum Storage {
    /// A read-only map of the file, the file itself (its descriptor follows the mapped inode even
    /// when the path is renamed or replaced) and its stamp at open.
    Mmap {
        map: memmap2::Mmap,
        file: std::fs::File,
        stamp: FileStamp,
    },
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mmap { map, .. } => map,
            Self::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor infos, with the file's bytes kept mapped (or owned).
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Memory-maps and parses the file at `path`.
    ///
    /// The file must not be modified in place while the returned value is alive: a write changes
    /// the weights under the running model, and truncating the file makes the next read of a
    /// page past the new end raise `SIGBUS`, which kills the process. Replacing the file (a new
    /// file renamed over the path, as downloads and `cp` to a temporary name do) is harmless: the
    /// map keeps the old contents. [`GgufFile::check_unchanged`] detects in-place changes; the
    /// CPU decoder calls it before every prefill and decode step. Empty files are read, not
    /// mapped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let _span = tracing::debug_span!("gguf_open", path = %path.display()).entered();
        let io = |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(ModelError::Gguf {
                path: path.display().to_string(),
                msg: "not a regular file".into(),
            });
        }
        let stamp = FileStamp::of(&meta);
        let storage = if stamp.len == 0 {
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and private to this value. Every access goes through
            // bounds-checked slices of the mapped length. The remaining hazard of any file map,
            // another process truncating or rewriting the file, is documented above and detected
            // by `check_unchanged` (docs/hardening.md).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
            Storage::Mmap { map, file, stamp }
        };
        let g = Self::parse(path.to_path_buf(), storage)?;
        // A write during the parse would have gone unnoticed.
        g.check_unchanged()?;
        Ok(g)
    }

    /// Checks that the mapped file was not modified or truncated since [`GgufFile::open`]: same
    /// size, modification time and (on Unix) inode change time, unless a change of the link
    /// count, mode or owner explains the latter. The stamp is read from the open descriptor, so a
    /// file replaced at the same path (renamed over it) passes: the map keeps the old contents.
    /// Always `Ok` for in-memory images.
    ///
    /// A failed check means the weights in memory may no longer be those that were validated:
    /// the model must be reopened. The check cannot prevent a `SIGBUS` from a truncation that
    /// happens between two checks.
    pub fn check_unchanged(&self) -> Result<(), ModelError> {
        let Storage::Mmap { file, stamp, .. } = &self.storage else {
            return Ok(());
        };
        let now = file
            .metadata()
            .map(|m| FileStamp::of(&m))
            .map_err(|e| ModelError::Io {
                path: self.path.display().to_string(),
                source: e,
            })?;
        if !stamp.contents_differ(&now) {
            return Ok(());
        }
        let what = if now.len != stamp.len {
            format!("its size went from {} to {} bytes", stamp.len, now.len)
        } else if now.modified != stamp.modified {
            "its modification time changed".to_string()
        } else {
            "it was written with its old modification time restored".to_string()
        };
        Err(ModelError::Gguf {
            path: self.path.display().to_string(),
            msg: format!(
                "the model file changed on disk while in use ({what}); the loaded weights are no \
                 longer reliable: restart with the new file, and replace model files by renaming \
                 a new file over them, never by writing into them"
            ),
        })
    }

    /// Whether the bytes are a map of a file (from [`GgufFile::open`]) rather than owned.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mmap { .. })
    }

    /// Parses an in-memory GGUF image; `name` stands in for the path in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, ModelError> {
        Self::parse(PathBuf::from(name), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Self, ModelError> {
        let display = path.display().to_string();
        let parsed = parse_layout(storage.bytes(), &display)?;
        Ok(Self {
            path,
            storage,
            version: parsed.version,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
            metadata: parsed.metadata,
            meta_index: parsed.meta_index,
            tensors: parsed.tensors,
            tensor_index: parsed.tensor_index,
        })
    }

    /// The path given to [`GgufFile::open`] (or the name given to [`GgufFile::from_bytes`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Tensor data alignment in bytes (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the tensor data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Total file size in bytes.
    pub fn file_size(&self) -> u64 {
        self.storage.bytes().len() as u64
    }

    /// All metadata key/value pairs in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The metadata value for `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.meta_index
            .get(key)
            .and_then(|&i| self.metadata.get(i))
            .map(|(_, v)| v)
    }

    /// All tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor info named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// The raw bytes of a tensor (zero-copy). Bounds were validated at open; an info that does
    /// not belong to this file and points outside it gives an error, never a panic.
    pub fn tensor_data(&self, t: &TensorInfo) -> Result<&[u8], ModelError> {
        let bytes = self.storage.bytes();
        let range = self
            .data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes).map(|e| (s, e)))
            .and_then(|(s, e)| Some((usize::try_from(s).ok()?, usize::try_from(e).ok()?)));
        range
            .and_then(|(s, e)| bytes.get(s..e))
            .ok_or_else(|| ModelError::Gguf {
                path: self.path.display().to_string(),
                msg: format!(
                    "tensor `{}`: data at offset {} + {} bytes lies outside the {}-byte file",
                    t.name,
                    t.offset,
                    t.n_bytes,
                    bytes.len()
                ),
            })
    }

    /// A dequantized `f32` copy of the tensor named `name`, in `ne[0]`-fastest order.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let t = self
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let _span = tracing::debug_span!("gguf_tensor_f32", name, ty = %t.ty).entered();
        let data = self.tensor_data(t)?;
        let n = usize::try_from(t.n_elements()).map_err(|_| {
            ModelError::Shape(format!(
                "tensor `{name}`: {} elements do not fit in memory",
                t.n_elements()
            ))
        })?;
        crate::quant::dequantize_to_vec(t.ty, data, n).map_err(|e| match e {
            ModelError::Shape(msg) => ModelError::Shape(format!("tensor `{name}`: {msg}")),
            other => other,
        })
    }

    /// A human-readable summary: version, sizes, every metadata pair (huge arrays as
    /// `[N items of TYPE]`), and tensor counts and bytes by type.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: GGUF v{}, {} bytes, alignment {}, tensor data at byte {}",
            self.path.display(),
            self.version,
            self.file_size(),
            self.alignment,
            self.data_offset
        );
        let _ = writeln!(s, "metadata ({} keys):", self.metadata.len());
        for (k, v) in &self.metadata {
            let _ = writeln!(s, "  {k} = {v}");
        }
        let mut by_type: Vec<(GgmlType, usize, u64, u64)> = Vec::new();
        for t in &self.tensors {
            match by_type.iter_mut().find(|e| e.0 == t.ty) {
                Some(e) => {
                    e.1 += 1;
                    e.2 = e.2.saturating_add(t.n_bytes);
                    e.3 = e.3.saturating_add(t.n_elements());
                }
                None => by_type.push((t.ty, 1, t.n_bytes, t.n_elements())),
            }
        }
        let total_bytes: u64 = self
            .tensors
            .iter()
            .fold(0, |a, t| a.saturating_add(t.n_bytes));
        let total_elems: u64 = self
            .tensors
            .iter()
            .fold(0, |a, t| a.saturating_add(t.n_elements()));
        let _ = writeln!(
            s,
            "tensors: {} ({} parameters, {} bytes = {:.1} MiB)",
            self.tensors.len(),
            total_elems,
            total_bytes,
            total_bytes as f64 / (1024.0 * 1024.0)
        );
        for (ty, count, bytes, elems) in by_type {
            let _ = writeln!(
                s,
                "  {:<5} x{count:<5} {elems:>12} parameters {bytes:>12} bytes",
                ty.name()
            );
        }
        s
    }
}

/// Everything parsed from the header, metadata and tensor infos.
struct Layout {
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, MetaValue)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian cursor; every failure names the file and the offset.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a str,
    /// Metadata array elements read so far (bounded by [`MAX_META_ELEMENTS`]).
    elements: u64,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl Into<String>) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_string(),
            msg: msg.into(),
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize, what: &dyn std::fmt::Display) -> Result<&'a [u8], ModelError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end.and_then(|e| self.buf.get(self.pos..e).map(|s| (e, s))) {
            Some((e, s)) => {
                self.pos = e;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated file: {what} needs {n} bytes at offset {} but only {} remain",
                self.pos,
                self.remaining()
            ))),
        }
    }

    fn array<const N: usize>(
        &mut self,
        what: &dyn std::fmt::Display,
    ) -> Result<[u8; N], ModelError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn std::fmt::Display) -> Result<u32, ModelError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn std::fmt::Display) -> Result<u64, ModelError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Reads a length-prefixed byte string, checking the length against the remaining bytes.
    fn raw_string(&mut self, what: &dyn std::fmt::Display) -> Result<&'a [u8], ModelError> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            return Err(self.err(format!(
                "{what}: string length {len} at offset {at} exceeds the {} bytes left in the file",
                self.remaining()
            )));
        }
        // The check above guarantees `len` fits in usize.
        self.take(len as usize, what)
    }

    /// A string that must be valid UTF-8 (keys and tensor names).
    fn name(&mut self, what: &dyn std::fmt::Display) -> Result<String, ModelError> {
        let at = self.pos;
        let raw = self.raw_string(what)?;
        String::from_utf8(raw.to_vec()).map_err(|e| {
            self.err(format!(
                "{what}: string at offset {at} is not valid UTF-8 ({e})"
            ))
        })
    }

    /// Minimum encoded size of one value of type `ty`, or `None` for an unknown type.
    fn min_size(ty: u32) -> Option<usize> {
        Some(match ty {
            vt::U8 | vt::I8 | vt::BOOL => 1,
            vt::U16 | vt::I16 => 2,
            vt::U32 | vt::I32 | vt::F32 => 4,
            vt::U64 | vt::I64 | vt::F64 | vt::STRING => 8,
            vt::ARRAY => 12,
            _ => return None,
        })
    }

    fn value(&mut self, ty: u32, depth: u32, key: &str) -> Result<MetaValue, ModelError> {
        let what = format_args!("metadata `{key}`");
        Ok(match ty {
            vt::U8 => MetaValue::U8(u8::from_le_bytes(self.array(&what)?)),
            vt::I8 => MetaValue::I8(i8::from_le_bytes(self.array(&what)?)),
            vt::U16 => MetaValue::U16(u16::from_le_bytes(self.array(&what)?)),
            vt::I16 => MetaValue::I16(i16::from_le_bytes(self.array(&what)?)),
            vt::U32 => MetaValue::U32(u32::from_le_bytes(self.array(&what)?)),
            vt::I32 => MetaValue::I32(i32::from_le_bytes(self.array(&what)?)),
            vt::F32 => MetaValue::F32(f32::from_le_bytes(self.array(&what)?)),
            vt::U64 => MetaValue::U64(u64::from_le_bytes(self.array(&what)?)),
            vt::I64 => MetaValue::I64(i64::from_le_bytes(self.array(&what)?)),
            vt::F64 => MetaValue::F64(f64::from_le_bytes(self.array(&what)?)),
            vt::BOOL => {
                let at = self.pos;
                match self.array::<1>(&what)?[0] {
                    0 => MetaValue::Bool(false),
                    1 => MetaValue::Bool(true),
                    b => {
                        return Err(self.err(format!(
                            "{what}: bool at offset {at} has value {b} (not 0 or 1)"
                        )));
                    }
                }
            }
            vt::STRING => {
                // Values are kept even if not valid UTF-8 (replacement characters), as llama.cpp
                // does not validate them either; keys and tensor names must be valid.
                MetaValue::String(String::from_utf8_lossy(self.raw_string(&what)?).into_owned())
            }
            vt::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(format!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels at offset {}",
                        self.pos
                    )));
                }
                let at = self.pos;
                let elem_ty = self.u32(&what)?;
                let Some(min) = Self::min_size(elem_ty) else {
                    return Err(self.err(format!(
                        "{what}: unknown array element type {elem_ty} at offset {at}"
                    )));
                };
                let count = self.u64(&what)?;
                let max = (self.remaining() / min) as u64;
                if count > max {
                    return Err(self.err(format!(
                        "{what}: array of {count} elements of type {elem_ty} at offset {at} cannot fit in the {} bytes left",
                        self.remaining()
                    )));
                }
                self.elements = self.elements.saturating_add(count);
                if self.elements > MAX_META_ELEMENTS {
                    return Err(self.err(format!(
                        "{what}: metadata arrays hold more than {MAX_META_ELEMENTS} elements in \
                         total (array of {count} at offset {at})"
                    )));
                }
                // `count` is bounded by the remaining bytes and by the element budget, so this
                // reservation is too.
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, depth + 1, key)?);
                }
                MetaValue::Array(items)
            }
            other => {
                return Err(self.err(format!(
                    "{what}: unknown value type {other} at offset {}",
                    self.pos.saturating_sub(4)
                )));
            }
        })
    }
}

/// Parses everything but the tensor data and validates it against `buf`.
fn parse_layout(buf: &[u8], path: &str) -> Result<Layout, ModelError> {
    let mut r = Reader {
        buf,
        pos: 0,
        path,
        elements: 0,
    };
    let magic: [u8; 4] = r.array(&"the magic number")?;
    if magic != GGUF_MAGIC {
        return Err(r.err(format!(
            "not a GGUF file: magic bytes are {magic:02x?}, expected \"GGUF\""
        )));
    }
    let version = r.u32(&"the version")?;
    match version {
        2 | 3 => {}
        1 => {
            return Err(r.err(
                "GGUF version 1 is not supported (only versions 2 and 3); re-convert the model",
            ));
        }
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => {
            return Err(r.err("big-endian GGUF files are not supported"));
        }
        v => {
            return Err(r.err(format!(
                "unsupported GGUF version {v} (only versions 2 and 3)"
            )));
        }
    }
    let tensor_count = r.u64(&"the tensor count")?;
    let kv_count = r.u64(&"the metadata count")?;
    // Minimum encoded sizes: a KV pair is key length (8) + type (4) + a 1-byte value; a tensor
    // info is name length (8) + n_dims (4) + one dim (8) + type (4) + offset (8).
    let rem = r.remaining() as u64;
    if kv_count > rem / 13 {
        return Err(r.err(format!(
            "header claims {kv_count} metadata pairs, more than the {rem} remaining bytes can hold"
        )));
    }
    if tensor_count > rem / 32 {
        return Err(r.err(format!(
            "header claims {tensor_count} tensors, more than the {rem} remaining bytes can hold"
        )));
    }
    if kv_count
        .saturating_mul(13)
        .saturating_add(tensor_count.saturating_mul(32))
        > rem
    {
        return Err(r.err(format!(
            "header claims {kv_count} metadata pairs and {tensor_count} tensors, more than the {rem} remaining bytes can hold"
        )));
    }

    let mut metadata = Vec::with_capacity(kv_count as usize);
    let mut meta_index = HashMap::with_capacity(kv_count as usize);
    for i in 0..kv_count {
        let key = r.name(&format_args!("metadata key #{i}"))?;
        let ty = r.u32(&format_args!("the type of metadata `{key}`"))?;
        let value = r.value(ty, 0, &key)?;
        if meta_index.insert(key.clone(), metadata.len()).is_some() {
            return Err(r.err(format!("duplicate metadata key `{key}`")));
        }
        metadata.push((key, value));
    }

    let alignment = match meta_index
        .get("general.alignment")
        .and_then(|&i| metadata.get(i))
    {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
            _ => {
                return Err(r.err(format!(
                    "general.alignment = {v} ({}) is not a power of two between 1 and {MAX_ALIGNMENT}",
                    v.type_name()
                )));
            }
        },
    };

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count as usize);
    let mut tensor_index = HashMap::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = r.name(&format_args!("tensor info #{i}"))?;
        let what = format_args!("tensor `{name}`");
        let at = r.pos;
        let n_dims = r.u32(&what)?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(r.err(format!(
                "{what}: {n_dims} dimensions at offset {at} (must be 1 to {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&what)?);
        }
        let at = r.pos;
        let type_id = r.u32(&what)?;
        let ty = GgmlType::from_id(type_id).ok_or_else(|| {
            r.err(format!(
                "{what}: unknown ggml type id {type_id} at offset {at}"
            ))
        })?;
        let offset = r.u64(&what)?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| r.err(format!("{what}: element count of dims {dims:?} overflows")))?;
        let block = ty.block_elems() as u64;
        if dims.first().is_some_and(|&d0| !d0.is_multiple_of(block)) {
            return Err(r.err(format!(
                "{what}: first dimension {} is not a multiple of the {ty} block size {block}",
                dims.first().copied().unwrap_or(0)
            )));
        }
        let n_bytes = ty.bytes_for(n_elements).ok_or_else(|| {
            r.err(format!(
                "{what}: byte size of {n_elements} {ty} elements overflows"
            ))
        })?;
        if !offset.is_multiple_of(alignment) {
            return Err(r.err(format!(
                "{what}: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if tensor_index.insert(name.clone(), tensors.len()).is_some() {
            return Err(r.err(format!("duplicate tensor name `{name}`")));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            n_bytes,
        });
    }

    let end_of_infos = r.pos as u64;
    let data_offset = end_of_infos.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(e) if e <= file_len => {}
            _ => {
                return Err(r.err(format!(
                    "tensor `{}`: data [{} + {}, {} bytes) lies outside the {file_len}-byte file (truncated?)",
                    t.name, data_offset, t.offset, t.n_bytes
                )));
            }
        }
    }
    // Tensors may appear in any order but must not share bytes.
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        if let [a, b] = pair
            && a.offset.saturating_add(a.n_bytes) > b.offset
        {
            return Err(r.err(format!(
                "tensors `{}` (offset {}, {} bytes) and `{}` (offset {}) overlap",
                a.name, a.offset, a.n_bytes, b.name, b.offset
            )));
        }
    }
    tracing::debug!(
        version,
        kv = metadata.len(),
        tensors = tensors.len(),
        data_offset,
        "parsed GGUF"
    );
    Ok(Layout {
        version,
        alignment,
        data_offset,
        metadata,
        meta_index,
        tensors,
        tensor_index,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, tensors: u64, kvs: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&tensors.to_le_bytes());
        b.extend_from_slice(&kvs.to_le_bytes());
        b
    }

    fn msg(e: ModelError) -> String {
        match e {
            ModelError::Gguf { path, msg } => {
                assert_eq!(path, "t.gguf");
                msg
            }
            other => panic!("expected a Gguf error, got {other:?}"),
        }
    }

    #[test]
    fn empty_header_parses() {
        let g = GgufFile::from_bytes("t.gguf", header(3, 0, 0)).unwrap();
        assert_eq!(g.version(), 3);
        assert!(g.metadata().is_empty() && g.tensors().is_empty());
        let g = GgufFile::from_bytes("t.gguf", header(2, 0, 0)).unwrap();
        assert_eq!(g.version(), 2);
    }

    #[test]
    fn rejects_versions() {
        assert!(
            msg(GgufFile::from_bytes("t.gguf", header(1, 0, 0)).unwrap_err()).contains("version 1")
        );
        assert!(
            msg(GgufFile::from_bytes("t.gguf", header(4, 0, 0)).unwrap_err()).contains("version 4")
        );
        assert!(
            msg(GgufFile::from_bytes("t.gguf", header(3u32.swap_bytes(), 0, 0)).unwrap_err())
                .contains("big-endian")
        );
    }

    #[test]
    fn absurd_counts() {
        let m = msg(GgufFile::from_bytes("t.gguf", header(3, u64::MAX, 0)).unwrap_err());
        assert!(m.contains("tensors"), "{m}");
        let m = msg(GgufFile::from_bytes("t.gguf", header(3, 0, 1 << 40)).unwrap_err());
        assert!(m.contains("metadata"), "{m}");
    }

    #[test]
    fn huge_string_length_is_rejected_before_allocation() {
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&[0u8; 16]);
        let m = msg(GgufFile::from_bytes("t.gguf", b).unwrap_err());
        assert!(m.contains("string length"), "{m}");
    }

    #[test]
    fn metadata_arrays_have_an_element_budget() {
        // 2^24 + 1 one-byte elements: 16 MiB in the file would be 512 MiB of values.
        let n = MAX_META_ELEMENTS + 1;
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'k');
        b.extend_from_slice(&vt::ARRAY.to_le_bytes());
        b.extend_from_slice(&vt::U8.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.resize(b.len() + n as usize, 7);
        let m = msg(GgufFile::from_bytes("t.gguf", b).unwrap_err());
        assert!(m.contains("more than 16777216 elements"), "{m}");
        // Just below the budget it parses.
        let n = MAX_META_ELEMENTS;
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'k');
        b.extend_from_slice(&vt::ARRAY.to_le_bytes());
        b.extend_from_slice(&vt::U8.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.resize(b.len() + n as usize, 7);
        let g = GgufFile::from_bytes("t.gguf", b).unwrap();
        assert_eq!(
            g.get("k").and_then(MetaValue::as_array).map(<[_]>::len),
            Some(1 << 24)
        );
    }

    #[test]
    fn deep_array_nesting_is_rejected() {
        let mut b = header(3, 0, 1);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'k');
        b.extend_from_slice(&vt::ARRAY.to_le_bytes());
        for _ in 0..20 {
            b.extend_from_slice(&vt::ARRAY.to_le_bytes());
            b.extend_from_slice(&1u64.to_le_bytes());
        }
        b.extend_from_slice(&[0u8; 64]);
        let m = msg(GgufFile::from_bytes("t.gguf", b).unwrap_err());
        assert!(m.contains("nested"), "{m}");
    }

    #[test]
    fn meta_value_accessors() {
        assert_eq!(MetaValue::I32(-1).as_u64(), None);
        assert_eq!(MetaValue::I32(7).as_u64(), Some(7));
        assert_eq!(MetaValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(MetaValue::U8(3).as_f64(), Some(3.0));
        assert_eq!(MetaValue::F32(0.5).as_u64(), None);
        assert_eq!(MetaValue::Bool(true).as_bool(), Some(true));
        assert_eq!(MetaValue::String("a".into()).as_str(), Some("a"));
        assert_eq!(MetaValue::Array(vec![]).as_array().map(<[_]>::len), Some(0));
        assert_eq!(MetaValue::F64(1.0).type_name(), "f64");
        let long = MetaValue::Array((0..100u32).map(MetaValue::U32).collect());
        assert_eq!(long.to_string(), "[100 items of u32]");
        let short = MetaValue::Array(vec![MetaValue::U8(1), MetaValue::U8(2)]);
        assert_eq!(short.to_string(), "[1, 2]");
    }
}
