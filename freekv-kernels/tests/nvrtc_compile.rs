//! Every kernel module compiles with NVRTC for sm_90 (needs only libnvrtc and the CUDA headers,
//! no GPU). Skips with one line where NVRTC or the headers are absent.

use freekv_kernels::compile::{self, ALL_MODULES, CubinSource};
use freekv_kernels::probe;

#[test]
fn all_modules_compile_for_sm90() {
    let Ok(ver) = probe::nvrtc_version() else {
        println!("skipped: NVRTC not available");
        return;
    };
    let Ok(includes) = compile::resolve_include_dirs() else {
        println!("skipped: CUDA headers not available");
        return;
    };
    let dir = std::env::temp_dir().join(format!("freekv-nvrtc-test-{}", std::process::id()));
    for m in ALL_MODULES {
        let (cubin, src) = compile::module_cubin(&m, "sm_90", ver, &includes, Some(&dir))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            cubin.starts_with(b"\x7fELF"),
            "{}: not an ELF image",
            m.name
        );
        assert_eq!(src, CubinSource::Compiled, "{}", m.name);
        // Second request: served from the process cache, identical bytes.
        let (again, src2) = compile::module_cubin(&m, "sm_90", ver, &includes, Some(&dir)).unwrap();
        assert_eq!(src2, CubinSource::Process);
        assert_eq!(again, cubin);
        // The disk cache holds the same image.
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{}-sm_90-", m.name))
            })
            .collect();
        assert_eq!(files.len(), 1, "{}", m.name);
        assert_eq!(std::fs::read(files[0].path()).unwrap(), *cubin);
    }
    // A deliberately broken module reports the module name and NVRTC's log.
    let bad = compile::KernelModule {
        name: "broken",
        source: "extern \"C\" __global__ void k() { this_is_not_defined(); }",
    };
    let err = compile::module_cubin(&bad, "sm_90", ver, &includes, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("broken") && msg.contains("this_is_not_defined"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
