//! Embedding gather, residual add + RMSNorm, RoPE, SwiGLU and KV append launchers.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use freekv_layout::PageGeometry;
use half::bf16;

use crate::KernelError;
use crate::kernels::{Kernels, Strided, check_len, grid_dim, mul, row_threads, u32_arg};

const MAX_GRID_X: u32 = i32::MAX as u32;
const MAX_GRID_YZ: u32 = 65_535;

/// The two RoPE pairings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)`: GGUF / llama.cpp "normal" (Llama models converted to GGUF).
    Normal,
    /// Rotate-half pairs `(i, i + d/2)`: NeoX / Hugging Face `rotate_half`.
    Neox,
}

/// Where the heads to rotate sit: `tokens` rows, each holding `heads` heads of `head_dim`
/// elements starting at `rows.offset` (elements), `rows.stride` elements apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeLayout {
    /// Tokens (rows).
    pub tokens: usize,
    /// Heads per token.
    pub heads: usize,
    /// Head dimension (even).
    pub head_dim: usize,
    /// Row placement.
    pub rows: Strided,
}

/// Frequencies of a RoPE: pair `i` turns by `pos * theta^(-2i/d) / factors[i]`.
#[derive(Debug, Clone, Copy)]
pub struct RopeConfig<'a> {
    /// Base (`rope.freq_base`, e.g. 10000 or 500000).
    pub theta: f32,
    /// Pairing convention.
    pub style: RopeStyle,
    /// Optional per-frequency divisors (`rope_freqs` of Llama 3), `head_dim / 2` values.
    pub freq_factors: Option<&'a CudaSlice<f32>>,
}

/// Source rows of a KV append: `k` and `v` rows of `kv_heads * head_dim` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSource {
    /// Tokens to append.
    pub tokens: usize,
    /// Placement of the K rows.
    pub k: Strided,
    /// Placement of the V rows.
    pub v: Strided,
}

/// A per-sequence page table on the device: `num_seqs` rows of `stride` page ids (`i32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTableLayout {
    /// Sequences (rows).
    pub num_seqs: usize,
    /// Page ids per row (the most pages a sequence can hold).
    pub stride: usize,
}

impl Kernels {
    #[allow(clippy::too_many_arguments)]
    fn embedding_impl<O>(
        &self,
        kernel: &'static str,
        f: &cudarc::driver::CudaFunction,
        stream: &CudaStream,
        table: &impl DevicePtr<bf16>,
        vocab: usize,
        dim: usize,
        ids: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<O>,
    ) -> Result<(), KernelError> {
        let _s = tracing::debug_span!("embedding").entered();
        let rows = ids.len();
        if dim == 0 || vocab == 0 {
            return Err(KernelError::arg(kernel, "vocab and dim must be non-zero"));
        }
        check_len(
            kernel,
            "table",
            table.len(),
            mul(kernel, "table", vocab, dim)?,
        )?;
        check_len(kernel, "out", out.len(), mul(kernel, "out", rows, dim)?)?;
        if rows == 0 {
            return Ok(());
        }
        let grid = grid_dim(kernel, "rows", rows, MAX_GRID_X)?;
        let (rows_u, dim_u, vocab_u) = (
            grid,
            u32_arg(kernel, "dim", dim)?,
            u32_arg(kernel, "vocab", vocab)?,
        );
        let (o, _go) = out.device_ptr_mut(stream);
        let (t, _gt) = table.device_ptr(stream);
        let (i, _gi) = ids.device_ptr(stream);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (row_threads(dim, 1, 256), 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(f);
        b.arg(&o)
            .arg(&t)
            .arg(&i)
            .arg(&rows_u)
            .arg(&dim_u)
            .arg(&vocab_u);
        // SAFETY: argument types match the kernel signature; sizes checked above.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(kernel))?;
        Ok(())
    }

    /// `out[r, :] = table[ids[r], :]` for every id (`out`: `[ids.len(), dim]` bf16). An id
    /// `>= vocab` yields a zero row (never an out-of-bounds read).
    pub fn embedding(
        &self,
        stream: &CudaStream,
        table: &impl DevicePtr<bf16>,
        vocab: usize,
        dim: usize,
        ids: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), KernelError> {
        self.embedding_impl(
            "embedding_bf16",
            &self.embedding_bf16,
            stream,
            table,
            vocab,
            dim,
            ids,
            out,
        )
    }

    /// [`Kernels::embedding`] with f32 output rows.
    pub fn embedding_f32(
        &self,
        stream: &CudaStream,
        table: &impl DevicePtr<bf16>,
        vocab: usize,
        dim: usize,
        ids: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), KernelError> {
        self.embedding_impl(
            "embedding_f32",
            &self.embedding_f32,
            stream,
            table,
            vocab,
            dim,
            ids,
            out,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_impl(
        &self,
        stream: &CudaStream,
        x: u64,
        residual: u64,
        weight: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "add_rmsnorm_bf16";
        let _s = tracing::debug_span!("rmsnorm").entered();
        check_len(K, "weight", weight.len(), dim)?;
        check_len(K, "out", out.len(), mul(K, "out", rows, dim)?)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(KernelError::arg(
                K,
                format!("eps = {eps} must be finite and >= 0"),
            ));
        }
        if rows == 0 {
            return Ok(());
        }
        let grid = grid_dim(K, "rows", rows, MAX_GRID_X)?;
        let dim_u = u32_arg(K, "dim", dim)?;
        let (w, _gw) = weight.device_ptr(stream);
        let (o, _go) = out.device_ptr_mut(stream);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (row_threads(dim, 4, 1024), 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.add_rmsnorm);
        b.arg(&x)
            .arg(&residual)
            .arg(&w)
            .arg(&o)
            .arg(&grid)
            .arg(&dim_u)
            .arg(&eps);
        // SAFETY: argument types match the kernel; sizes checked by the callers and above.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }

    /// Fused residual add and RMSNorm over `rows` rows of `dim`: `x += residual` (stored back in
    /// bf16), then `out = x / sqrt(mean(x²) + eps) · weight`, computed in fp32 on the stored x.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rmsnorm(
        &self,
        stream: &CudaStream,
        x: &mut impl DevicePtrMut<bf16>,
        residual: &impl DevicePtr<bf16>,
        weight: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "add_rmsnorm_bf16";
        let n = mul(K, "x", rows, dim)?;
        check_len(K, "x", x.len(), n)?;
        check_len(K, "residual", residual.len(), n)?;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let (rp, _gr) = residual.device_ptr(stream);
        if rp == 0 {
            return Err(KernelError::arg(K, "residual is a null buffer"));
        }
        self.rmsnorm_impl(stream, xp, rp, weight, out, rows, dim, eps)
    }

    /// `out = x / sqrt(mean(x²) + eps) · weight` over `rows` rows of `dim` (fp32 math).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<bf16>,
        weight: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        const K: &str = "add_rmsnorm_bf16";
        check_len(K, "x", x.len(), mul(K, "x", rows, dim)?)?;
        let (xp, _gx) = x.device_ptr(stream);
        self.rmsnorm_impl(stream, xp, 0, weight, out, rows, dim, eps)
    }

    /// Rotary position embedding in place on the heads described by `layout`, token `t` at
    /// position `positions[t]` (device `i32`). Any even head dimension; both pairings.
    pub fn rope(
        &self,
        stream: &CudaStream,
        x: &mut impl DevicePtrMut<bf16>,
        layout: &RopeLayout,
        positions: &impl DevicePtr<i32>,
        cfg: &RopeConfig<'_>,
    ) -> Result<(), KernelError> {
        const K: &str = "rope_bf16";
        let _s = tracing::debug_span!("rope").entered();
        let d = layout.head_dim;
        if d == 0 || !d.is_multiple_of(2) || d > 8192 {
            return Err(KernelError::arg(
                K,
                format!("head_dim = {d} must be even, in 2..=8192"),
            ));
        }
        if layout.heads == 0 {
            return Err(KernelError::arg(K, "heads must be non-zero"));
        }
        if !(cfg.theta.is_finite() && cfg.theta > 0.0) {
            return Err(KernelError::arg(
                K,
                format!("theta = {} must be finite and > 0", cfg.theta),
            ));
        }
        let width = mul(K, "heads * head_dim", layout.heads, d)?;
        layout.rows.check(K, "x", layout.tokens, width, x.len())?;
        check_len(K, "positions", positions.len(), layout.tokens)?;
        if let Some(f) = cfg.freq_factors {
            check_len(K, "freq_factors", f.len(), d / 2)?;
        }
        if layout.tokens == 0 {
            return Ok(());
        }
        let grid = grid_dim(K, "tokens", layout.tokens, MAX_GRID_X)?;
        let heads = u32_arg(K, "heads", layout.heads)?;
        let hd = d as u32;
        let stride = layout.rows.stride as u64;
        let neox: u32 = matches!(cfg.style, RopeStyle::Neox).into();
        let theta = cfg.theta;
        let (xp, _gx) = x.device_ptr_mut(stream);
        let xp = xp + 2 * layout.rows.offset as u64;
        let (pp, _gp) = positions.device_ptr(stream);
        let (fp, _gf) = match cfg.freq_factors {
            Some(f) => {
                let (p, g) = f.device_ptr(stream);
                (p, Some(g))
            }
            None => (0u64, None),
        };
        let launch = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (row_threads(layout.heads * d / 2, 1, 256), 1, 1),
            shared_mem_bytes: (d * 4) as u32,
        };
        let mut b = stream.launch_builder(&self.rope);
        b.arg(&xp)
            .arg(&pp)
            .arg(&fp)
            .arg(&grid)
            .arg(&heads)
            .arg(&hd)
            .arg(&stride)
            .arg(&theta)
            .arg(&neox);
        // SAFETY: argument types match the kernel; sizes checked above.
        unsafe { b.launch(launch) }.map_err(KernelError::driver(K))?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn swiglu_impl(
        &self,
        stream: &CudaStream,
        gate: u64,
        up: u64,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        cols: usize,
        gate_stride: u64,
        up_stride: u64,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_bf16";
        let _s = tracing::debug_span!("swiglu").entered();
        check_len(K, "out", out.len(), mul(K, "out", rows, cols)?)?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let gy = grid_dim(K, "rows", rows, MAX_GRID_YZ)?;
        let cols_u = u32_arg(K, "cols", cols)?;
        let gx = cols.div_ceil(256).min(1024) as u32;
        let (o, _go) = out.device_ptr_mut(stream);
        let cfg = LaunchConfig {
            grid_dim: (gx, gy, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.swiglu);
        b.arg(&o)
            .arg(&gate)
            .arg(&up)
            .arg(&gy)
            .arg(&cols_u)
            .arg(&gate_stride)
            .arg(&up_stride);
        // SAFETY: argument types match the kernel; sizes checked by the callers.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }

    /// `out = silu(gate) · up` elementwise over `[rows, cols]` (separate, contiguous inputs).
    pub fn swiglu(
        &self,
        stream: &CudaStream,
        gate: &impl DevicePtr<bf16>,
        up: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_bf16";
        let n = mul(K, "gate", rows, cols)?;
        check_len(K, "gate", gate.len(), n)?;
        check_len(K, "up", up.len(), n)?;
        let (g, _gg) = gate.device_ptr(stream);
        let (u, _gu) = up.device_ptr(stream);
        self.swiglu_impl(stream, g, u, out, rows, cols, cols as u64, cols as u64)
    }

    /// SwiGLU over a fused `[rows, 2·cols]` input whose rows are `[gate | up]` (one GEMM for both
    /// projections); `out` is `[rows, cols]`.
    pub fn swiglu_fused(
        &self,
        stream: &CudaStream,
        gate_up: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        rows: usize,
        cols: usize,
    ) -> Result<(), KernelError> {
        const K: &str = "swiglu_bf16";
        let w = mul(K, "gate_up", cols, 2)?;
        check_len(K, "gate_up", gate_up.len(), mul(K, "gate_up", rows, w)?)?;
        let (g, _gg) = gate_up.device_ptr(stream);
        self.swiglu_impl(
            stream,
            g,
            g + 2 * cols as u64,
            out,
            rows,
            cols,
            w as u64,
            w as u64,
        )
    }

    /// Appends `src.tokens` K/V rows into the NHD page pool `pages`
    /// (`[num_pages][2][page_size][kv_heads][head_dim]`, `num_pages = pages.len() / page_elems`):
    /// token `t` of sequence `token_seq[t]` at position `positions[t]` goes to page
    /// `page_table[seq · stride + pos / page_size]`, slot `pos % page_size`. Tokens whose
    /// sequence, position or page id is out of range are skipped on the device.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        stream: &CudaStream,
        pages: &mut impl DevicePtrMut<bf16>,
        geom: &PageGeometry,
        k: &impl DevicePtr<bf16>,
        v: &impl DevicePtr<bf16>,
        src: &KvSource,
        page_table: &impl DevicePtr<i32>,
        table: &PageTableLayout,
        token_seq: &impl DevicePtr<i32>,
        positions: &impl DevicePtr<i32>,
    ) -> Result<(), KernelError> {
        const K: &str = "kv_append_bf16";
        let _s = tracing::debug_span!("kv_append").entered();
        let page_elems = geom.page_elems();
        if page_elems == 0 {
            return Err(KernelError::arg(K, "empty page geometry"));
        }
        let num_pages = pages.len() / page_elems;
        if num_pages == 0 {
            return Err(KernelError::arg(
                K,
                format!(
                    "pages buffer ({} elements) holds no whole page",
                    pages.len()
                ),
            ));
        }
        let row = mul(K, "kv_heads * head_dim", geom.kv_heads, geom.head_dim)?;
        src.k.check(K, "k", src.tokens, row, k.len())?;
        src.v.check(K, "v", src.tokens, row, v.len())?;
        check_len(
            K,
            "page_table",
            page_table.len(),
            mul(K, "page_table", table.num_seqs, table.stride)?,
        )?;
        check_len(K, "token_seq", token_seq.len(), src.tokens)?;
        check_len(K, "positions", positions.len(), src.tokens)?;
        if table.stride == 0 || table.num_seqs == 0 {
            return Err(KernelError::arg(
                K,
                "page table must have at least one row and column",
            ));
        }
        if src.tokens == 0 {
            return Ok(());
        }
        let grid = grid_dim(K, "tokens", src.tokens, MAX_GRID_X)?;
        let kvh = u32_arg(K, "kv_heads", geom.kv_heads)?;
        let hd = u32_arg(K, "head_dim", geom.head_dim)?;
        let ps = u32_arg(K, "page_size", geom.page_size)?;
        let np = u32_arg(K, "num_pages", num_pages)?;
        let ts = u32_arg(K, "table stride", table.stride)?;
        let ns = u32_arg(K, "num_seqs", table.num_seqs)?;
        let (ks, vs) = (src.k.stride as u64, src.v.stride as u64);
        let (pp, _gp) = pages.device_ptr_mut(stream);
        let (kp, _gk) = k.device_ptr(stream);
        let (vp, _gv) = v.device_ptr(stream);
        let kp = kp + 2 * src.k.offset as u64;
        let vp = vp + 2 * src.v.offset as u64;
        let (tp, _gt) = page_table.device_ptr(stream);
        let (sp, _gs) = token_seq.device_ptr(stream);
        let (pos, _gpos) = positions.device_ptr(stream);
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (row_threads(row, 1, 256), 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&self.kv_append);
        b.arg(&pp).arg(&kp).arg(&vp).arg(&tp).arg(&sp).arg(&pos);
        b.arg(&grid)
            .arg(&kvh)
            .arg(&hd)
            .arg(&ps)
            .arg(&np)
            .arg(&ts)
            .arg(&ns)
            .arg(&ks)
            .arg(&vs);
        // SAFETY: argument types match the kernel; sizes checked above, device-side indices are
        // bounds-checked by the kernel.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }
}
