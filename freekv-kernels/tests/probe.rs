//! The probe never panics; without CUDA it reports why, with CUDA it describes the device.

use freekv_kernels::testing::{SKIP_LINE, gpu};
use freekv_kernels::{KernelError, probe};

#[test]
fn probe_never_panics_and_classifies() {
    match probe::check_device(0) {
        Ok(v) => {
            assert!(v >= probe::MIN_DRIVER_VERSION);
            let (info, _ctx) = probe::probe(0).expect("device present but the full probe failed");
            assert!(info.compute_capability.0 >= 7, "{info}");
            assert!(info.sm_count > 0 && info.total_mem > 0, "{info}");
            assert!(probe::cuda_available());
            println!("device: {info}");
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    KernelError::NoDriver
                        | KernelError::NoDevice(_)
                        | KernelError::DriverTooOld { .. }
                ),
                "unexpected probe error {e}"
            );
            assert!(!probe::cuda_available());
            // A device that does not exist is an error too, never a panic.
            assert!(probe::probe(7).is_err());
            assert!(!e.to_string().is_empty());
            println!("{SKIP_LINE}");
        }
    }
    // The library probes never panic either (present or not).
    let _ = probe::nvrtc_version();
    let _ = probe::cublas_version();
}

#[test]
fn gpu_handle_and_kernel_cache() {
    let Some(g) = gpu() else { return };
    assert_eq!(
        g.info().arch(),
        format!(
            "sm_{}{}",
            g.info().compute_capability.0,
            g.info().compute_capability.1
        )
    );
    let names: Vec<&str> = g.module_sources().iter().map(|m| m.0).collect();
    assert_eq!(
        names,
        [
            "elementwise",
            "decode_attention",
            "prefill_attention",
            "sampling",
            "freekv_select",
            "freekv_recall",
            "gemv"
        ]
    );
    println!("modules: {:?}", g.module_sources());
    // A second handle in the same process reuses the compiled modules.
    let dir = std::env::temp_dir().join(format!("freekv-probe-cache-{}", std::process::id()));
    let g2 = freekv_kernels::Gpu::with_cache_dir(0, Some(dir.clone())).unwrap();
    assert!(
        g2.module_sources()
            .iter()
            .all(|m| m.1 == freekv_kernels::compile::CubinSource::Process)
    );
    std::fs::remove_dir_all(&dir).ok();
}
