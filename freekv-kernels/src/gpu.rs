//! The device handle: context, stream, compiled kernels and the GEMM backend (cuBLAS or native).

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};

use crate::KernelError;
use crate::compile::{self, CubinSource};
use crate::gemm::{Gemm, GemmBackend, GemmChoice, Matmul};
use crate::kernels::Kernels;
use crate::probe::{self, DeviceInfo};

/// One CUDA device ready for work: its primary context (event tracking disabled), a compute
/// stream, the compiled kernels and the matrix products bound to that stream (cuBLAS or the
/// native tensor-core GEMM, see [`GemmChoice`]).
///
/// The compute stream has the device's greatest stream priority (unless
/// `FREEKV_STREAM_PRIORITY=off`), so that work on side streams made by
/// [`CudaStream::fork`] (default, least priority: background recalls and offloads) takes the
/// multiprocessors the critical path leaves free rather than delaying its kernels; graphs keep
/// the distinction when instantiated with [`Gpu::graph_flags`].
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Priority of [`Gpu::stream`] (CUDA: lower is more urgent); `None` = the default.
    priority: Option<i32>,
    kernels: Kernels,
    matmul: Matmul,
    info: DeviceInfo,
}

impl Gpu {
    /// Probes device `ordinal` and compiles (or loads from the default disk cache) every kernel;
    /// the GEMM backend comes from `FREEKV_GEMM` ([`GemmChoice::from_env`]). Errors, never
    /// panics, when there is no driver, device, NVRTC or toolkit headers, when `FREEKV_GEMM` is
    /// not `cublas`, `native` or `auto`, or when it is `cublas` and cuBLAS does not load.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        Self::with_cache_dir(ordinal, compile::default_cache_dir())
    }

    /// Like [`Gpu::new`] with an explicit kernel cache directory (`None`: no disk cache).
    pub fn with_cache_dir(ordinal: usize, cache_dir: Option<PathBuf>) -> Result<Self, KernelError> {
        Self::with_options(ordinal, cache_dir, None)
    }

    /// Like [`Gpu::new`] with the GEMM backend given explicitly (the environment is not read).
    pub fn with_gemm(ordinal: usize, gemm: GemmChoice) -> Result<Self, KernelError> {
        Self::with_options(ordinal, compile::default_cache_dir(), Some(gemm))
    }

    /// The general constructor: kernel cache directory (`None`: no disk cache) and GEMM backend
    /// (`None`: from `FREEKV_GEMM`).
    #[tracing::instrument(level = "debug", skip_all, fields(ordinal))]
    pub fn with_options(
        ordinal: usize,
        cache_dir: Option<PathBuf>,
        gemm: Option<GemmChoice>,
    ) -> Result<Self, KernelError> {
        let (info, ctx) = probe::probe(ordinal)?;
        // Read after the probe: without a device the variable does not matter.
        let choice = match gemm {
            Some(c) => c,
            None => GemmChoice::from_env()?,
        };
        let include_dirs = compile::resolve_include_dirs()?;
        let priority = if priorities_from_env()? {
            let (_least, greatest) = cudarc::driver::result::stream::get_priority_range()
                .map_err(KernelError::driver("reading the stream priority range"))?;
            Some(greatest)
        } else {
            None
        };
        let stream = match priority {
            Some(p) => ctx.new_stream_with_priority(p),
            None => ctx.new_stream(),
        }
        .map_err(KernelError::driver("creating the compute stream"))?;
        let kernels = Kernels::load(&ctx, &info, &include_dirs, cache_dir.as_deref())?;
        let matmul = Matmul::with_cache_dir(stream.clone(), choice, 0, cache_dir.as_deref())?;
        tracing::debug!(device = %info, gemm = %matmul.backend(), "CUDA device ready");
        Ok(Self {
            ctx,
            stream,
            priority,
            kernels,
            matmul,
            info,
        })
    }

    /// The device's primary context.
    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream every launcher of this handle's [`Matmul`] uses.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new stream as urgent as [`Gpu::stream`] (for work that runs beside the critical path
    /// but is on it, such as an overlapped corrective recall); it starts unordered with respect
    /// to every other stream.
    pub fn urgent_stream(&self) -> Result<Arc<CudaStream>, KernelError> {
        match self.priority {
            Some(p) => self.ctx.new_stream_with_priority(p),
            None => self.ctx.new_stream(),
        }
        .map_err(KernelError::driver("creating an urgent stream"))
    }

    /// Whether [`Gpu::stream`] runs at a raised priority (see the type's documentation).
    pub fn prioritized(&self) -> bool {
        self.priority.is_some()
    }

    /// Instantiation flags for graphs captured on [`Gpu::stream`]: with priorities on, each
    /// kernel node keeps the priority of the stream it was captured from
    /// (`CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY`), so captured side-stream work stays
    /// behind the critical path as it does eagerly.
    pub fn graph_flags(&self) -> cudarc::driver::sys::CUgraphInstantiate_flags {
        use cudarc::driver::sys::CUgraphInstantiate_flags as F;
        if self.priority.is_some() {
            F::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY
        } else {
            F(0)
        }
    }

    /// The compiled kernels and their launchers.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Matrix products on [`Gpu::stream`] through the chosen backend.
    pub fn matmul(&self) -> &Matmul {
        &self.matmul
    }

    /// The GEMM backend of [`Gpu::matmul`].
    pub fn gemm_backend(&self) -> GemmBackend {
        self.matmul.backend()
    }

    /// The cuBLAS handle on [`Gpu::stream`]; `None` with the native GEMM backend.
    pub fn gemm(&self) -> Option<&Gemm> {
        self.matmul.cublas()
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

/// `FREEKV_STREAM_PRIORITY`: `on` (default; also empty or unset) or `off`.
fn priorities_from_env() -> Result<bool, KernelError> {
    parse_priority_setting(std::env::var("FREEKV_STREAM_PRIORITY").ok().as_deref())
}

fn parse_priority_setting(v: Option<&str>) -> Result<bool, KernelError> {
    match v.map(str::trim) {
        None | Some("") | Some("on") | Some("1") => Ok(true),
        Some("off") | Some("0") => Ok(false),
        Some(other) => Err(KernelError::arg(
            "FREEKV_STREAM_PRIORITY",
            format!("{other:?}: expected on or off"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_priority_setting_parses() {
        for (v, want) in [
            (None, true),
            (Some(""), true),
            (Some("on"), true),
            (Some(" 1 "), true),
        ] {
            assert_eq!(parse_priority_setting(v).unwrap(), want, "{v:?}");
        }
        for v in ["off", "0"] {
            assert!(!parse_priority_setting(Some(v)).unwrap());
        }
        let e = parse_priority_setting(Some("high"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FREEKV_STREAM_PRIORITY") && e.contains("high"),
            "{e}"
        );
    }
}
