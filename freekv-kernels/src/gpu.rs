//! The device handle: context, stream, compiled kernels and cuBLAS.

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::KernelError;
use crate::compile::{self, CubinSource};
use crate::gemm::Gemm;
use crate::kernels::Kernels;
use crate::probe::{self, DeviceInfo};

/// One CUDA device ready for work: its primary context (event tracking disabled), a compute
/// stream, the compiled kernels and a cuBLAS handle bound to that stream.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    gemm: Gemm,
    info: DeviceInfo,
}

impl Gpu {
    /// Probes device `ordinal` and compiles (or loads from the default disk cache) every kernel.
    /// Errors, never panics, when there is no driver, device, NVRTC, cuBLAS or toolkit headers.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        Self::with_cache_dir(ordinal, compile::default_cache_dir())
    }

    /// Like [`Gpu::new`] with an explicit kernel cache directory (`None`: no disk cache).
    #[tracing::instrument(level = "debug", skip_all, fields(ordinal))]
    pub fn with_cache_dir(ordinal: usize, cache_dir: Option<PathBuf>) -> Result<Self, KernelError> {
        let (info, ctx) = probe::probe(ordinal)?;
        let include_dirs = compile::resolve_include_dirs()?;
        let stream = ctx
            .new_stream()
            .map_err(KernelError::driver("creating the compute stream"))?;
        let kernels = Kernels::load(&ctx, &info, &include_dirs, cache_dir.as_deref())?;
        let gemm = Gemm::new(stream.clone())?;
        tracing::debug!(device = %info, "CUDA device ready");
        Ok(Self {
            ctx,
            stream,
            kernels,
            gemm,
            info,
        })
    }

    /// The device's primary context.
    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream every launcher of this handle's [`Gemm`] uses.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The compiled kernels and their launchers.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// cuBLAS matrix products on [`Gpu::stream`].
    pub fn gemm(&self) -> &Gemm {
        &self.gemm
    }

    /// What the probe found.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Where each kernel module came from (compiled now, disk cache, process cache).
    pub fn module_sources(&self) -> &[(&'static str, CubinSource)] {
        self.kernels.module_sources()
    }

    /// Blocks until all work queued on [`Gpu::stream`] is done.
    pub fn synchronize(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(KernelError::driver("stream synchronize"))
    }
}
