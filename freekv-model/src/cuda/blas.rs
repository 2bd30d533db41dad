//! cuBLAS linear layers with a fixed workspace, so that the products can be captured in a CUDA
//! graph (cuBLAS must not allocate while a stream is being captured).

use std::sync::Arc;

use freekv_kernels::KernelError;
use freekv_kernels::cudarc::cublas::{CudaBlas, result as blas_result, sys as blas_sys};
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use freekv_kernels::half::bf16;

use crate::ModelError;

/// cuBLAS workspace handed to the handle (what cuBLAS recommends for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Output element types of [`Blas::linear`].
pub(crate) trait OutType: freekv_kernels::cudarc::driver::DeviceRepr {
    const CUDA: blas_sys::cudaDataType;
}
impl OutType for bf16 {
    const CUDA: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_16BF;
}
impl OutType for f32 {
    const CUDA: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;
}

/// A cuBLAS handle bound to one stream with its own workspace.
pub(crate) struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    _workspace: CudaSlice<u8>,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").finish_non_exhaustive()
    }
}

fn blas_err(what: String) -> impl FnOnce(blas_result::CublasError) -> ModelError {
    move |source| ModelError::Kernel(KernelError::Blas { what, source })
}

impl Blas {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self, ModelError> {
        freekv_kernels::probe::cublas_version()?;
        let blas =
            CudaBlas::new(stream.clone()).map_err(blas_err("creating a cuBLAS handle".into()))?;
        let workspace = stream
            .alloc_zeros::<u8>(WORKSPACE_BYTES)
            .map_err(|source| {
                ModelError::Kernel(KernelError::Driver {
                    what: "allocating the cuBLAS workspace".into(),
                    source,
                })
            })?;
        {
            let (wp, _g) = workspace.device_ptr(&stream);
            // SAFETY: the handle is live; the workspace outlives it (both owned by `Self`, the
            // handle is dropped first as it is declared first).
            unsafe {
                blas_sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    wp as *mut std::ffi::c_void,
                    WORKSPACE_BYTES,
                )
            }
            .result()
            .map_err(blas_err("cublasSetWorkspace".into()))?;
        }
        Ok(Self {
            blas,
            stream,
            _workspace: workspace,
        })
    }

    /// `y[t, o] = Σ_i x[t, i] · w[o, i]` for `tokens` rows (row-major; `w` is `[out, in]`), fp32
    /// accumulation. Buffers may be longer than needed.
    pub(crate) fn linear<O: OutType>(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<O>,
        tokens: usize,
        in_features: usize,
        out_features: usize,
    ) -> Result<(), ModelError> {
        let what = || format!("linear {tokens}x{in_features}x{out_features}");
        let need = |a: usize, b: usize| a.checked_mul(b);
        let ok = need(tokens, in_features).is_some_and(|n| n <= x.len())
            && need(out_features, in_features).is_some_and(|n| n <= w.len())
            && need(tokens, out_features).is_some_and(|n| n <= y.len());
        if !ok || in_features == 0 || out_features == 0 {
            return Err(ModelError::Kernel(KernelError::InvalidArgument {
                kernel: "linear",
                msg: format!(
                    "{}: buffers x {}, w {}, y {} too small",
                    what(),
                    x.len(),
                    w.len(),
                    y.len()
                ),
            }));
        }
        if tokens == 0 {
            return Ok(());
        }
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| {
                ModelError::Kernel(KernelError::InvalidArgument {
                    kernel: "linear",
                    msg: format!("dimension {v} exceeds i32"),
                })
            })
        };
        let (m, n, k) = (int(out_features)?, int(tokens)?, int(in_features)?);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let s = &self.stream;
        let (wp, _gw) = w.device_ptr(s);
        let (xp, _gx) = x.device_ptr(s);
        let (yp, _gy) = y.device_ptr_mut(s);
        // Column-major view: Yᵀ (o×t) = Wᵀ' (o×i) · Xᵀ (i×t).
        // SAFETY: live device buffers whose sizes were checked above; f32 alpha/beta for
        // CUBLAS_COMPUTE_32F.
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
        .map_err(blas_err(what()))
    }
}
