//! Quantized matrix-vector and matrix-matrix products on the CPU, with `f32` activations.
//!
//! A [`QMatrix`] borrows a row-major weight matrix `W[rows][cols]` in its GGUF encoding (usually
//! straight from the memory-mapped model file) and computes `y = W·x` for one token
//! ([`QMatrix::matvec`]) or for a batch of tokens ([`QMatrix::matmul`], the prefill path). Weights
//! stay quantized in memory; each block is expanded to `f32` inside SIMD registers and multiplied
//! by the unquantized `f32` activations, so the result is the exact product of the dequantized
//! weights with `x` up to `f32` summation order, while memory traffic stays at the quantized size.
//!
//! * Q4_0, Q4_1, Q8_0, F32, F16, BF16: fused AVX2/FMA kernels (picked at run time) and a portable
//!   scalar fallback that computes the same sums. Each 32-weight block is expanded in registers
//!   with the format's own formula (`d·(q − 8)`, `d·q + m` as one FMA, `d·q`, or a plain
//!   conversion) and multiplied with the activations; nothing is rounded except by `f32`
//!   arithmetic, and activations are never quantized.
//! * Q4_K, Q5_K, Q6_K: each row is dequantized once (with [`crate::quant::dequantize`]) into a
//!   scratch buffer and multiplied with the `f32` kernel.
//!
//! Rows are split over the threads of a [`ThreadPool`] ([`ThreadPool::global`] unless a pool is
//! given). `matmul` processes tokens in tiles of up to 8, so every weight block is unpacked once
//! per tile instead of once per token. Setting `FREEKV_NO_SIMD=1` forces the scalar kernels.
//!
//! ```
//! use freekv_model::qmatmul::QMatrix;
//! use freekv_model::{GgmlType, quant};
//! let w: Vec<f32> = (0..3 * 64).map(|i| (i % 7) as f32 - 3.0).collect();
//! let bytes = quant::quantize(GgmlType::Q8_0, &w).unwrap();
//! let m = QMatrix::new(GgmlType::Q8_0, 3, 64, &bytes).unwrap();
//! let x: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
//! let mut y = vec![0.0f32; 3];
//! m.matvec(&x, &mut y).unwrap();
//! // exactly the product with the dequantized weights, up to f32 rounding
//! let wq = quant::dequantize_to_vec(GgmlType::Q8_0, &bytes, 3 * 64).unwrap();
//! for r in 0..3 {
//!     let want: f64 = (0..64).map(|c| wq[r * 64 + c] as f64 * x[c] as f64).sum();
//!     assert!((y[r] as f64 - want).abs() < 1e-5 * want.abs().max(1.0));
//! }
//! ```

#[path = "parallel.rs"]
pub mod parallel;

#[cfg(target_arch = "x86_64")]
mod avx2;
mod scalar;

use std::ops::Range;
use std::sync::{Mutex, OnceLock};

use crate::error::ModelError;
use crate::ggml::GgmlType;
use parallel::ThreadPool;

/// The environment variable that, set to anything but `0` or empty, forces the scalar kernels.
pub const NO_SIMD_ENV: &str = "FREEKV_NO_SIMD";

/// Token-tile size of the prefill kernels: each weight block is unpacked once per tile.
pub const TILE: usize = 8;

/// Below this many multiply-adds a product runs on the calling thread only.
const PARALLEL_MIN_MACS: usize = 32 * 1024;

/// Elements per block of the 32-element formats (and the step of the float kernels).
const QK: usize = 32;

/// Which family of kernels computes the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust; runs everywhere.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
}

impl Isa {
    /// Whether this CPU can run the kernels of `self`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => avx2_detected(),
        }
    }

    /// The best kernels this CPU supports, ignoring `FREEKV_NO_SIMD`.
    pub fn best() -> Isa {
        if avx2_detected() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// The kernels used by [`QMatrix::matvec`] and [`QMatrix::matmul`]: [`Isa::best`] unless
    /// `FREEKV_NO_SIMD` asks for the scalar ones. Decided once per process.
    pub fn active() -> Isa {
        static ACTIVE: OnceLock<Isa> = OnceLock::new();
        *ACTIVE.get_or_init(|| Isa::from_env(std::env::var(NO_SIMD_ENV).ok().as_deref()))
    }

    /// The kernels for a value of `FREEKV_NO_SIMD` (`None`, empty or `0`: [`Isa::best`]).
    pub fn from_env(no_simd: Option<&str>) -> Isa {
        match no_simd.map(str::trim) {
            None | Some("") | Some("0") => Isa::best(),
            Some(_) => Isa::Scalar,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_detected() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_detected() -> bool {
    false
}

/// Rows `rows` of a matrix (`data`, `row_bytes` bytes per row, `cols` columns) against a tile of
/// tokens `x` (`T·cols` floats, `T` fixed per kernel): `y[j·y_stride + r] = Σ_c W[r][c]·x[j·cols + c]`.
///
/// Safety contract: `data` holds the rows, `x` the tile, `y` is writable and not otherwise accessed
/// at those indices, and the kernel's CPU features are present.
type RowsFn = unsafe fn(&[u8], usize, Range<usize>, &[f32], usize, *mut f32, usize);

/// The tile size for `left` remaining tokens: 8 (`TILE`), 4, 2 or 1.
fn tile_len(left: usize) -> usize {
    match left {
        l if l >= TILE => TILE,
        l if l >= 4 => 4,
        l if l >= 2 => 2,
        _ => 1,
    }
}

/// The fused kernel for `ty` on `isa` and a tile of `t` ∈ {1, 2, 4, 8} tokens, or `None` for the
/// types that go through a dequantized row.
fn kernel(ty: GgmlType, isa: Isa, t: usize) -> Option<RowsFn> {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        use avx2 as k;
        // Few tokens get several accumulators each, so their FMA chains do not serialize.
        fn pick<B: k::Block>(t: usize) -> RowsFn {
            match t {
                8 => k::rows::<B, 8, 1>,
                4 => k::rows::<B, 4, 1>,
                2 => k::rows::<B, 2, 2>,
                _ => k::rows::<B, 1, 4>,
            }
        }
        return match ty {
            GgmlType::F32 => Some(pick::<k::F32>(t)),
            GgmlType::F16 => Some(pick::<k::F16>(t)),
            GgmlType::BF16 => Some(pick::<k::BF16>(t)),
            GgmlType::Q4_0 => Some(pick::<k::Q4_0>(t)),
            GgmlType::Q4_1 => Some(pick::<k::Q4_1>(t)),
            GgmlType::Q8_0 => Some(pick::<k::Q8_0>(t)),
            _ => None,
        };
    }
    let _ = isa;
    use scalar as k;
    fn pick<B: k::Block>(t: usize) -> RowsFn {
        match t {
            8 => k::rows::<B, 8>,
            4 => k::rows::<B, 4>,
            2 => k::rows::<B, 2>,
            _ => k::rows::<B, 1>,
        }
    }
    match ty {
        GgmlType::F32 => Some(pick::<k::F32>(t)),
        GgmlType::F16 => Some(pick::<k::F16>(t)),
        GgmlType::BF16 => Some(pick::<k::BF16>(t)),
        GgmlType::Q4_0 => Some(pick::<k::Q4_0>(t)),
        GgmlType::Q4_1 => Some(pick::<k::Q4_1>(t)),
        GgmlType::Q8_0 => Some(pick::<k::Q8_0>(t)),
        _ => None,
    }
}

/// The types [`QMatrix`] accepts.
pub fn is_supported(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

/// A borrowed row-major weight matrix `W[rows][cols]` in one of the supported ggml encodings.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: &'a [u8],
}

/// `y` as shared by the threads of one product; each thread writes only its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint elements (distinct rows) and the owner waits for all of them.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl<'a> QMatrix<'a> {
    /// Wraps `data`, the `rows × cols` matrix in `ty`'s encoding (row-major, `cols` contiguous).
    ///
    /// Errors when the type is not supported, a dimension is zero, `cols` is not a whole number of
    /// blocks, or `data` is not exactly `rows` rows long.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, ModelError> {
        if !is_supported(ty) {
            return Err(ModelError::Shape(format!(
                "matrix products over {ty} weights are not supported"
            )));
        }
        if rows == 0 || cols == 0 {
            return Err(ModelError::Shape(format!(
                "a {rows}×{cols} {ty} matrix is empty"
            )));
        }
        let row_bytes = ty.bytes_for(cols as u64).ok_or_else(|| {
            ModelError::Shape(format!(
                "a {ty} matrix needs a column count that is a multiple of {}, got {cols}",
                ty.block_elems()
            ))
        })?;
        let need = (row_bytes as u128) * (rows as u128);
        if need != data.len() as u128 {
            return Err(ModelError::Shape(format!(
                "a {rows}×{cols} {ty} matrix needs {need} bytes, got {}",
                data.len()
            )));
        }
        // `need` fits in usize because it equals `data.len()`.
        Ok(Self {
            ty,
            rows,
            cols,
            row_bytes: row_bytes as usize,
            data,
        })
    }

    /// The weight encoding.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Number of rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The encoded bytes of the whole matrix.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// Encoded bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    fn row(&self, r: usize) -> Option<&'a [u8]> {
        self.data
            .get(r.checked_mul(self.row_bytes)?..)?
            .get(..self.row_bytes)
    }

    /// Dequantizes row `r` into `out` (`cols` floats): an embedding lookup.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) -> Result<(), ModelError> {
        let row = self.row(r).ok_or_else(|| {
            ModelError::Shape(format!(
                "row {r} is out of range for a matrix of {} rows",
                self.rows
            ))
        })?;
        if out.len() != self.cols {
            return Err(ModelError::Shape(format!(
                "row output has {} floats, the matrix has {} columns",
                out.len(),
                self.cols
            )));
        }
        crate::quant::dequantize(self.ty, row, out)
    }

    /// `y[r] = Σ_c W[r][c]·x[c]` (`x`: `cols` floats, `y`: `rows` floats), on the global pool with
    /// the [`Isa::active`] kernels.
    pub fn matvec(&self, x: &[f32], y: &mut [f32]) -> Result<(), ModelError> {
        self.matmul_with(ThreadPool::global(), Isa::active(), x, 1, y)
    }

    /// [`QMatrix::matvec`] on a given pool with given kernels.
    pub fn matvec_with(
        &self,
        pool: &ThreadPool,
        isa: Isa,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), ModelError> {
        self.matmul_with(pool, isa, x, 1, y)
    }

    /// `Y = X·Wᵀ` for `n` tokens: `X` is `n × cols` row-major, `Y` is `n × rows` row-major, i.e.
    /// `y[t·rows + r] = Σ_c W[r][c]·x[t·cols + c]`. On the global pool with the [`Isa::active`]
    /// kernels.
    pub fn matmul(&self, x: &[f32], n: usize, y: &mut [f32]) -> Result<(), ModelError> {
        self.matmul_with(ThreadPool::global(), Isa::active(), x, n, y)
    }

    /// [`QMatrix::matmul`] on a given pool with given kernels. Errors when `isa` is not supported
    /// by this CPU or the slice lengths do not match.
    pub fn matmul_with(
        &self,
        pool: &ThreadPool,
        isa: Isa,
        x: &[f32],
        n: usize,
        y: &mut [f32],
    ) -> Result<(), ModelError> {
        matmul_many_with(pool, isa, std::slice::from_ref(self), x, n, &mut [y])
    }

    /// Computes rows `range` of every token into `out`, tile by tile.
    ///
    /// # Safety
    /// `out` points to `n·rows` writable floats of which no other thread accesses the rows in
    /// `range`, `x.len() == n·cols`, and the kernels of `isa` are supported.
    unsafe fn rows_job(
        &self,
        isa: Isa,
        range: Range<usize>,
        x: &[f32],
        n: usize,
        out: OutPtr,
    ) -> Result<(), ModelError> {
        if kernel(self.ty, isa, 1).is_none() {
            // SAFETY: forwarded contract.
            return unsafe { self.rows_job_dequant(isa, range, x, n, out) };
        }
        if range.end > self.rows {
            return Err(ModelError::Shape(format!("rows {range:?} out of range")));
        }
        let cols = self.cols;
        let mut t0 = 0;
        while t0 < n {
            let t = tile_len(n - t0);
            let f = kernel(self.ty, isa, t)
                .ok_or_else(|| ModelError::Config(format!("no kernel for {}", self.ty)))?;
            let xt = x
                .get(t0 * cols..(t0 + t) * cols)
                .ok_or_else(|| ModelError::Shape("input shorter than its token count".into()))?;
            // SAFETY: `data` holds all rows (checked in `new`), `xt` the tile's `t` tokens, and the
            // tile's outputs `(t0 + j)·rows + r` lie in `y` and belong to this range (contract).
            unsafe {
                f(
                    self.data,
                    self.row_bytes,
                    range.clone(),
                    xt,
                    cols,
                    out.get().add(t0 * self.rows),
                    self.rows,
                )
            };
            t0 += t;
        }
        Ok(())
    }

    /// The path for types without a fused kernel: dequantize each row once (with
    /// [`crate::quant::dequantize`]), then run the `f32` kernel over all tokens.
    ///
    /// # Safety
    /// As [`QMatrix::rows_job`].
    unsafe fn rows_job_dequant(
        &self,
        isa: Isa,
        range: Range<usize>,
        x: &[f32],
        n: usize,
        out: OutPtr,
    ) -> Result<(), ModelError> {
        let cols = self.cols;
        let mut w = vec![0.0f32; cols];
        for r in range {
            let row = self
                .row(r)
                .ok_or_else(|| ModelError::Shape(format!("row {r} out of range")))?;
            crate::quant::dequantize(self.ty, row, &mut w)?;
            let wb: &[u8] = bytemuck::cast_slice(&w);
            let mut t0 = 0;
            while t0 < n {
                let t = tile_len(n - t0);
                let f = kernel(GgmlType::F32, isa, t)
                    .ok_or_else(|| ModelError::Config("no f32 kernel".into()))?;
                let xt = x.get(t0 * cols..(t0 + t) * cols).ok_or_else(|| {
                    ModelError::Shape("input shorter than its token count".into())
                })?;
                // SAFETY: `wb` is one f32 row of `cols` elements, `xt` holds `t` tokens, and the
                // outputs `(t0 + j)·rows + r` lie in `y` and belong to this range (contract).
                unsafe {
                    f(
                        wb,
                        4 * cols,
                        0..1,
                        xt,
                        cols,
                        out.get().add(t0 * self.rows + r),
                        self.rows,
                    )
                };
                t0 += t;
            }
        }
        Ok(())
    }
}

/// Several products with the same input in one parallel call, e.g. the Q, K and V projections
/// or the gate and up projections of a layer: `ys[i] = X·mats[i]ᵀ` (`X`: `n × cols`, `ys[i]`:
/// `n × mats[i].rows()`, row-major). One pool handoff instead of one per matrix, and the rows of
/// all matrices are balanced over the threads together. On the global pool with the
/// [`Isa::active`] kernels.
pub fn matmul_many(
    mats: &[QMatrix<'_>],
    x: &[f32],
    n: usize,
    ys: &mut [&mut [f32]],
) -> Result<(), ModelError> {
    matmul_many_with(ThreadPool::global(), Isa::active(), mats, x, n, ys)
}

/// [`matmul_many`] on a given pool with given kernels. Errors when `isa` is not supported by this
/// CPU, the matrices differ in their column count, `mats` and `ys` differ in length, or a slice
/// length does not match.
pub fn matmul_many_with(
    pool: &ThreadPool,
    isa: Isa,
    mats: &[QMatrix<'_>],
    x: &[f32],
    n: usize,
    ys: &mut [&mut [f32]],
) -> Result<(), ModelError> {
    if !isa.is_supported() {
        return Err(ModelError::Config(format!(
            "{isa:?} kernels are not supported by this CPU"
        )));
    }
    if mats.len() != ys.len() {
        return Err(ModelError::Shape(format!(
            "{} matrices but {} outputs",
            mats.len(),
            ys.len()
        )));
    }
    let Some(first) = mats.first() else {
        return Ok(());
    };
    let (cols, ty) = (first.cols, first.ty);
    if n.checked_mul(cols) != Some(x.len()) {
        return Err(ModelError::Shape(format!(
            "input has {} floats, expected {n} tokens × {cols} columns",
            x.len()
        )));
    }
    // Row offsets of each matrix in the concatenated row space.
    let mut offsets = Vec::with_capacity(mats.len() + 1);
    offsets.push(0usize);
    for (m, y) in mats.iter().zip(ys.iter()) {
        if m.cols != cols {
            return Err(ModelError::Shape(format!(
                "matrices of {} and {cols} columns in one product",
                m.cols
            )));
        }
        if n.checked_mul(m.rows) != Some(y.len()) {
            return Err(ModelError::Shape(format!(
                "output has {} floats, expected {n} tokens × {} rows",
                y.len(),
                m.rows
            )));
        }
        let last = offsets.last().copied().unwrap_or_default();
        offsets.push(last + m.rows); // cannot overflow: each y holds n·rows floats
    }
    let total = offsets.last().copied().unwrap_or_default();
    if n == 0 {
        return Ok(());
    }
    let _span = if n == 1 {
        tracing::trace_span!("matvec", %ty, rows = total, cols).entered()
    } else {
        tracing::debug_span!("matmul", %ty, rows = total, cols, n).entered()
    };
    let outs: Vec<OutPtr> = ys.iter_mut().map(|y| OutPtr(y.as_mut_ptr())).collect();
    let err: Mutex<Option<ModelError>> = Mutex::new(None);
    let job = |range: Range<usize>| {
        for ((m, out), w) in mats.iter().zip(&outs).zip(offsets.windows(2)) {
            let (lo, hi) = (w[0], w[1]);
            let (s, e) = (range.start.max(lo), range.end.min(hi));
            if s >= e {
                continue;
            }
            // SAFETY: `out` has `n·rows` floats (checked above); each concatenated row index is in
            // exactly one range, so no two threads write the same element; `ys` outlive the call.
            if let Err(e) = unsafe { m.rows_job(isa, s - lo..e - lo, x, n, *out) } {
                let mut slot = err.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(e);
            }
        }
    };
    if total.saturating_mul(cols).saturating_mul(n) < PARALLEL_MIN_MACS {
        job(0..total);
    } else {
        pool.for_each_chunk(total, &job);
    }
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_validates_sizes() {
        let data = vec![0u8; 2 * 20];
        assert!(QMatrix::new(GgmlType::Q4_1, 2, 32, &data).is_ok());
        assert!(QMatrix::new(GgmlType::Q4_1, 2, 33, &data).is_err());
        assert!(QMatrix::new(GgmlType::Q4_1, 3, 32, &data).is_err());
        assert!(QMatrix::new(GgmlType::Q4_1, 0, 32, &[]).is_err());
        assert!(QMatrix::new(GgmlType::Q4_1, 1, 0, &[]).is_err());
        assert!(QMatrix::new(GgmlType::Q5_0, 1, 32, &[0u8; 22]).is_err());
        assert!(QMatrix::new(GgmlType::F32, usize::MAX, 2, &data).is_err());
    }

    #[test]
    fn env_parsing() {
        assert_eq!(Isa::from_env(Some("1")), Isa::Scalar);
        assert_eq!(Isa::from_env(Some("yes")), Isa::Scalar);
        assert_eq!(Isa::from_env(Some("0")), Isa::best());
        assert_eq!(Isa::from_env(Some("")), Isa::best());
        assert_eq!(Isa::from_env(None), Isa::best());
    }
}
