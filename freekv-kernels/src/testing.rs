//! Helpers for tests and benchmarks that need a GPU.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cudarc::driver::CudaStream;
use cudarc::driver::sys::CUevent_flags;

use crate::{Gpu, KernelError};

/// Environment variable: when set to `1`, [`gpu`] panics instead of skipping when no device is
/// found (use it on the GPU machine so that a broken probe cannot turn into silent skips).
pub const REQUIRE_GPU_ENV: &str = "FREEKV_REQUIRE_GPU";

/// The line printed when a GPU test is skipped.
pub const SKIP_LINE: &str = "skipped: no CUDA device";

fn shared() -> &'static Result<Arc<Gpu>, KernelError> {
    static GPU: OnceLock<Result<Arc<Gpu>, KernelError>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(0).map(Arc::new))
}

/// A process-wide [`Gpu`] on device 0 (kernels compiled once), or `None` after printing exactly
/// one line, "skipped: no CUDA device", when there is no CUDA driver or device.
///
/// # Panics
/// When a driver and device exist but the GPU cannot be used (missing NVRTC, cuBLAS or headers,
/// a kernel that fails to compile), or when `FREEKV_REQUIRE_GPU=1` and there is no device: a test
/// must fail rather than skip in those cases.
pub fn gpu() -> Option<Arc<Gpu>> {
    match shared() {
        Ok(g) => Some(g.clone()),
        Err(
            e @ (KernelError::NoDriver
            | KernelError::NoDevice(_)
            | KernelError::DriverTooOld { .. }),
        ) => {
            if std::env::var(REQUIRE_GPU_ENV).is_ok_and(|v| v == "1") {
                panic!("{REQUIRE_GPU_ENV}=1 but no usable CUDA device: {e}");
            }
            println!("{SKIP_LINE}");
            None
        }
        Err(e) => panic!("a CUDA device is present but unusable: {e}"),
    }
}

/// Runs `f(i)` for `i` in `0..iters` and returns the GPU time between two timing events recorded
/// on `stream` around them (work `f` queues on other streams must be joined into `stream`). For
/// benchmarks: the one place that times GPU work with CUDA events.
pub fn gpu_time(
    stream: &Arc<CudaStream>,
    iters: u64,
    mut f: impl FnMut(u64),
) -> Result<Duration, KernelError> {
    let event = || {
        stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(KernelError::driver("recording a timing event"))
    };
    let t0 = event()?;
    for i in 0..iters {
        f(i);
    }
    let t1 = event()?;
    t1.synchronize()
        .map_err(KernelError::driver("waiting for a timing event"))?;
    let ms = t0
        .elapsed_ms(&t1)
        .map_err(KernelError::driver("reading a timing event"))?;
    Ok(Duration::from_secs_f64(f64::from(ms) * 1e-3))
}
