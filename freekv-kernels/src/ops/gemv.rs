//! Skinny matrix products for decode steps (1 to [`GEMV_MAX_TOKENS`] token rows) and fused
//! decode-step kernels (`kernels/gemv.cu`).
//!
//! At decode time a linear layer `y[t, o] = Σ_i x[t, i] · w[o, i]` with a handful of token rows
//! is a pure weight stream: these kernels read every weight byte once, 16 bytes per load, for
//! all token rows at once, with fp32 accumulation. Besides the plain product (optionally
//! accumulating into `y`, which fuses a residual add) they offer two decode fusions:
//!
//! * [`GemvKernels::rmsnorm_linear`]: `y = rmsnorm(x) · wᵀ` without a normalised copy of `x`
//!   (the norm's per-row scale factors out of the product, so each block sums `x²` while it reads
//!   `x`);
//! * [`GemvKernels::rmsnorm_swiglu`]: `out = silu(a) · b` with `[a | b] = rmsnorm(x) · [gate | up]ᵀ`
//!   (the fused gate-up projection, normalisation and SwiGLU in one launch);
//! * [`GemvKernels::rope_kv_append`]: RoPE on Q and K and the KV append into NHD pages in one
//!   launch, bit-identical to [`Kernels::rope`] followed by [`Kernels::kv_append`].
//!
//! Two kernel families: CUDA-core kernels for 1 and 2 token rows (each block streams a few weight
//! rows; all threads split k), and tensor-core kernels (`mma.sync` m16n8k16, the token rows as the
//! N = 8 columns) for 3 to 8 rows, where fp32 FMAs would run out of issue slots.
//!
//! Constraints, checked on the host ([`gemv_supported`], [`gemv_aligned`]): `in_features` a
//! multiple of 8, `x`, `w` (and the norm weight) 16-byte aligned; callers fall back to cuBLAS
//! otherwise. The module is part of [`Kernels`] ([`Kernels::gemv`]); [`GemvKernels::for_stream`]
//! loads a copy for code that only holds a stream.
//!
//! Programmatic dependent launch (opt-in, [`GemvKernels::set_pdl`] or `FREEKV_GEMV_PDL=1`): the
//! kernels may then start while the previous kernel of the stream drains, loading their first
//! weights (never written during a step) before they wait for it; the activations are read and
//! the outputs written only after the wait. Results are bit-identical; on the H200 it gained
//! nothing measurable in a CUDA graph (Llama-3.1-8B decode step 4.79 ms without, 4.82 with), so
//! it is off by default.
//!
//! ```no_run
//! # fn main() -> Result<(), freekv_kernels::KernelError> {
//! use freekv_kernels::{Gpu, LinearDims};
//! use freekv_kernels::half::bf16;
//!
//! let gpu = Gpu::new(0)?;
//! let s = gpu.stream();
//! let (t, k, n) = (1, 4096, 4096);
//! let x = s.alloc_zeros::<bf16>(t * k).unwrap();
//! let w = s.alloc_zeros::<bf16>(n * k).unwrap();
//! let mut y = s.alloc_zeros::<bf16>(t * n).unwrap();
//! let dims = LinearDims { tokens: t, in_features: k, out_features: n };
//! gpu.kernels().gemv().linear(s, &x, &w, &mut y, dims, false)?;
//! # Ok(())
//! # }
//! ```

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig,
    PushKernelArg,
};
use freekv_layout::PageGeometry;
use half::bf16;

use crate::gemm::LinearDims;
use crate::kernels::{Kernels, check_len, func, grid_dim, mul, row_threads, u32_arg};
use crate::ops::elementwise::{PageTableLayout, RopeConfig, RopeStyle};
use crate::{KernelError, compile, probe};

/// Most token rows one launch serves.
pub const GEMV_MAX_TOKENS: usize = 8;
/// Most threads per block (the kernels' reduction scratch holds 8 warps).
pub const GEMV_MAX_THREADS: u32 = 256;
/// Token-row tiles the kernels are compiled for (a launch uses the smallest tile ≥ its rows).
pub const GEMV_TILES: [usize; 4] = [1, 2, 4, 8];
/// Weight rows per block of the CUDA-core kernels (8 only for tiles of 1 and 2 rows).
pub const GEMV_ROWS_PER_BLOCK: [usize; 3] = [2, 4, 8];
/// [`GemvConfig::rows_per_block`] value that selects the tensor-core kernels (16 weight rows per
/// block, any token count up to 8).
pub const GEMV_MMA_ROWS: usize = 16;
/// Token rows up to which the `gemv` kernels beat cuBLAS on the whole decode step (measured on an
/// H200 at Llama-3.1-8B's shapes: batch 1 step 5.19 → 4.79 ms; at 8 rows the tensor-core kernels
/// lose to cuBLAS, 7.23 → 7.67 ms). Callers choosing between the two should use cuBLAS above it.
pub const GEMV_PREFERRED_MAX_TOKENS: usize = 2;
/// Environment variable: `1` turns programmatic dependent launch on for new [`GemvKernels`].
pub const GEMV_PDL_ENV: &str = "FREEKV_GEMV_PDL";

const MAX_GRID_X: u32 = i32::MAX as u32;
const FLAG_ACCUMULATE: u32 = 1;
const FLAG_F32_OUT: u32 = 2;

/// The three product kernels of the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain = 0,
    Norm = 1,
    Swiglu = 2,
}

impl Mode {
    fn prefix(self) -> &'static str {
        match self {
            Mode::Plain => "gemv",
            Mode::Norm => "gemv_norm",
            Mode::Swiglu => "gemv_swiglu",
        }
    }
    fn kernel(self) -> &'static str {
        match self {
            Mode::Plain => "gemv",
            Mode::Norm => "gemv_norm",
            Mode::Swiglu => "gemv_swiglu",
        }
    }
}

fn tile_index(tokens: usize) -> Option<usize> {
    GEMV_TILES.iter().position(|&t| t >= tokens)
}

fn rows_index(rows_per_block: usize) -> Option<usize> {
    GEMV_ROWS_PER_BLOCK
        .iter()
        .position(|&r| r == rows_per_block)
}

/// Whether a kernel with this token tile and rows per block is compiled.
fn compiled(tile: usize, rows_per_block: usize) -> bool {
    rows_per_block == GEMV_MMA_ROWS
        || (rows_index(rows_per_block).is_some() && (rows_per_block != 8 || tile <= 2))
}

/// Output columns one block produces.
fn cols_per_block(mode: Mode, rows_per_block: usize) -> usize {
    match mode {
        Mode::Swiglu => rows_per_block / 2,
        _ => rows_per_block,
    }
}

/// Launch shape of a product: weight rows per block and threads per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvConfig {
    /// Weight rows one block reads: one of [`GEMV_ROWS_PER_BLOCK`] (CUDA-core kernels; 8 only up
    /// to 2 tokens) or [`GEMV_MMA_ROWS`] (tensor-core kernels). In the SwiGLU product half of them
    /// are gate rows and half the matching up rows.
    pub rows_per_block: usize,
    /// Threads per block: a multiple of 32 in `32..=256`.
    pub threads: u32,
}

impl GemvConfig {
    /// The default shape for `tokens` rows, `in_features` columns and `out_cols` output columns
    /// (chosen from a sweep of every compiled shape on an H200 at Llama-3.1-8B's products).
    fn pick(tokens: usize, in_features: usize, out_cols: usize) -> Self {
        if tokens > 2 {
            return Self {
                rows_per_block: GEMV_MMA_ROWS,
                threads: 256,
            };
        }
        // Small products want many small blocks (the whole matrix requested at once), large
        // ones and long rows bigger blocks; never fewer than two 16-byte chunks of k per thread.
        let base = match out_cols {
            _ if in_features >= 8192 => 256,
            0..=8192 => 64,
            8193..=32768 => 128,
            _ => 256,
        };
        let by_k = (in_features / 8).div_ceil(2).div_ceil(32) * 32;
        let rows_per_block = if tokens == 2 && out_cols >= 6144 {
            4
        } else {
            2
        };
        Self {
            rows_per_block,
            threads: base.min(by_k).max(32) as u32,
        }
    }

    /// The default shape of a plain (or RMSNorm) product.
    pub fn auto(dims: LinearDims) -> Self {
        Self::pick(dims.tokens, dims.in_features, dims.out_features)
    }

    /// The default shape of a SwiGLU product with `ff` output columns.
    pub fn auto_swiglu(tokens: usize, in_features: usize, ff: usize) -> Self {
        Self::pick(tokens, in_features, ff)
    }

    /// Every compiled shape for `tokens` rows: the CUDA-core kernels with 64, 128 or 256 threads
    /// and the tensor-core kernels with 128 or 256 (for tuning sweeps).
    pub fn candidates(tokens: usize) -> Vec<Self> {
        let Some(ti) = tile_index(tokens) else {
            return Vec::new();
        };
        let tile = GEMV_TILES[ti];
        let mut v = Vec::new();
        for r in GEMV_ROWS_PER_BLOCK {
            if !compiled(tile, r) {
                continue;
            }
            for threads in [64u32, 128, 256] {
                v.push(Self {
                    rows_per_block: r,
                    threads,
                });
            }
        }
        for threads in [128u32, 256] {
            v.push(Self {
                rows_per_block: GEMV_MMA_ROWS,
                threads,
            });
        }
        v
    }
}

/// Output element types of the products: bf16 (rounded from the fp32 accumulator) or f32.
pub trait GemvOut: DeviceRepr + sealed::Sealed {
    /// True for f32 outputs.
    const F32: bool;
}
impl GemvOut for bf16 {
    const F32: bool = false;
}
impl GemvOut for f32 {
    const F32: bool = true;
}
mod sealed {
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for f32 {}
}

/// Whether the GEMV kernels serve a product of these sizes: 1 to [`GEMV_MAX_TOKENS`] tokens,
/// `in_features` a non-zero multiple of 8, `out_features` non-zero, both within `u32`. Pointer
/// alignment is the other condition ([`gemv_aligned`]).
pub fn gemv_supported(dims: LinearDims) -> bool {
    (1..=GEMV_MAX_TOKENS).contains(&dims.tokens)
        && dims.in_features > 0
        && dims.in_features.is_multiple_of(8)
        && dims.out_features > 0
        && u32::try_from(dims.in_features).is_ok()
        && u32::try_from(dims.out_features).is_ok()
}

/// Whether a device address meets the kernels' 16-byte alignment (`x`, `w`, norm weight).
pub fn gemv_aligned(addr: u64) -> bool {
    addr.is_multiple_of(16)
}

/// Where Q, K and V sit in each row of a fused QKV buffer (row `t` starts at element
/// `t · row_stride`; offsets are elements from the start of a row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvRows {
    /// Tokens (rows).
    pub tokens: usize,
    /// Query heads (`head_dim` elements each) at `q_offset`.
    pub q_heads: usize,
    /// Elements from one row to the next.
    pub row_stride: usize,
    /// First element of the Q heads within a row.
    pub q_offset: usize,
    /// First element of the K heads (`geom.kv_heads` of them) within a row.
    pub k_offset: usize,
    /// First element of the V heads within a row.
    pub v_offset: usize,
}

impl QkvRows {
    /// The usual fused layout `[Q | K | V]` of `q_heads` and `kv_heads` heads of `head_dim`.
    pub fn fused(tokens: usize, q_heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        let (qd, kvd) = (q_heads * head_dim, kv_heads * head_dim);
        Self {
            tokens,
            q_heads,
            row_stride: qd + 2 * kvd,
            q_offset: 0,
            k_offset: qd,
            v_offset: qd + kvd,
        }
    }
}

/// The functions of the `gemv` module.
#[derive(Debug)]
pub struct GemvKernels {
    /// `[mode][tile index][rows-per-block index]`, `None` where not compiled.
    products: [[[Option<CudaFunction>; 3]; 4]; 3],
    /// Tensor-core kernels, `[mode]`.
    mma: [CudaFunction; 3],
    rope_kv_append: CudaFunction,
    sm_count: u32,
    pdl: AtomicBool,
}

/// Device pointers and lengths (elements) of one product launch.
struct Operands {
    x: (u64, usize),
    w: (u64, usize),
    g: (u64, usize),
    y: (u64, usize),
}

/// Whether the device byte ranges `[a, a + a_bytes)` and `[b, b + b_bytes)` intersect (empty
/// ranges never do).
pub(crate) fn overlaps(a: u64, a_bytes: u64, b: u64, b_bytes: u64) -> bool {
    a_bytes > 0 && b_bytes > 0 && a < b.saturating_add(b_bytes) && b < a.saturating_add(a_bytes)
}

impl GemvKernels {
    /// Resolves every function of the loaded `gemv` module.
    pub(crate) fn resolve(m: &Arc<CudaModule>, sm_count: u32) -> Result<Self, KernelError> {
        let mut products: [[[Option<CudaFunction>; 3]; 4]; 3] = Default::default();
        for (mode, table) in [Mode::Plain, Mode::Norm, Mode::Swiglu]
            .into_iter()
            .zip(products.iter_mut())
        {
            for (tile, row) in GEMV_TILES.into_iter().zip(table.iter_mut()) {
                for (r, slot) in GEMV_ROWS_PER_BLOCK.into_iter().zip(row.iter_mut()) {
                    if compiled(tile, r) {
                        *slot = Some(func(m, &format!("{}_t{tile}_r{r}", mode.prefix()))?);
                    }
                }
            }
        }
        let pdl = std::env::var(GEMV_PDL_ENV).is_ok_and(|v| v.trim() == "1");
        Ok(Self {
            products,
            mma: [
                func(m, "gemv_mma")?,
                func(m, "gemv_norm_mma")?,
                func(m, "gemv_swiglu_mma")?,
            ],
            rope_kv_append: func(m, "rope_kv_append_bf16")?,
            sm_count: sm_count.max(1),
            pdl: AtomicBool::new(pdl),
        })
    }

    /// Compiles (or takes from the process and disk caches) the `gemv` module for the device of
    /// `stream` and loads it into that device's context: for code that holds a stream but no
    /// [`Kernels`]. Never panics: a missing NVRTC or toolkit headers is an error.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn for_stream(stream: &CudaStream) -> Result<Self, KernelError> {
        let ctx = stream.context();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(KernelError::driver("compute capability"))?;
        let nvrtc = probe::nvrtc_version()?;
        let include_dirs = compile::resolve_include_dirs()?;
        let cache_dir = compile::default_cache_dir();
        let (cubin, _src) = compile::module_cubin(
            &compile::GEMV,
            &format!("sm_{major}{minor}"),
            nvrtc,
            &include_dirs,
            cache_dir.as_deref(),
        )?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.as_ref().clone()))
            .map_err(KernelError::driver("loading module gemv"))?;
        let sm = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(KernelError::driver("multiprocessor count"))?;
        Self::resolve(&module, sm.max(1) as u32)
    }

    /// Multiprocessors of the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Turns programmatic dependent launch on or off for later launches (initially off unless
    /// `FREEKV_GEMV_PDL=1`). With it, a launch may overlap the tail of the previous kernel in the
    /// stream (also inside CUDA graphs); results are identical either way.
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on, Ordering::Relaxed);
    }

    /// Whether programmatic dependent launch is on.
    pub fn pdl(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }

    /// `y = x · wᵀ` (`accumulate`: `y += x · wᵀ`, e.g. a residual add) for `dims.tokens` ≤ 8
    /// rows; `x` `[tokens, in]`, `w` `[out, in]`, `y` `[tokens, out]`, all row-major and
    /// contiguous; fp32 accumulation. Errors (never launches) when the shape or the alignment is
    /// unsupported ([`gemv_supported`], [`gemv_aligned`]) or `y` overlaps `x` or `w`.
    pub fn linear<O: GemvOut>(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<O>,
        dims: LinearDims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        self.linear_with(stream, x, w, y, dims, accumulate, GemvConfig::auto(dims))
    }

    /// [`linear`](Self::linear) with an explicit launch shape.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_with<O: GemvOut>(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<O>,
        dims: LinearDims,
        accumulate: bool,
        cfg: GemvConfig,
    ) -> Result<(), KernelError> {
        let (xp, _gx) = x.device_ptr(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let y_len = y.len();
        let (yp, _gy) = y.device_ptr_mut(stream);
        let ops = Operands {
            x: (xp, x.len()),
            w: (wp, w.len()),
            g: (0, 0),
            y: (yp, y_len),
        };
        self.launch(
            Mode::Plain,
            stream,
            &ops,
            dims,
            O::F32,
            accumulate,
            0.0,
            cfg,
        )
    }

    /// `y = rmsnorm(x) · wᵀ` with `rmsnorm(x)[t, i] = x[t, i] · norm_weight[i] /
    /// sqrt(mean_i x[t, i]² + eps)`, in one pass (no normalised copy of `x`); shapes and
    /// constraints as [`linear`](Self::linear), `norm_weight` `[in]` and 16-byte aligned.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_linear<O: GemvOut>(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<bf16>,
        norm_weight: &impl DevicePtr<bf16>,
        eps: f32,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<O>,
        dims: LinearDims,
    ) -> Result<(), KernelError> {
        let (xp, _gx) = x.device_ptr(stream);
        let (gp, _gg) = norm_weight.device_ptr(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let y_len = y.len();
        let (yp, _gy) = y.device_ptr_mut(stream);
        let ops = Operands {
            x: (xp, x.len()),
            w: (wp, w.len()),
            g: (gp, norm_weight.len()),
            y: (yp, y_len),
        };
        let cfg = GemvConfig::auto(dims);
        self.launch(Mode::Norm, stream, &ops, dims, O::F32, false, eps, cfg)
    }

    /// `out[t, j] = silu(a[t, j]) · b[t, j]` with `a = rmsnorm(x) · w[j]` and
    /// `b = rmsnorm(x) · w[ff + j]`: the normalisation, the fused gate-up projection and SwiGLU in
    /// one launch. `w_gate_up` is `[2·ff, in]` (gate rows, then up rows), `out` `[tokens, ff]`
    /// bf16; `dims.out_features` is `ff`. Constraints as [`rmsnorm_linear`](Self::rmsnorm_linear).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_swiglu(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<bf16>,
        norm_weight: &impl DevicePtr<bf16>,
        eps: f32,
        w_gate_up: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        dims: LinearDims,
    ) -> Result<(), KernelError> {
        let (xp, _gx) = x.device_ptr(stream);
        let (gp, _gg) = norm_weight.device_ptr(stream);
        let (wp, _gw) = w_gate_up.device_ptr(stream);
        let y_len = out.len();
        let (yp, _gy) = out.device_ptr_mut(stream);
        let ops = Operands {
            x: (xp, x.len()),
            w: (wp, w_gate_up.len()),
            g: (gp, norm_weight.len()),
            y: (yp, y_len),
        };
        let cfg = GemvConfig::auto_swiglu(dims.tokens, dims.in_features, dims.out_features);
        self.launch(Mode::Swiglu, stream, &ops, dims, false, false, eps, cfg)
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        mode: Mode,
        stream: &CudaStream,
        ops: &Operands,
        dims: LinearDims,
        f32_out: bool,
        accumulate: bool,
        eps: f32,
        cfg: GemvConfig,
    ) -> Result<(), KernelError> {
        let kernel = mode.kernel();
        let _s = tracing::debug_span!(
            "gemv",
            mode = kernel,
            t = dims.tokens,
            i = dims.in_features,
            o = dims.out_features
        )
        .entered();
        let LinearDims {
            tokens: t,
            in_features: k,
            out_features: cols,
        } = dims;
        if t == 0 {
            return Ok(());
        }
        if !gemv_supported(dims) {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "unsupported shape {t}x{k}x{cols}: needs 1..={GEMV_MAX_TOKENS} tokens, in_features a non-zero multiple of 8, out_features > 0"
                ),
            ));
        }
        let w_rows = match mode {
            Mode::Swiglu => mul(kernel, "2 * ff", cols, 2)?,
            _ => cols,
        };
        if mode == Mode::Swiglu && !cfg.rows_per_block.is_multiple_of(2) {
            return Err(KernelError::arg(kernel, "rows_per_block must be even"));
        }
        if mode != Mode::Plain && !(eps.is_finite() && eps >= 0.0) {
            return Err(KernelError::arg(
                kernel,
                format!("eps = {eps} must be finite and >= 0"),
            ));
        }
        if mode == Mode::Swiglu && accumulate {
            return Err(KernelError::arg(
                kernel,
                "no accumulation into a SwiGLU output",
            ));
        }
        let x_n = mul(kernel, "x", t, k)?;
        let w_n = mul(kernel, "w", w_rows, k)?;
        let y_n = mul(kernel, "y", t, cols)?;
        check_len(kernel, "x", ops.x.1, x_n)?;
        check_len(kernel, "w", ops.w.1, w_n)?;
        check_len(kernel, "y", ops.y.1, y_n)?;
        if mode != Mode::Plain {
            check_len(kernel, "norm weight", ops.g.1, k)?;
        }
        for (what, addr) in [("x", ops.x.0), ("w", ops.w.0), ("norm weight", ops.g.0)] {
            if (what != "norm weight" || mode != Mode::Plain) && !gemv_aligned(addr) {
                return Err(KernelError::arg(
                    kernel,
                    format!("{what}: device address {addr:#x} is not 16-byte aligned"),
                ));
            }
        }
        let y_bytes = y_n as u64 * if f32_out { 4 } else { 2 };
        for (what, (p, n)) in [
            ("x", (ops.x.0, x_n)),
            ("w", (ops.w.0, w_n)),
            ("norm weight", ops.g),
        ] {
            if overlaps(ops.y.0, y_bytes, p, 2 * n as u64) {
                return Err(KernelError::arg(kernel, format!("y overlaps {what}")));
            }
        }
        let tile_i = tile_index(t)
            .ok_or_else(|| KernelError::arg(kernel, format!("{t} tokens exceed the tiles")))?;
        let tile = GEMV_TILES[tile_i];
        if !compiled(tile, cfg.rows_per_block) {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "rows_per_block = {} is not compiled for {tile}-token tiles",
                    cfg.rows_per_block
                ),
            ));
        }
        if cfg.threads < 32 || cfg.threads > GEMV_MAX_THREADS || !cfg.threads.is_multiple_of(32) {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "threads = {} must be a multiple of 32 in 32..={GEMV_MAX_THREADS}",
                    cfg.threads
                ),
            ));
        }
        let f = if cfg.rows_per_block == GEMV_MMA_ROWS {
            self.mma.get(mode as usize)
        } else {
            rows_index(cfg.rows_per_block).and_then(|r_i| {
                self.products
                    .get(mode as usize)
                    .and_then(|m| m.get(tile_i))
                    .and_then(|m| m.get(r_i))
                    .and_then(Option::as_ref)
            })
        }
        .ok_or_else(|| KernelError::arg(kernel, "kernel variant not compiled"))?;
        let grid = grid_dim(
            kernel,
            "blocks",
            cols.div_ceil(cols_per_block(mode, cfg.rows_per_block)),
            MAX_GRID_X,
        )?;
        let rows_u = u32_arg(kernel, "tokens", t)?;
        let n_u = u32_arg(kernel, "weight rows", w_rows)?;
        let k_u = u32_arg(kernel, "in_features", k)?;
        let flags =
            if accumulate { FLAG_ACCUMULATE } else { 0 } | if f32_out { FLAG_F32_OUT } else { 0 };
        let launch = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (cfg.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let (y, x, w, g) = (ops.y.0, ops.x.0, ops.w.0, ops.g.0);
        if self.pdl() {
            let mut params: [*mut c_void; 9] = [
                (&y as *const u64).cast_mut().cast(),
                (&x as *const u64).cast_mut().cast(),
                (&w as *const u64).cast_mut().cast(),
                (&g as *const u64).cast_mut().cast(),
                (&rows_u as *const u32).cast_mut().cast(),
                (&n_u as *const u32).cast_mut().cast(),
                (&k_u as *const u32).cast_mut().cast(),
                (&eps as *const f32).cast_mut().cast(),
                (&flags as *const u32).cast_mut().cast(),
            ];
            // SAFETY: `params` points to values matching the kernel signature (pointers as u64),
            // alive for the call; sizes, alignment and aliasing were checked above.
            unsafe { launch_pdl(stream, f, launch, &mut params) }
                .map_err(KernelError::driver(kernel))?;
            return Ok(());
        }
        let mut b = stream.launch_builder(f);
        b.arg(&y)
            .arg(&x)
            .arg(&w)
            .arg(&g)
            .arg(&rows_u)
            .arg(&n_u)
            .arg(&k_u)
            .arg(&eps)
            .arg(&flags);
        // SAFETY: argument types match the kernel signature (pointers as u64); buffer sizes,
        // alignment and aliasing were checked above; the kernel reads rows < n and chunks < k/8.
        unsafe { b.launch(launch) }.map_err(KernelError::driver(kernel))?;
        Ok(())
    }

    /// RoPE on the Q and K heads of each row of `qkv` (in place) and the append of the rotated K
    /// and of V into the NHD page pool, in one launch per step. The same results, bit for bit,
    /// as [`Kernels::rope`] over the Q and K heads followed by [`Kernels::kv_append`]: token `t`
    /// at position `positions[t]` of sequence `token_seq[t]` goes to page
    /// `page_table[seq · stride + pos / page_size]`, slot `pos % page_size`; a token whose
    /// sequence, position or page id is out of range is rotated but not appended.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_kv_append(
        &self,
        stream: &CudaStream,
        qkv: &mut impl DevicePtrMut<bf16>,
        rows: &QkvRows,
        positions: &impl DevicePtr<i32>,
        rope: &RopeConfig<'_>,
        pages: &mut impl DevicePtrMut<bf16>,
        geom: &PageGeometry,
        page_table: &impl DevicePtr<i32>,
        table: &PageTableLayout,
        token_seq: &impl DevicePtr<i32>,
    ) -> Result<(), KernelError> {
        const K: &str = "rope_kv_append_bf16";
        let _s = tracing::debug_span!("rope_kv_append", t = rows.tokens).entered();
        let d = geom.head_dim;
        if d == 0 || !d.is_multiple_of(2) || d > 8192 {
            return Err(KernelError::arg(
                K,
                format!("head_dim = {d} must be even, in 2..=8192"),
            ));
        }
        if geom.kv_heads == 0 || geom.page_size == 0 {
            return Err(KernelError::arg(K, "empty page geometry"));
        }
        if !(rope.theta.is_finite() && rope.theta > 0.0) {
            return Err(KernelError::arg(
                K,
                format!("theta = {} must be finite and > 0", rope.theta),
            ));
        }
        let qw = mul(K, "q_heads * head_dim", rows.q_heads, d)?;
        let kvw = mul(K, "kv_heads * head_dim", geom.kv_heads, d)?;
        let ranges = [
            ("Q", rows.q_offset, qw),
            ("K", rows.k_offset, kvw),
            ("V", rows.v_offset, kvw),
        ];
        let mut row_need = 0usize;
        for &(what, off, width) in &ranges {
            let end = off
                .checked_add(width)
                .ok_or_else(|| KernelError::arg(K, format!("{what}: size overflows")))?;
            if end > rows.row_stride {
                return Err(KernelError::arg(
                    K,
                    format!(
                        "{what} heads end at element {end}, past the row stride {}",
                        rows.row_stride
                    ),
                ));
            }
            row_need = row_need.max(end);
        }
        for (i, &(a, ao, aw)) in ranges.iter().enumerate() {
            for &(b, bo, bw) in &ranges[i + 1..] {
                if overlaps(ao as u64, aw as u64, bo as u64, bw as u64) {
                    return Err(KernelError::arg(K, format!("{a} and {b} heads overlap")));
                }
            }
        }
        if rows.tokens > 0 {
            let need = mul(K, "qkv", rows.tokens - 1, rows.row_stride)?
                .checked_add(row_need)
                .ok_or_else(|| KernelError::arg(K, "qkv: size overflows"))?;
            check_len(K, "qkv", qkv.len(), need)?;
        }
        check_len(K, "positions", positions.len(), rows.tokens)?;
        check_len(K, "token_seq", token_seq.len(), rows.tokens)?;
        if let Some(f) = rope.freq_factors {
            check_len(K, "freq_factors", f.len(), d / 2)?;
        }
        if table.stride == 0 || table.num_seqs == 0 {
            return Err(KernelError::arg(
                K,
                "page table must have at least one row and column",
            ));
        }
        check_len(
            K,
            "page_table",
            page_table.len(),
            mul(K, "page_table", table.num_seqs, table.stride)?,
        )?;
        let num_pages = pages.len() / geom.page_elems();
        if num_pages == 0 {
            return Err(KernelError::arg(
                K,
                format!(
                    "pages buffer ({} elements) holds no whole page",
                    pages.len()
                ),
            ));
        }
        if rows.tokens == 0 {
            return Ok(());
        }
        let grid = grid_dim(K, "tokens", rows.tokens, MAX_GRID_X)?;
        let qh = u32_arg(K, "q_heads", rows.q_heads)?;
        let kvh = u32_arg(K, "kv_heads", geom.kv_heads)?;
        let hd = u32_arg(K, "head_dim", d)?;
        let ps = u32_arg(K, "page_size", geom.page_size)?;
        let np = u32_arg(K, "num_pages", num_pages)?;
        let ts = u32_arg(K, "table stride", table.stride)?;
        let ns = u32_arg(K, "num_seqs", table.num_seqs)?;
        let (stride, qo, ko, vo) = (
            rows.row_stride as u64,
            rows.q_offset as u64,
            rows.k_offset as u64,
            rows.v_offset as u64,
        );
        let theta = rope.theta;
        let neox: u32 = matches!(rope.style, RopeStyle::Neox).into();
        let (xp, _gx) = qkv.device_ptr_mut(stream);
        let (pos, _gpos) = positions.device_ptr(stream);
        let (fp, _gf) = match rope.freq_factors {
            Some(f) => {
                let (p, g) = f.device_ptr(stream);
                (p, Some(g))
            }
            None => (0u64, None),
        };
        let (pp, _gp) = pages.device_ptr_mut(stream);
        let (tp, _gt) = page_table.device_ptr(stream);
        let (sp, _gs) = token_seq.device_ptr(stream);
        let launch = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (
                row_threads((rows.q_heads + geom.kv_heads) * d / 2, 1, 256),
                1,
                1,
            ),
            shared_mem_bytes: (d * 4) as u32,
        };
        if self.pdl() {
            let ptrs = [xp, pos, fp, pp, tp, sp];
            let u32s = [grid, qh, kvh, hd];
            let u64s = [stride, qo, ko, vo];
            let tail = [neox, ps, np, ts, ns];
            let mut params: Vec<*mut c_void> = Vec::with_capacity(20);
            params.extend(
                ptrs.iter()
                    .map(|p| (p as *const u64).cast_mut().cast::<c_void>()),
            );
            params.extend(
                u32s.iter()
                    .map(|p| (p as *const u32).cast_mut().cast::<c_void>()),
            );
            params.extend(
                u64s.iter()
                    .map(|p| (p as *const u64).cast_mut().cast::<c_void>()),
            );
            params.push((&theta as *const f32).cast_mut().cast());
            params.extend(
                tail.iter()
                    .map(|p| (p as *const u32).cast_mut().cast::<c_void>()),
            );
            // SAFETY: `params` follows the kernel's parameter list in order and types, the values
            // live until the call returns; everything was checked above.
            unsafe { launch_pdl(stream, &self.rope_kv_append, launch, &mut params) }
                .map_err(KernelError::driver(K))?;
            return Ok(());
        }
        let mut b = stream.launch_builder(&self.rope_kv_append);
        b.arg(&xp).arg(&pos).arg(&fp).arg(&pp).arg(&tp).arg(&sp);
        b.arg(&grid)
            .arg(&qh)
            .arg(&kvh)
            .arg(&hd)
            .arg(&stride)
            .arg(&qo)
            .arg(&ko)
            .arg(&vo)
            .arg(&theta)
            .arg(&neox)
            .arg(&ps)
            .arg(&np)
            .arg(&ts)
            .arg(&ns);
        // SAFETY: argument types match the kernel signature; row ranges, buffer sizes and the
        // table were checked above; device-side page indices are bounds-checked by the kernel.
        unsafe { b.launch(launch) }.map_err(KernelError::driver(K))?;
        Ok(())
    }
}

/// Launches `f` with programmatic stream serialization allowed (programmatic dependent launch):
/// the kernel may start before the previous kernel in the stream has finished and must
/// `griddepcontrol.wait` before touching anything that kernel produces (every kernel of this
/// module does).
///
/// # Safety
/// `params` must point to one live value per kernel parameter, of the kernel's types, in order.
unsafe fn launch_pdl(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<(), cudarc::driver::DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: plain C data; all-zero is a valid value of every field.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let lc = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: the context is bound; `lc` and `attr` live for the call; the caller guarantees
    // `params` matches the kernel.
    unsafe {
        sys::cuLaunchKernelEx(
            &lc,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
}

impl Kernels {
    /// The skinny products and decode fusions of the `gemv` module.
    pub fn gemv(&self) -> &GemvKernels {
        &self.gemv
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_shapes() {
        assert!(gemv_supported(LinearDims::new(1, 4096, 4096)));
        assert!(gemv_supported(LinearDims::new(8, 8, 1)));
        assert!(!gemv_supported(LinearDims::new(0, 4096, 4096)));
        assert!(!gemv_supported(LinearDims::new(9, 4096, 4096)));
        assert!(!gemv_supported(LinearDims::new(1, 4100, 4096)));
        assert!(!gemv_supported(LinearDims::new(1, 0, 4096)));
        assert!(!gemv_supported(LinearDims::new(1, 4096, 0)));
        assert!(gemv_aligned(0x1000) && !gemv_aligned(0x1002));
    }

    #[test]
    fn auto_shapes_are_compiled_and_sane() {
        for t in 1..=GEMV_MAX_TOKENS {
            for &(k, n) in &[
                (8usize, 1usize),
                (576, 49),
                (4096, 4096),
                (4096, 6144),
                (14336, 4096),
                (4096, 128_256),
            ] {
                let tile = GEMV_TILES[tile_index(t).unwrap()];
                for c in [
                    GemvConfig::auto(LinearDims::new(t, k, n)),
                    GemvConfig::auto_swiglu(t, k, n),
                ] {
                    assert!(compiled(tile, c.rows_per_block), "{t} {k} {n} {c:?}");
                    assert!(c.threads % 32 == 0 && (32..=GEMV_MAX_THREADS).contains(&c.threads));
                }
            }
            for c in GemvConfig::candidates(t) {
                assert!(compiled(
                    GEMV_TILES[tile_index(t).unwrap()],
                    c.rows_per_block
                ));
            }
        }
        assert!(GemvConfig::candidates(9).is_empty());
        // Small k: few threads; small products: small blocks; 3+ tokens: tensor cores.
        assert_eq!(GemvConfig::auto(LinearDims::new(1, 64, 100)).threads, 32);
        assert_eq!(GemvConfig::auto(LinearDims::new(1, 4096, 4096)).threads, 64);
        assert_eq!(
            GemvConfig::auto(LinearDims::new(1, 4096, 128_256)).threads,
            256
        );
        assert_eq!(
            GemvConfig::auto(LinearDims::new(1, 14336, 4096)).threads,
            256
        );
        assert_eq!(
            GemvConfig::auto(LinearDims::new(3, 4096, 4096)).rows_per_block,
            GEMV_MMA_ROWS
        );
    }

    #[test]
    fn overlap_is_symmetric_and_ignores_empty_ranges() {
        assert!(overlaps(0, 10, 9, 1) && overlaps(9, 1, 0, 10));
        assert!(!overlaps(0, 10, 10, 5) && !overlaps(10, 5, 0, 10));
        assert!(!overlaps(0, 0, 0, 10));
    }

    #[test]
    fn fused_qkv_rows() {
        let r = QkvRows::fused(3, 32, 8, 128);
        assert_eq!(
            (r.row_stride, r.q_offset, r.k_offset, r.v_offset),
            (6144, 0, 4096, 5120)
        );
    }
}
