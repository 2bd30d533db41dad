//! The compiled kernels, resolved once into plain fields (no name lookups when launching), and the
//! shared argument checks of the launchers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::KernelError;
use crate::compile::{self, CubinSource, KernelModule};
use crate::probe::DeviceInfo;

/// Head dimensions the attention kernels are compiled for.
pub const ATTENTION_HEAD_DIMS: [usize; 2] = [64, 128];
/// Largest number of query heads one decode block serves from a single K/V load.
pub const MAX_DECODE_GROUP_TILE: usize = 8;

/// Depth of the decode kernel's cp.async pipeline (`DEC_STAGES` in decode_attention.cu).
pub const DECODE_STAGES: usize = 3;

/// Dynamic shared memory of the decode kernel for head dim `d`: K and V tiles of 64 tokens per
/// pipeline stage.
pub const fn decode_smem_bytes(d: usize) -> usize {
    DECODE_STAGES * 2 * 64 * d * 2
}

/// Most table entries per sequence for which a page-masked decode attention compacts each KV
/// head's attended pages in shared memory (4 bytes each); longer tables are read with the mask.
pub const DECODE_COMPACT_PAGES: usize = 2048;

/// Whether a page-masked decode attention over tables of `table_stride` entries compacts each
/// KV head's attended pages (and so costs only those pages' tokens).
pub const fn masked_decode_compacts(table_stride: usize) -> bool {
    table_stride <= DECODE_COMPACT_PAGES
}

/// Dynamic shared memory of the prefill kernel for head dim `d`: two stages of 64-token K and V
/// tiles with rows padded by 8 elements.
pub const fn prefill_smem_bytes(d: usize) -> usize {
    2 * 2 * 64 * (d + 8) * 2
}

/// Every kernel function, resolved from the loaded modules.
#[derive(Debug)]
pub struct Kernels {
    pub(crate) embedding_bf16: CudaFunction,
    pub(crate) embedding_f32: CudaFunction,
    pub(crate) add_rmsnorm: CudaFunction,
    pub(crate) rope: CudaFunction,
    pub(crate) swiglu: CudaFunction,
    pub(crate) kv_append: CudaFunction,
    /// `[head dim index][group tile - 1]`.
    pub(crate) decode: [[CudaFunction; MAX_DECODE_GROUP_TILE]; 2],
    /// Resident decode blocks per SM, same indexing as `decode`.
    pub(crate) decode_occupancy: [[u32; MAX_DECODE_GROUP_TILE]; 2],
    pub(crate) decode_reduce: CudaFunction,
    pub(crate) prefill: [CudaFunction; 2],
    pub(crate) argmax: CudaFunction,
    pub(crate) sample: CudaFunction,
    /// FreeKV selection kernels (`ops::select`).
    pub(crate) select: crate::ops::select::SelectKernels,
    /// FreeKV data-movement kernels (`ops::recall`).
    #[allow(dead_code)]
    pub(crate) recall: crate::ops::recall::RecallKernels,
    /// Skinny products and decode fusions (`ops::gemv`).
    pub(crate) gemv: crate::ops::gemv::GemvKernels,
    pub(crate) sm_count: u32,
    sources: Vec<(&'static str, CubinSource)>,
}

fn load_module(
    ctx: &Arc<CudaContext>,
    module: &KernelModule,
    info: &DeviceInfo,
    include_dirs: &[PathBuf],
    cache_dir: Option<&Path>,
    sources: &mut Vec<(&'static str, CubinSource)>,
) -> Result<Arc<CudaModule>, KernelError> {
    let (cubin, src) = compile::module_cubin(
        module,
        &info.arch(),
        info.nvrtc_version,
        include_dirs,
        cache_dir,
    )?;
    sources.push((module.name, src));
    ctx.load_module(Ptx::from_binary(cubin.as_ref().clone()))
        .map_err(KernelError::driver(format!(
            "loading module {}",
            module.name
        )))
}

pub(crate) fn func(m: &Arc<CudaModule>, name: &str) -> Result<CudaFunction, KernelError> {
    m.load_function(name)
        .map_err(KernelError::driver(format!("resolving kernel {name}")))
}

impl Kernels {
    /// Compiles (or loads from the caches) every module for `info`'s architecture and resolves
    /// every function.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn load(
        ctx: &Arc<CudaContext>,
        info: &DeviceInfo,
        include_dirs: &[PathBuf],
        cache_dir: Option<&Path>,
    ) -> Result<Self, KernelError> {
        let mut sources = Vec::new();
        let ew = load_module(
            ctx,
            &compile::ELEMENTWISE,
            info,
            include_dirs,
            cache_dir,
            &mut sources,
        )?;
        let dec = load_module(
            ctx,
            &compile::DECODE_ATTENTION,
            info,
            include_dirs,
            cache_dir,
            &mut sources,
        )?;
        let pre = load_module(
            ctx,
            &compile::PREFILL_ATTENTION,
            info,
            include_dirs,
            cache_dir,
            &mut sources,
        )?;
        let smp = load_module(
            ctx,
            &compile::SAMPLING,
            info,
            include_dirs,
            cache_dir,
            &mut sources,
        )?;
        let sel = load_module(
            ctx,
            &compile::FREEKV_SELECT,
            info,
            include_dirs,
            cache_dir,
            &mut sources,
        )?;
        let rec = load_module(
            ctx,
            &compile::FREEKV_RECALL,
            info,
            include_dirs,
            cache_dir,
            &mut sources,
        )?;
        let gemv = load_module(
            ctx,
            &compile::GEMV,
            info,
            include_dirs,
            cache_dir,
            &mut sources,
        )?;
        let mut decode_rows = Vec::with_capacity(2);
        for d in ATTENTION_HEAD_DIMS {
            let mut row = Vec::with_capacity(MAX_DECODE_GROUP_TILE);
            for g in 1..=MAX_DECODE_GROUP_TILE {
                row.push(func(&dec, &format!("decode_attn_d{d}_g{g}"))?);
            }
            let row: [CudaFunction; MAX_DECODE_GROUP_TILE] = row
                .try_into()
                .map_err(|_| KernelError::arg("load", "decode kernel table size"))?;
            decode_rows.push(row);
        }
        let decode: [[CudaFunction; MAX_DECODE_GROUP_TILE]; 2] = decode_rows
            .try_into()
            .map_err(|_| KernelError::arg("load", "decode kernel table size"))?;
        for (row, d) in decode.iter().zip(ATTENTION_HEAD_DIMS) {
            for f in row {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    (decode_smem_bytes(d) + 4 * DECODE_COMPACT_PAGES) as i32,
                )
                .map_err(KernelError::driver("decode attention shared memory size"))?;
            }
        }
        let mut decode_occupancy = [[1u32; MAX_DECODE_GROUP_TILE]; 2];
        for ((row, occ), d) in decode
            .iter()
            .zip(decode_occupancy.iter_mut())
            .zip(ATTENTION_HEAD_DIMS)
        {
            for (f, o) in row.iter().zip(occ.iter_mut()) {
                *o = f
                    .occupancy_max_active_blocks_per_multiprocessor(128, decode_smem_bytes(d), None)
                    .map_err(KernelError::driver("decode attention occupancy"))?
                    .max(1);
            }
        }
        let prefill = [
            func(&pre, "prefill_attn_d64")?,
            func(&pre, "prefill_attn_d128")?,
        ];
        for (f, d) in prefill.iter().zip(ATTENTION_HEAD_DIMS) {
            // Favour shared memory: each block double-buffers K and V tiles.
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                100,
            )
            .map_err(KernelError::driver("prefill shared memory carveout"))?;
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                prefill_smem_bytes(d) as i32,
            )
            .map_err(KernelError::driver("prefill shared memory size"))?;
        }
        Ok(Self {
            embedding_bf16: func(&ew, "embedding_bf16")?,
            embedding_f32: func(&ew, "embedding_f32")?,
            add_rmsnorm: func(&ew, "add_rmsnorm_bf16")?,
            rope: func(&ew, "rope_bf16")?,
            swiglu: func(&ew, "swiglu_bf16")?,
            kv_append: func(&ew, "kv_append_bf16")?,
            decode,
            decode_occupancy,
            decode_reduce: func(&dec, "decode_reduce")?,
            prefill,
            argmax: func(&smp, "argmax_f32")?,
            sample: func(&smp, "sample_f32")?,
            select: crate::ops::select::SelectKernels::resolve(&sel)?,
            recall: crate::ops::recall::RecallKernels::resolve(&rec)?,
            gemv: crate::ops::gemv::GemvKernels::resolve(&gemv, info.sm_count)?,
            sm_count: info.sm_count,
            sources,
        })
    }

    /// Where each module came from.
    pub fn module_sources(&self) -> &[(&'static str, CubinSource)] {
        &self.sources
    }

    /// Streaming multiprocessors of the device (used to size split-K).
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
}

/// Rows of `width` elements laid out with `stride` elements between consecutive rows, starting at
/// element `offset` of a buffer. Describes both plain `[rows, width]` tensors and column slices of
/// fused ones (e.g. the K part of a fused QKV projection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Strided {
    /// First element of row 0.
    pub offset: usize,
    /// Elements from one row to the next (>= the row width).
    pub stride: usize,
}

impl Strided {
    /// Densely packed rows of `width` elements.
    pub fn contiguous(width: usize) -> Self {
        Self {
            offset: 0,
            stride: width,
        }
    }

    /// Checks that `rows` rows of `width` fit in a buffer of `len` elements; returns the
    /// number of elements spanned.
    pub(crate) fn check(
        &self,
        kernel: &'static str,
        what: &str,
        rows: usize,
        width: usize,
        len: usize,
    ) -> Result<usize, KernelError> {
        if width > self.stride {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "{what}: row width {width} exceeds the row stride {}",
                    self.stride
                ),
            ));
        }
        if rows == 0 {
            return Ok(0);
        }
        let need = (rows - 1)
            .checked_mul(self.stride)
            .and_then(|x| x.checked_add(self.offset))
            .and_then(|x| x.checked_add(width))
            .ok_or_else(|| KernelError::arg(kernel, format!("{what}: size overflows")))?;
        if need > len {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "{what}: {rows} rows of {width} (offset {}, stride {}) need {need} elements, buffer has {len}",
                    self.offset, self.stride
                ),
            ));
        }
        Ok(need)
    }
}

pub(crate) fn check_len(
    kernel: &'static str,
    what: &str,
    len: usize,
    need: usize,
) -> Result<(), KernelError> {
    if len < need {
        return Err(KernelError::arg(
            kernel,
            format!("{what}: buffer has {len} elements, needs {need}"),
        ));
    }
    Ok(())
}

pub(crate) fn mul(
    kernel: &'static str,
    what: &str,
    a: usize,
    b: usize,
) -> Result<usize, KernelError> {
    a.checked_mul(b)
        .ok_or_else(|| KernelError::arg(kernel, format!("{what}: size overflows")))
}

pub(crate) fn u32_arg(kernel: &'static str, what: &str, v: usize) -> Result<u32, KernelError> {
    u32::try_from(v).map_err(|_| KernelError::arg(kernel, format!("{what} = {v} exceeds u32")))
}

pub(crate) fn grid_dim(
    kernel: &'static str,
    what: &str,
    v: usize,
    max: u32,
) -> Result<u32, KernelError> {
    match u32::try_from(v) {
        Ok(x) if x >= 1 && x <= max => Ok(x),
        _ => Err(KernelError::arg(
            kernel,
            format!("{what} = {v} outside the launchable range 1..={max}"),
        )),
    }
}

pub(crate) fn check_align(
    kernel: &'static str,
    what: &str,
    addr: u64,
    align: u64,
) -> Result<(), KernelError> {
    if !addr.is_multiple_of(align) {
        return Err(KernelError::arg(
            kernel,
            format!("{what}: device address {addr:#x} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

/// Threads per block for a row of `n` elements handled by one block: a multiple of 32 in 32..=max.
pub(crate) fn row_threads(n: usize, per_thread: usize, max: u32) -> u32 {
    let want = n.div_ceil(per_thread.max(1)).div_ceil(32) * 32;
    (want.clamp(32, max as usize)) as u32
}
