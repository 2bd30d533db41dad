//! cuBLAS linear layers with a fixed workspace, so that the products can be captured in a CUDA
//! graph (cuBLAS must not allocate while a stream is being captured).

use std::sync::Arc;

use freekv_kernels::KernelError;
use freekv_kernels::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use freekv_kernels::gemm::{Gemm, LinearDims};
use freekv_kernels::half::bf16;

use crate::ModelError;

/// cuBLAS workspace handed to the handle (what cuBLAS recommends for Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// Output element types of [`Blas::linear`].
pub(crate) trait OutType: freekv_kernels::cudarc::driver::DeviceRepr + Sized {
    fn linear(
        g: &Gemm,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<Self>,
        d: LinearDims,
    ) -> Result<(), KernelError>;
}
impl OutType for bf16 {
    fn linear(
        g: &Gemm,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<Self>,
        d: LinearDims,
    ) -> Result<(), KernelError> {
        g.linear(x, w, y, d, false)
    }
}
impl OutType for f32 {
    fn linear(
        g: &Gemm,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<Self>,
        d: LinearDims,
    ) -> Result<(), KernelError> {
        g.linear_f32(x, w, y, d, false)
    }
}

/// The decoder's cuBLAS handle: freekv-kernels' [`Gemm`] with a fixed workspace, so that the
/// products can be captured in a CUDA graph (cuBLAS must not allocate during a capture).
#[derive(Debug)]
pub(crate) struct Blas {
    gemm: Gemm,
}

impl Blas {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Result<Self, ModelError> {
        Ok(Self {
            gemm: Gemm::with_workspace(stream, WORKSPACE_BYTES)?,
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
        let d = LinearDims {
            tokens,
            in_features,
            out_features,
        };
        Ok(O::linear(&self.gemm, x, w, y, d)?)
    }
}
