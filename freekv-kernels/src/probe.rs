//! Probing the CUDA driver, the device and the run-time libraries without ever panicking.
//!
//! cudarc loads `libcuda`, `libnvrtc` and `libcublas` lazily and *panics* when a library or symbol
//! is missing, so every entry point of this crate calls these probes first.

use cudarc::driver::{CudaContext, sys};

use crate::KernelError;

/// Oldest driver API the bindings are built for (`cuda-13000`).
pub const MIN_DRIVER_VERSION: i32 = 13000;
/// Oldest NVRTC / cuBLAS major version accepted (the bindings target CUDA 13).
pub const MIN_LIBRARY_MAJOR: i32 = 13;

/// What the probe found about one device and the CUDA libraries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Device name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: u32,
    /// Device memory in bytes.
    pub total_mem: usize,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub driver_version: i32,
    /// NVRTC (major, minor).
    pub nvrtc_version: (i32, i32),
    /// cuBLAS (major, minor, patch); `None` when cuBLAS 13 does not load (the native GEMM
    /// backend still runs, see [`crate::gemm::GemmChoice`]).
    pub cublas_version: Option<(i32, i32, i32)>,
}

impl DeviceInfo {
    /// The NVRTC architecture name for this device, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (device {}, {}, {} SMs, {:.1} GiB, driver {}.{}, NVRTC {}.{}, {})",
            self.name,
            self.ordinal,
            self.arch(),
            self.sm_count,
            self.total_mem as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
            match self.cublas_version {
                Some((a, b, c)) => format!("cuBLAS {a}.{b}.{c}"),
                None => "no cuBLAS".to_string(),
            },
        )
    }
}

/// Checks that the driver library loads and is new enough; returns its version.
pub fn driver_version() -> Result<i32, KernelError> {
    // SAFETY: only attempts dlopen on cudarc's fixed list of library names.
    if !unsafe { sys::is_culib_present() } {
        return Err(KernelError::NoDriver);
    }
    let mut v = 0i32;
    // SAFETY: the library is present (checked above); the symbol exists in every driver.
    unsafe { sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(KernelError::driver("cuDriverGetVersion"))?;
    if v < MIN_DRIVER_VERSION {
        return Err(KernelError::DriverTooOld {
            found: v,
            required: MIN_DRIVER_VERSION,
        });
    }
    Ok(v)
}

/// Checks the driver, initialises it and checks that device `ordinal` exists.
pub fn check_device(ordinal: usize) -> Result<i32, KernelError> {
    let v = driver_version()?;
    cudarc::driver::result::init().map_err(|e| {
        if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE {
            KernelError::NoDevice("the driver reports no CUDA-capable device".into())
        } else {
            KernelError::NoDevice(format!("cuInit failed: {e}"))
        }
    })?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| KernelError::NoDevice(format!("cuDeviceGetCount failed: {e}")))?;
    if count <= 0 {
        return Err(KernelError::NoDevice("the driver reports 0 devices".into()));
    }
    if ordinal >= count as usize {
        return Err(KernelError::NoDevice(format!(
            "device {ordinal} requested but only {count} present"
        )));
    }
    Ok(v)
}

/// Checks that NVRTC loads and is CUDA 13 or newer; returns (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    // SAFETY: only attempts dlopen on a fixed list of names.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(KernelError::LibraryMissing {
            lib: "nvrtc",
            hint: "install the CUDA toolkit's NVRTC (libnvrtc.so.13) and make it visible to the loader",
        });
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: library present; nvrtcVersion exists in every NVRTC.
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::LibraryTooOld {
            lib: "nvrtc",
            found: format!("unknown (nvrtcVersion failed: {r:?})"),
            required: MIN_LIBRARY_MAJOR,
        });
    }
    if major < MIN_LIBRARY_MAJOR {
        return Err(KernelError::LibraryTooOld {
            lib: "nvrtc",
            found: format!("{major}.{minor}"),
            required: MIN_LIBRARY_MAJOR,
        });
    }
    Ok((major, minor))
}

/// Checks that cuBLAS loads and is CUDA 13 or newer; returns (major, minor, patch).
pub fn cublas_version() -> Result<(i32, i32, i32), KernelError> {
    use cudarc::cublas::sys::{cublasGetProperty, cublasStatus_t, libraryPropertyType};
    // SAFETY: only attempts dlopen on a fixed list of names.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(KernelError::LibraryMissing {
            lib: "cublas",
            hint: "install the CUDA toolkit's cuBLAS (libcublas.so.13) and make it visible to the loader",
        });
    }
    let mut v = [0i32; 3];
    for (slot, prop) in v.iter_mut().zip([
        libraryPropertyType::MAJOR_VERSION,
        libraryPropertyType::MINOR_VERSION,
        libraryPropertyType::PATCH_LEVEL,
    ]) {
        // SAFETY: library present; cublasGetProperty exists in every cuBLAS since 9.
        let r = unsafe { cublasGetProperty(prop, slot) };
        if r != cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(KernelError::LibraryTooOld {
                lib: "cublas",
                found: format!("unknown (cublasGetProperty failed: {r:?})"),
                required: MIN_LIBRARY_MAJOR,
            });
        }
    }
    if v[0] < MIN_LIBRARY_MAJOR {
        return Err(KernelError::LibraryTooOld {
            lib: "cublas",
            found: format!("{}.{}.{}", v[0], v[1], v[2]),
            required: MIN_LIBRARY_MAJOR,
        });
    }
    Ok((v[0], v[1], v[2]))
}

/// Full probe: driver, device `ordinal`, NVRTC, and whether cuBLAS loads (recorded, not
/// required: the native GEMM backend needs no cuBLAS); creates (retains) the device's primary
/// context to read its properties. Never panics; every failure is a [`KernelError`].
pub fn probe(ordinal: usize) -> Result<(DeviceInfo, std::sync::Arc<CudaContext>), KernelError> {
    let driver_version = check_device(ordinal)?;
    let nvrtc_version = nvrtc_version()?;
    let cublas_version = cublas_version().ok();
    let ctx = CudaContext::new(ordinal).map_err(|e| {
        KernelError::NoDevice(format!("creating a context on device {ordinal}: {e}"))
    })?;
    // Explicit synchronisation only (events on our streams); see the crate docs.
    // SAFETY: no CudaSlice exists in this context yet from this handle; callers synchronise
    // explicitly with streams and events.
    unsafe { ctx.disable_event_tracking() };
    let name = ctx.name().map_err(KernelError::driver("cuDeviceGetName"))?;
    let compute_capability = ctx
        .compute_capability()
        .map_err(KernelError::driver("compute capability"))?;
    let sm_count = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(KernelError::driver("multiprocessor count"))?;
    let total_mem = ctx
        .total_mem()
        .map_err(KernelError::driver("total memory"))?;
    Ok((
        DeviceInfo {
            ordinal,
            name,
            compute_capability,
            sm_count: sm_count.max(1) as u32,
            total_mem,
            driver_version,
            nvrtc_version,
            cublas_version,
        },
        ctx,
    ))
}

/// True when a usable CUDA device is present (driver, device and NVRTC probe OK; cuBLAS is
/// optional, see [`crate::gemm::GemmChoice`]). Never panics.
pub fn cuda_available() -> bool {
    check_device(0).is_ok() && nvrtc_version().is_ok()
}
