//! The native tensor-core GEMM (`kernels/gemm.cu`): the matrix products beyond decode size
//! without cuBLAS, for machines without libcublas and for compute-sanitizer's racecheck (which
//! cannot run through cuBLAS's GEMMs).
//!
//! `y[t, o] = Σ_i x[t, i] · w[o, i]` (`accumulate`: `y +=`), `x` `[tokens, in]`, `w` `[out, in]`
//! (as GGUF stores it), `y` `[tokens, out]`, all row-major and contiguous; bf16 inputs, fp32
//! accumulation on tensor cores (`mma.sync` m16n8k16), bf16 or f32 output. Any sizes: the edge
//! tiles are zero-filled, and when `x` or `w` is not 16-byte aligned or `in_features` is not a
//! multiple of 8 the kernels read through guarded scalar loads instead of 16-byte `cp.async`
//! copies. Block tiles of 128 × 128 or 64 × 128 outputs (chosen by [`NativeGemmConfig::auto`]),
//! k-steps of 32 through a 4-stage `cp.async` pipeline in dynamic shared memory.
//!
//! A launch neither allocates nor synchronises with the host, so products can be captured in a
//! CUDA graph. The module is compiled on demand (it is not part of [`crate::Kernels`]):
//! [`NativeGemm::for_stream`] loads it for the device of a stream; [`crate::gemm::Matmul`] picks
//! between it and cuBLAS (`FREEKV_GEMM`).
//!
//! ```no_run
//! # fn main() -> Result<(), freekv_kernels::KernelError> {
//! use freekv_kernels::{Gpu, LinearDims};
//! use freekv_kernels::half::bf16;
//! use freekv_kernels::ops::gemm_native::NativeGemm;
//!
//! let gpu = Gpu::new(0)?;
//! let s = gpu.stream();
//! let native = NativeGemm::for_stream(s)?;
//! let (t, k, n) = (100, 4096, 1000);
//! let x = s.alloc_zeros::<bf16>(t * k).unwrap();
//! let w = s.alloc_zeros::<bf16>(n * k).unwrap();
//! let mut y = s.alloc_zeros::<f32>(t * n).unwrap();
//! let dims = LinearDims { tokens: t, in_features: k, out_features: n };
//! native.linear(s, &x, &w, &mut y, dims, false)?;
//! # Ok(())
//! # }
//! ```

use std::path::Path;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::bf16;

use crate::compile;
use crate::gemm::LinearDims;
use crate::kernels::{check_len, func, grid_dim, mul};
use crate::ops::gemv::{GemvOut, overlaps};
use crate::{KernelError, probe};

/// Output columns of one block tile.
pub const NATIVE_GEMM_BLOCK_N: usize = 128;
/// Token rows of one block tile: the kernels are compiled for these.
pub const NATIVE_GEMM_BLOCK_M: [usize; 2] = [128, 64];
/// Elements of `in_features` per pipeline step.
pub const NATIVE_GEMM_BLOCK_K: usize = 32;
/// Pipeline stages (`GEMM_STAGES` in gemm.cu).
pub const NATIVE_GEMM_STAGES: usize = 4;
/// Threads per block.
pub const NATIVE_GEMM_THREADS: u32 = 256;

const FLAG_ACCUMULATE: u32 = 1;

/// Dynamic shared memory of a block with `block_m` token rows: every stage holds a `[block_m][32]`
/// tile of `x` and a `[128][32]` tile of `w` (bf16).
pub const fn native_gemm_smem_bytes(block_m: usize) -> usize {
    NATIVE_GEMM_STAGES * (block_m + NATIVE_GEMM_BLOCK_N) * NATIVE_GEMM_BLOCK_K * 2
}

/// Launch shape of a native product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NativeGemmConfig {
    /// Token rows per block tile: one of [`NATIVE_GEMM_BLOCK_M`].
    pub block_m: usize,
    /// Use 16-byte `cp.async` copies where the operands allow it (`x` and `w` 16-byte aligned,
    /// `in_features` a multiple of 8); `false` forces the guarded scalar loads (for tests).
    pub vector_loads: bool,
}

impl NativeGemmConfig {
    /// 128-row tiles when the product has more than 64 token rows and fills every one of the
    /// `sm_count` multiprocessors with at least one such tile, else 64-row tiles (twice the
    /// blocks); vector loads wherever allowed.
    pub fn auto(dims: LinearDims, sm_count: u32) -> Self {
        let tiles_128 = dims
            .tokens
            .div_ceil(128)
            .saturating_mul(dims.out_features.div_ceil(NATIVE_GEMM_BLOCK_N));
        let block_m = if dims.tokens > 64 && tiles_128 >= sm_count.max(1) as usize {
            128
        } else {
            64
        };
        Self {
            block_m,
            vector_loads: true,
        }
    }
}

/// The compiled functions of the `gemm` module.
#[derive(Debug)]
pub struct NativeGemm {
    /// `[f32 output][scalar loads][block_m index]`.
    funcs: [[[CudaFunction; 2]; 2]; 2],
    sm_count: u32,
}

fn kernel_name(f32_out: bool, scalar: bool, block_m: usize) -> String {
    format!(
        "gemm_{}_m{block_m}{}",
        if f32_out { "f32" } else { "bf16" },
        if scalar { "_scalar" } else { "" }
    )
}

impl NativeGemm {
    /// Resolves every function of the loaded `gemm` module and sets its shared-memory limits.
    pub(crate) fn resolve(m: &Arc<CudaModule>, sm_count: u32) -> Result<Self, KernelError> {
        let mut rows: Vec<[[CudaFunction; 2]; 2]> = Vec::with_capacity(2);
        for f32_out in [false, true] {
            let mut by_load: Vec<[CudaFunction; 2]> = Vec::with_capacity(2);
            for scalar in [false, true] {
                let mut by_m = Vec::with_capacity(2);
                for bm in NATIVE_GEMM_BLOCK_M {
                    let name = kernel_name(f32_out, scalar, bm);
                    let f = func(m, &name)?;
                    f.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                        100,
                    )
                    .map_err(KernelError::driver(format!(
                        "{name} shared memory carveout"
                    )))?;
                    f.set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        native_gemm_smem_bytes(bm) as i32,
                    )
                    .map_err(KernelError::driver(format!("{name} shared memory size")))?;
                    by_m.push(f);
                }
                by_load.push(
                    by_m.try_into()
                        .map_err(|_| KernelError::arg("gemm_native", "kernel table size"))?,
                );
            }
            rows.push(
                by_load
                    .try_into()
                    .map_err(|_| KernelError::arg("gemm_native", "kernel table size"))?,
            );
        }
        let funcs = rows
            .try_into()
            .map_err(|_| KernelError::arg("gemm_native", "kernel table size"))?;
        Ok(Self {
            funcs,
            sm_count: sm_count.max(1),
        })
    }

    /// Compiles (or takes from the process cache and the disk cache in `cache_dir`) the `gemm`
    /// module for the device of `stream` and loads it into that device's context. Never panics:
    /// a missing NVRTC or toolkit headers is an error.
    #[tracing::instrument(level = "debug", skip_all)]
    pub fn load(stream: &CudaStream, cache_dir: Option<&Path>) -> Result<Self, KernelError> {
        let ctx = stream.context();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(KernelError::driver("compute capability"))?;
        let nvrtc = probe::nvrtc_version()?;
        let include_dirs = compile::resolve_include_dirs()?;
        let (cubin, _src) = compile::module_cubin(
            &compile::GEMM,
            &format!("sm_{major}{minor}"),
            nvrtc,
            &include_dirs,
            cache_dir,
        )?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.as_ref().clone()))
            .map_err(KernelError::driver("loading module gemm"))?;
        let sm = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(KernelError::driver("multiprocessor count"))?;
        Self::resolve(&module, sm.max(1) as u32)
    }

    /// [`load`](Self::load) with the default kernel cache directory.
    pub fn for_stream(stream: &CudaStream) -> Result<Self, KernelError> {
        Self::load(stream, compile::default_cache_dir().as_deref())
    }

    /// Multiprocessors of the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// `y = x · wᵀ` (`accumulate`: `y += x · wᵀ`) with the launch shape of
    /// [`NativeGemmConfig::auto`]. Buffers may be longer than needed. Errors (never launches)
    /// when a size is zero (`in`, `out`) or exceeds `i32`, a buffer is too short, or `y`
    /// overlaps `x` or `w`; zero tokens is a no-op.
    pub fn linear<O: GemvOut>(
        &self,
        stream: &CudaStream,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<O>,
        dims: LinearDims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        let cfg = NativeGemmConfig::auto(dims, self.sm_count);
        self.linear_with(stream, x, w, y, dims, accumulate, cfg)
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
        cfg: NativeGemmConfig,
    ) -> Result<(), KernelError> {
        let what: &'static str = if O::F32 {
            "gemm_native_f32"
        } else {
            "gemm_native_bf16"
        };
        let _s = tracing::debug_span!(
            "gemm_native",
            t = dims.tokens,
            i = dims.in_features,
            o = dims.out_features,
            f32_out = O::F32,
            block_m = cfg.block_m
        )
        .entered();
        let LinearDims {
            tokens: t,
            in_features: k,
            out_features: n,
        } = dims;
        if k == 0 || n == 0 {
            return Err(KernelError::arg(
                what,
                "in_features and out_features must be non-zero",
            ));
        }
        let x_n = mul(what, "x", t, k)?;
        let w_n = mul(what, "w", n, k)?;
        let y_n = mul(what, "y", t, n)?;
        check_len(what, "x", x.len(), x_n)?;
        check_len(what, "w", w.len(), w_n)?;
        check_len(what, "y", y.len(), y_n)?;
        let bm_i = NATIVE_GEMM_BLOCK_M
            .iter()
            .position(|&b| b == cfg.block_m)
            .ok_or_else(|| {
                KernelError::arg(
                    what,
                    format!(
                        "block_m = {} is not one of {NATIVE_GEMM_BLOCK_M:?}",
                        cfg.block_m
                    ),
                )
            })?;
        if t == 0 {
            return Ok(());
        }
        let int = |v: usize, name: &str| {
            i32::try_from(v)
                .map(|v| v as u32)
                .map_err(|_| KernelError::arg(what, format!("{name} = {v} exceeds i32")))
        };
        let (m_u, k_u, n_u) = (
            int(t, "tokens")?,
            int(k, "in_features")?,
            int(n, "out_features")?,
        );
        let tiles = t
            .div_ceil(cfg.block_m)
            .checked_mul(n.div_ceil(NATIVE_GEMM_BLOCK_N))
            .ok_or_else(|| KernelError::arg(what, "tile count overflows"))?;
        let blocks = grid_dim(what, "blocks", tiles, i32::MAX as u32)?;
        let (xp, _gx) = x.device_ptr(stream);
        let (wp, _gw) = w.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        let (x_bytes, w_bytes) = (2 * x_n as u64, 2 * w_n as u64);
        let y_bytes = (std::mem::size_of::<O>() * y_n) as u64;
        for (name, p, b) in [("x", xp, x_bytes), ("w", wp, w_bytes)] {
            if overlaps(yp, y_bytes, p, b) {
                return Err(KernelError::arg(what, format!("y overlaps {name}")));
            }
        }
        let vector = cfg.vector_loads
            && xp.is_multiple_of(16)
            && wp.is_multiple_of(16)
            && k.is_multiple_of(8);
        let f = &self.funcs[usize::from(O::F32)][usize::from(!vector)][bm_i];
        let flags = if accumulate { FLAG_ACCUMULATE } else { 0 };
        let launch = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (NATIVE_GEMM_THREADS, 1, 1),
            shared_mem_bytes: native_gemm_smem_bytes(cfg.block_m) as u32,
        };
        let mut b = stream.launch_builder(f);
        b.arg(&yp)
            .arg(&xp)
            .arg(&wp)
            .arg(&m_u)
            .arg(&n_u)
            .arg(&k_u)
            .arg(&flags);
        // SAFETY: argument types match the kernel signature (pointers as u64, then four u32);
        // the buffers hold at least tokens·in, out·in and tokens·out elements (checked above),
        // `y` overlaps neither input, the vector path is chosen only for 16-byte aligned
        // operands with in % 8 == 0, and the kernel touches no element outside those extents.
        unsafe { b.launch(launch) }.map_err(KernelError::driver(what))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_shared_memory() {
        assert_eq!(kernel_name(false, false, 128), "gemm_bf16_m128");
        assert_eq!(kernel_name(true, true, 64), "gemm_f32_m64_scalar");
        assert_eq!(native_gemm_smem_bytes(128), 65536);
        assert_eq!(native_gemm_smem_bytes(64), 49152);
        // Every compiled kernel name appears in the source.
        for f in [false, true] {
            for s in [false, true] {
                for bm in NATIVE_GEMM_BLOCK_M {
                    let n = kernel_name(f, s, bm);
                    assert!(
                        compile::GEMM.source.contains(&format!("GEMM_KERNEL({n},")),
                        "{n}"
                    );
                }
            }
        }
    }

    #[test]
    fn auto_tiles() {
        assert_eq!(
            NativeGemmConfig::auto(LinearDims::new(4096, 4096, 4096), 132).block_m,
            128
        );
        assert_eq!(
            NativeGemmConfig::auto(LinearDims::new(512, 4096, 4096), 132).block_m,
            64
        );
        assert_eq!(
            NativeGemmConfig::auto(LinearDims::new(17, 4096, 128_256), 132).block_m,
            64
        );
        assert_eq!(
            NativeGemmConfig::auto(LinearDims::new(1000, 576, 1536), 132).block_m,
            64
        );
        assert_eq!(
            NativeGemmConfig::auto(LinearDims::new(1000, 576, 49152), 132).block_m,
            128
        );
        assert_eq!(
            NativeGemmConfig::auto(LinearDims::new(1000, 576, 49152), 0).block_m,
            128
        );
        assert!(NativeGemmConfig::auto(LinearDims::new(1, 1, 1), 132).vector_loads);
    }

    #[test]
    fn overlap() {
        assert!(overlaps(0, 10, 9, 1) && overlaps(9, 1, 0, 10));
        assert!(!overlaps(0, 10, 10, 5) && !overlaps(0, 0, 0, 10));
    }
}
