use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong while probing CUDA, compiling or launching kernels.
#[derive(Debug, Error)]
pub enum KernelError {
    /// The CUDA driver library (`libcuda`) could not be loaded.
    #[error("no CUDA driver: libcuda could not be loaded (no NVIDIA driver installed?)")]
    NoDriver,
    /// The driver is older than the CUDA 13.0 API these bindings target.
    #[error("CUDA driver too old: version {found} < required {required} (CUDA 13.0)")]
    DriverTooOld {
        /// `cuDriverGetVersion` (e.g. 12040 for 12.4).
        found: i32,
        /// Minimum version.
        required: i32,
    },
    /// No usable CUDA device (none present, or the requested ordinal does not exist).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA library other than the driver (NVRTC, cuBLAS) could not be loaded.
    #[error("CUDA library {lib} not found: {hint}")]
    LibraryMissing {
        /// Library name (`nvrtc`, `cublas`).
        lib: &'static str,
        /// What to install or set.
        hint: &'static str,
    },
    /// A CUDA library is present but of an older major version than required.
    #[error("CUDA library {lib} too old: version {found}, need major {required} or newer")]
    LibraryTooOld {
        /// Library name.
        lib: &'static str,
        /// Version found (as reported by the library).
        found: String,
        /// Required major version.
        required: i32,
    },
    /// The CUDA toolkit headers (`cuda_bf16.h`) that NVRTC needs were not found.
    #[error(
        "CUDA headers not found: no cuda_bf16.h in {} (set CUDA_HOME to the CUDA toolkit root)",
        .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    HeadersNotFound {
        /// Include directories that were tried, in order.
        tried: Vec<PathBuf>,
    },
    /// NVRTC failed to compile a kernel module.
    #[error("NVRTC failed to compile kernel module {module} ({options}): {log}")]
    Compile {
        /// Module name (e.g. `decode_attention`).
        module: &'static str,
        /// The options passed to NVRTC.
        options: String,
        /// NVRTC's error or compile log.
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {what}: {source}")]
    Driver {
        /// Which operation or kernel.
        what: String,
        /// The driver error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {what}: {source}")]
    Blas {
        /// Which operation.
        what: String,
        /// The cuBLAS error.
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// A launch argument is inconsistent (sizes, strides, alignment, unsupported shape).
    #[error("{kernel}: invalid argument: {msg}")]
    InvalidArgument {
        /// Kernel (or operation) name.
        kernel: &'static str,
        /// What is wrong.
        msg: String,
    },
}

impl KernelError {
    /// True when the error means "this machine has no usable CUDA" (no driver, too old a driver,
    /// no device, a missing or too old NVRTC / cuBLAS, no toolkit headers): `--device auto` falls
    /// back to the CPU on these. Other errors (a kernel that fails to compile or launch, a bad
    /// argument) are bugs and should surface.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            KernelError::NoDriver
                | KernelError::DriverTooOld { .. }
                | KernelError::NoDevice(_)
                | KernelError::LibraryMissing { .. }
                | KernelError::LibraryTooOld { .. }
                | KernelError::HeadersNotFound { .. }
        )
    }

    pub(crate) fn arg(kernel: &'static str, msg: impl Into<String>) -> Self {
        KernelError::InvalidArgument {
            kernel,
            msg: msg.into(),
        }
    }

    pub(crate) fn driver(
        what: impl Into<String>,
    ) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        let what = what.into();
        move |source| KernelError::Driver { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_classification_and_messages() {
        assert!(KernelError::NoDriver.is_unavailable());
        assert!(KernelError::NoDevice("x".into()).is_unavailable());
        let h = KernelError::HeadersNotFound {
            tried: vec![PathBuf::from("/a/include"), PathBuf::from("/b/include")],
        };
        assert!(h.is_unavailable());
        assert!(h.to_string().contains("/a/include, /b/include"), "{h}");
        let a = KernelError::arg("rope_bf16", "bad");
        assert!(!a.is_unavailable());
        assert_eq!(a.to_string(), "rope_bf16: invalid argument: bad");
        let c = KernelError::Compile {
            module: "m",
            options: "-x".into(),
            log: "boom".into(),
        };
        assert!(!c.is_unavailable());
    }
}
