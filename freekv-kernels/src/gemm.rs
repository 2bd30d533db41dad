//! Matrix products through cuBLAS: bf16 inputs, fp32 accumulation.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::kernels::{check_len, mul};
use crate::{KernelError, probe};

/// Sizes of a linear layer `y[t, o] = Σ_i x[t, i] · w[o, i]` (row-major; `w` as stored by GGUF and
/// PyTorch, `[out_features, in_features]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    /// Rows of `x` and `y` (tokens).
    pub tokens: usize,
    /// Columns of `x` and `w`.
    pub in_features: usize,
    /// Rows of `w`, columns of `y`.
    pub out_features: usize,
}

/// A cuBLAS handle bound to one stream, optionally with a fixed workspace of its own.
#[derive(Debug)]
pub struct Gemm {
    // Declared before the workspace, so the handle is destroyed before its workspace is freed.
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    workspace: Option<CudaSlice<u8>>,
}

trait OutType {
    const CUDA: blas_sys::cudaDataType;
}
impl OutType for bf16 {
    const CUDA: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16BF;
}
impl OutType for f32 {
    const CUDA: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;
}

impl Gemm {
    /// Creates a cuBLAS handle on `stream` (probes that cuBLAS 13 loads first, so a missing library
    /// is an error, not a panic).
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, KernelError> {
        probe::cublas_version()?;
        let blas = CudaBlas::new(stream.clone()).map_err(|source| KernelError::Blas {
            what: "creating the cuBLAS handle".into(),
            source,
        })?;
        Ok(Self {
            blas,
            stream,
            workspace: None,
        })
    }

    /// Like [`new`](Self::new), with a fixed workspace of `bytes` given to the handle, so that
    /// cuBLAS never allocates while the stream is captured into a CUDA graph (32 MiB is what
    /// cuBLAS recommends for Hopper).
    pub fn with_workspace(stream: Arc<CudaStream>, bytes: usize) -> Result<Self, KernelError> {
        let mut g = Self::new(stream)?;
        let workspace =
            g.stream
                .alloc_zeros::<u8>(bytes)
                .map_err(|source| KernelError::Driver {
                    what: "allocating the cuBLAS workspace".into(),
                    source,
                })?;
        {
            let (wp, _guard) = workspace.device_ptr(&g.stream);
            // SAFETY: the handle is live; the workspace is owned by `self` and outlives the handle
            // (field order), and it is `bytes` long.
            unsafe {
                blas_sys::cublasSetWorkspace_v2(
                    *g.blas.handle(),
                    wp as *mut std::ffi::c_void,
                    bytes,
                )
            }
            .result()
            .map_err(|source| KernelError::Blas {
                what: "cublasSetWorkspace".into(),
                source,
            })?;
        }
        g.workspace = Some(workspace);
        Ok(g)
    }

    /// Bytes of the fixed workspace (0: cuBLAS manages its own).
    pub fn workspace_bytes(&self) -> usize {
        self.workspace.as_ref().map_or(0, CudaSlice::len)
    }

    /// The stream the products run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn run<O: OutType>(
        &self,
        what: &'static str,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<O>,
        d: LinearDims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        let _s = tracing::debug_span!("gemm", t = d.tokens, i = d.in_features, o = d.out_features)
            .entered();
        if d.in_features == 0 || d.out_features == 0 {
            return Err(KernelError::arg(
                what,
                "in_features and out_features must be non-zero",
            ));
        }
        check_len(what, "x", x.len(), mul(what, "x", d.tokens, d.in_features)?)?;
        check_len(
            what,
            "w",
            w.len(),
            mul(what, "w", d.out_features, d.in_features)?,
        )?;
        check_len(
            what,
            "y",
            y.len(),
            mul(what, "y", d.tokens, d.out_features)?,
        )?;
        if d.tokens == 0 {
            return Ok(());
        }
        let int = |v: usize, n: &str| {
            i32::try_from(v).map_err(|_| KernelError::arg(what, format!("{n} = {v} exceeds i32")))
        };
        let (m, n, k) = (
            int(d.out_features, "out_features")?,
            int(d.tokens, "tokens")?,
            int(d.in_features, "in_features")?,
        );
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0f32 };
        let s = &self.stream;
        let (wp, _gw) = w.device_ptr(s);
        let (xp, _gx) = x.device_ptr(s);
        let (yp, _gy) = y.device_ptr_mut(s);
        // Column-major view: Yᵀ (o×t) = op(W) (o×i) · Xᵀ (i×t), op = transpose of W's i×o view.
        // SAFETY: pointers are live device buffers whose sizes were checked above; alpha/beta are
        // f32 as required by CUBLAS_COMPUTE_32F.
        unsafe {
            blas_result::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                xp as *const _,
                blas_sys::cudaDataType::CUDA_R_16BF,
                k,
                (&beta) as *const f32 as *const _,
                yp as *mut _,
                O::CUDA,
                m,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|source| KernelError::Blas {
            what: format!("{what} {}x{}x{}", d.tokens, d.in_features, d.out_features),
            source,
        })
    }

    /// `y = x · wᵀ` (`accumulate`: `y += x · wᵀ`), bf16 output rounded from the fp32 accumulator.
    pub fn linear(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<bf16>,
        dims: LinearDims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        self.run("gemm_bf16", x, w, y, dims, accumulate)
    }

    /// `y = x · wᵀ` (`accumulate`: `y += x · wᵀ`) with an f32 output (e.g. logits).
    pub fn linear_f32(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<f32>,
        dims: LinearDims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        self.run("gemm_bf16_f32", x, w, y, dims, accumulate)
    }
}
