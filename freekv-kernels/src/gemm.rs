//! Matrix products beyond decode size: bf16 inputs, fp32 accumulation, bf16 or f32 output.
//!
//! Two backends: cuBLAS ([`Gemm`]) and the native tensor-core GEMM of this crate
//! ([`NativeGemm`], `kernels/gemm.cu`, no cuBLAS). [`Matmul`] holds one of them, chosen by
//! [`GemmChoice`]: the environment variable [`GEMM_ENV`] (`FREEKV_GEMM`) = `cublas`, `native`
//! or `auto` (the default: cuBLAS when it loads, else the native GEMM with a warning naming why).
//! The native backend lets a machine without libcublas run the CUDA backend, and lets
//! compute-sanitizer's racecheck run the engine (it fails inside cuBLAS's GEMMs).

use std::path::Path;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas_result, sys as blas_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::kernels::{check_len, mul};
use crate::ops::gemm_native::NativeGemm;
use crate::ops::gemv::GemvOut;
use crate::{KernelError, compile, probe};

/// Environment variable choosing the GEMM backend: `cublas`, `native` or `auto` (default).
pub const GEMM_ENV: &str = "FREEKV_GEMM";

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

impl LinearDims {
    /// `tokens` rows of `in_features` in, `out_features` out.
    pub const fn new(tokens: usize, in_features: usize, out_features: usize) -> Self {
        Self {
            tokens,
            in_features,
            out_features,
        }
    }
}

/// A cuBLAS handle bound to one stream, optionally with a fixed workspace of its own.
#[derive(Debug)]
pub struct Gemm {
    // Declared before the workspace, so the handle is destroyed before its workspace is freed.
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    workspace: Option<CudaSlice<u8>>,
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

    /// Asks cuBLAS to size its kernels for `sms` multiprocessors (0: all of them), leaving the
    /// others to kernels that run beside the products (`cublasSetSmCountTarget`).
    pub fn set_sm_count_target(&self, sms: u32) -> Result<(), KernelError> {
        let n = i32::try_from(sms)
            .map_err(|_| KernelError::arg("cublasSetSmCountTarget", format!("{sms} SMs")))?;
        // SAFETY: the handle is live; the call only stores a number in it.
        unsafe { blas_sys::cublasSetSmCountTarget(*self.blas.handle(), n) }
            .result()
            .map_err(|source| KernelError::Blas {
                what: "cublasSetSmCountTarget".into(),
                source,
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

    fn run<O: GemvOut>(
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
        let out_type = if O::F32 {
            blas_sys::cudaDataType::CUDA_R_32F
        } else {
            blas_sys::cudaDataType::CUDA_R_16BF
        };
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
                out_type,
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

/// The library that computes the products of a [`Matmul`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmBackend {
    /// cuBLAS (`cublasGemmEx`).
    Cublas,
    /// The native tensor-core GEMM of this crate ([`NativeGemm`]).
    Native,
}

impl GemmBackend {
    /// The value of [`GEMM_ENV`] that selects this backend.
    pub fn name(self) -> &'static str {
        match self {
            GemmBackend::Cublas => "cublas",
            GemmBackend::Native => "native",
        }
    }
}

impl std::fmt::Display for GemmBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which backend to use: one of them, or `Auto` (cuBLAS when it loads, else native).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GemmChoice {
    /// cuBLAS, an error when it does not load.
    Cublas,
    /// The native GEMM; cuBLAS is never loaded.
    Native,
    /// cuBLAS when it loads, else the native GEMM (with a warning naming why).
    #[default]
    Auto,
}

impl From<GemmBackend> for GemmChoice {
    fn from(b: GemmBackend) -> Self {
        match b {
            GemmBackend::Cublas => GemmChoice::Cublas,
            GemmBackend::Native => GemmChoice::Native,
        }
    }
}

impl std::fmt::Display for GemmChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GemmChoice::Cublas => "cublas",
            GemmChoice::Native => "native",
            GemmChoice::Auto => "auto",
        })
    }
}

impl std::str::FromStr for GemmChoice {
    type Err = KernelError;

    /// `cublas`, `native` or `auto` (ASCII case and surrounding blanks ignored).
    fn from_str(s: &str) -> Result<Self, KernelError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cublas" => Ok(GemmChoice::Cublas),
            "native" => Ok(GemmChoice::Native),
            "auto" => Ok(GemmChoice::Auto),
            _ => Err(KernelError::arg(
                GEMM_ENV,
                format!("`{s}` is not a GEMM backend (expected cublas, native or auto)"),
            )),
        }
    }
}

impl GemmChoice {
    /// The choice in [`GEMM_ENV`]: `Auto` when it is unset or empty, an error naming the
    /// variable for any other value than `cublas`, `native` or `auto`.
    pub fn from_env() -> Result<Self, KernelError> {
        match std::env::var(GEMM_ENV) {
            Ok(v) if v.trim().is_empty() => Ok(GemmChoice::Auto),
            Ok(v) => v.parse(),
            Err(std::env::VarError::NotPresent) => Ok(GemmChoice::Auto),
            Err(std::env::VarError::NotUnicode(v)) => Err(KernelError::arg(
                GEMM_ENV,
                format!(
                    "{} is not a GEMM backend (expected cublas, native or auto)",
                    v.to_string_lossy()
                ),
            )),
        }
    }
}

#[derive(Debug)]
enum MatmulImpl {
    Cublas(Gemm),
    Native(NativeGemm),
}

/// The products of one stream through the chosen backend ([`GemmChoice`]): the same calls and
/// checks either way, no allocation and no host synchronisation per product (capturable in a
/// CUDA graph; give cuBLAS a fixed workspace for that).
#[derive(Debug)]
pub struct Matmul {
    stream: Arc<CudaStream>,
    imp: MatmulImpl,
}

impl Matmul {
    /// The backend `choice` on `stream`; cuBLAS gets a fixed workspace of `cublas_workspace`
    /// bytes (0: cuBLAS manages its own, which is not capturable). `Auto` falls back to the
    /// native GEMM, with a `tracing` warning naming the reason, when cuBLAS does not load.
    pub fn new(
        stream: Arc<CudaStream>,
        choice: GemmChoice,
        cublas_workspace: usize,
    ) -> Result<Self, KernelError> {
        Self::with_cache_dir(
            stream,
            choice,
            cublas_workspace,
            compile::default_cache_dir().as_deref(),
        )
    }

    /// Like [`new`](Self::new), with an explicit kernel cache directory for the native module
    /// (`None`: no disk cache).
    pub fn with_cache_dir(
        stream: Arc<CudaStream>,
        choice: GemmChoice,
        cublas_workspace: usize,
        cache_dir: Option<&Path>,
    ) -> Result<Self, KernelError> {
        let cublas = |stream: &Arc<CudaStream>| {
            if cublas_workspace > 0 {
                Gemm::with_workspace(stream.clone(), cublas_workspace)
            } else {
                Gemm::new(stream.clone())
            }
        };
        let imp = match choice {
            GemmChoice::Cublas => MatmulImpl::Cublas(cublas(&stream)?),
            GemmChoice::Native => MatmulImpl::Native(NativeGemm::load(&stream, cache_dir)?),
            GemmChoice::Auto => match cublas(&stream) {
                Ok(g) => MatmulImpl::Cublas(g),
                Err(e) => {
                    tracing::warn!(
                        "cuBLAS is unavailable ({e}); using the native tensor-core GEMM \
                         ({GEMM_ENV}=auto; set {GEMM_ENV}=native to skip cuBLAS)"
                    );
                    MatmulImpl::Native(NativeGemm::load(&stream, cache_dir)?)
                }
            },
        };
        tracing::debug!(backend = %Self::backend_of(&imp), "GEMM backend ready");
        Ok(Self { stream, imp })
    }

    fn backend_of(imp: &MatmulImpl) -> GemmBackend {
        match imp {
            MatmulImpl::Cublas(_) => GemmBackend::Cublas,
            MatmulImpl::Native(_) => GemmBackend::Native,
        }
    }

    /// The backend in use.
    pub fn backend(&self) -> GemmBackend {
        Self::backend_of(&self.imp)
    }

    /// The stream the products run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// With cuBLAS: size the products for `sms` multiprocessors (0: all), see
    /// [`Gemm::set_sm_count_target`]. The native GEMM sizes its grid by the problem: no-op.
    pub fn set_sm_count_target(&self, sms: u32) -> Result<(), KernelError> {
        match &self.imp {
            MatmulImpl::Cublas(g) => g.set_sm_count_target(sms),
            MatmulImpl::Native(_) => Ok(()),
        }
    }

    /// The cuBLAS handle, with the cuBLAS backend.
    pub fn cublas(&self) -> Option<&Gemm> {
        match &self.imp {
            MatmulImpl::Cublas(g) => Some(g),
            MatmulImpl::Native(_) => None,
        }
    }

    /// The native kernels, with the native backend.
    pub fn native(&self) -> Option<&NativeGemm> {
        match &self.imp {
            MatmulImpl::Native(n) => Some(n),
            MatmulImpl::Cublas(_) => None,
        }
    }

    /// `y = x · wᵀ` (`accumulate`: `y += x · wᵀ`), bf16 or f32 output, on [`stream`](Self::stream).
    /// Shapes and checks as [`Gemm::linear`] (the native backend also refuses a `y` that
    /// overlaps `x` or `w`).
    pub fn linear<O: GemvOut>(
        &self,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        y: &mut impl DevicePtrMut<O>,
        dims: LinearDims,
        accumulate: bool,
    ) -> Result<(), KernelError> {
        match &self.imp {
            MatmulImpl::Cublas(g) => {
                let what = if O::F32 { "gemm_bf16_f32" } else { "gemm_bf16" };
                g.run(what, x, w, y, dims, accumulate)
            }
            MatmulImpl::Native(n) => n.linear(&self.stream, x, w, y, dims, accumulate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print() {
        for (s, c) in [
            ("cublas", GemmChoice::Cublas),
            ("native", GemmChoice::Native),
            ("auto", GemmChoice::Auto),
            (" Native\n", GemmChoice::Native),
            ("CUBLAS", GemmChoice::Cublas),
        ] {
            assert_eq!(s.parse::<GemmChoice>().unwrap(), c, "{s:?}");
        }
        for c in [GemmChoice::Cublas, GemmChoice::Native, GemmChoice::Auto] {
            assert_eq!(c.to_string().parse::<GemmChoice>().unwrap(), c);
        }
        for bad in ["", "cuda", "native2", "0"] {
            let e = bad.parse::<GemmChoice>().unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(GEMM_ENV) && msg.contains("cublas, native or auto"),
                "{msg}"
            );
            assert!(!e.is_unavailable());
        }
        assert_eq!(GemmChoice::default(), GemmChoice::Auto);
        assert_eq!(GemmChoice::from(GemmBackend::Native), GemmChoice::Native);
        assert_eq!(GemmBackend::Cublas.to_string(), "cublas");
    }
}
