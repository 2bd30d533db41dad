//! Run-time compilation of the embedded `.cu` sources with NVRTC, straight to CUBIN for the
//! device's architecture, cached in the process and on disk.
//!
//! The disk cache lives in `$FREEKV_HOME/kernels` (default `$XDG_CACHE_HOME/freekv/kernels` or
//! `$HOME/.cache/freekv/kernels`); file names carry a hash of (source, options, NVRTC version,
//! architecture), so a changed kernel or toolkit never loads a stale binary. Failing to read or
//! write the cache is logged and otherwise ignored.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use crate::KernelError;

/// Helpers prepended to every module.
pub const COMMON_SOURCE: &str = include_str!("../kernels/common.cuh");

/// One `.cu` module embedded in the crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelModule {
    /// Module name (the file stem).
    pub name: &'static str,
    /// The module's own source (without [`COMMON_SOURCE`]).
    pub source: &'static str,
}

/// Embedding gather, RMSNorm, RoPE, SwiGLU, KV append.
pub const ELEMENTWISE: KernelModule = KernelModule {
    name: "elementwise",
    source: include_str!("../kernels/elementwise.cu"),
};
/// Paged decode attention and its split-K reduction.
pub const DECODE_ATTENTION: KernelModule = KernelModule {
    name: "decode_attention",
    source: include_str!("../kernels/decode_attention.cu"),
};
/// Causal paged prefill attention.
pub const PREFILL_ATTENTION: KernelModule = KernelModule {
    name: "prefill_attention",
    source: include_str!("../kernels/prefill_attention.cu"),
};
/// Argmax and sampling.
pub const SAMPLING: KernelModule = KernelModule {
    name: "sampling",
    source: include_str!("../kernels/sampling.cu"),
};

/// FreeKV selection: correction flags and the fused score → group → top-k → slot diff kernel.
pub const FREEKV_SELECT: KernelModule = KernelModule {
    name: "freekv_select",
    source: include_str!("../kernels/freekv_select.cu"),
};
/// FreeKV data movement: page offload (NHD → HND host pages, with summaries), zero-copy gather
/// recall, staging scatter, page copies.
pub const FREEKV_RECALL: KernelModule = KernelModule {
    name: "freekv_recall",
    source: include_str!("../kernels/freekv_recall.cu"),
};

/// Skinny products for decode steps (≤ 8 token rows; RMSNorm / SwiGLU fusions) and the fused
/// RoPE + KV append.
pub const GEMV: KernelModule = KernelModule {
    name: "gemv",
    source: include_str!("../kernels/gemv.cu"),
};

/// The native tensor-core GEMM (bf16 in, fp32 accumulation, bf16 or f32 out), loaded on demand
/// by [`crate::ops::gemm_native::NativeGemm`] (not part of [`crate::Kernels`]).
pub const GEMM: KernelModule = KernelModule {
    name: "gemm",
    source: include_str!("../kernels/gemm.cu"),
};

/// Every module: those of [`crate::Kernels`] in load order, then [`GEMM`] (loaded on demand).
pub const ALL_MODULES: [KernelModule; 8] = [
    ELEMENTWISE,
    DECODE_ATTENTION,
    PREFILL_ATTENTION,
    SAMPLING,
    FREEKV_SELECT,
    FREEKV_RECALL,
    GEMV,
    GEMM,
];

impl KernelModule {
    /// The full text handed to NVRTC.
    pub fn full_source(&self) -> String {
        let mut s = String::with_capacity(COMMON_SOURCE.len() + self.source.len() + 64);
        s.push_str(COMMON_SOURCE);
        s.push_str("\n#line 1 \"");
        s.push_str(self.name);
        s.push_str(".cu\"\n");
        s.push_str(self.source);
        s
    }
}

/// Include directories to try, in order: `$CUDA_HOME/include`, `$CUDA_PATH/include`,
/// `/usr/local/cuda/include`.
pub fn include_candidates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = std::env::var_os(var).filter(|s| !s.is_empty()) {
            v.push(PathBuf::from(root).join("include"));
        }
    }
    v.push(PathBuf::from("/usr/local/cuda/include"));
    v
}

/// The first candidate holding `cuda_bf16.h`, plus its `cccl` subdirectory when present
/// (CUDA 13 keeps libcu++ there). Error lists every path tried.
pub fn resolve_include_dirs_from(candidates: &[PathBuf]) -> Result<Vec<PathBuf>, KernelError> {
    for dir in candidates {
        if dir.join("cuda_bf16.h").is_file() {
            let mut dirs = vec![dir.clone()];
            let cccl = dir.join("cccl");
            if cccl.is_dir() {
                dirs.push(cccl);
            }
            return Ok(dirs);
        }
    }
    Err(KernelError::HeadersNotFound {
        tried: candidates.to_vec(),
    })
}

/// [`resolve_include_dirs_from`] over [`include_candidates`].
pub fn resolve_include_dirs() -> Result<Vec<PathBuf>, KernelError> {
    resolve_include_dirs_from(&include_candidates())
}

/// NVRTC options for `arch` (e.g. `sm_90`) with these include directories.
pub fn nvrtc_options(arch: &str, include_dirs: &[PathBuf]) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--fmad=true".to_string(),
        "-lineinfo".to_string(),
    ];
    for d in include_dirs {
        o.push(format!("-I{}", d.display()));
    }
    o
}

/// 64-bit FNV-1a over several byte strings (length-prefixed, so boundaries matter). Stable across
/// Rust versions and platforms, unlike `DefaultHasher`.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for p in parts {
        for b in (p.len() as u64).to_le_bytes() {
            eat(b);
        }
        for &b in *p {
            eat(b);
        }
    }
    h
}

/// The cache key of a compilation.
pub fn cache_key(source: &str, options: &[String], nvrtc_version: (i32, i32), arch: &str) -> u64 {
    let opts = options.join("\u{1f}");
    let ver = format!("{}.{}", nvrtc_version.0, nvrtc_version.1);
    fnv1a64(&[
        source.as_bytes(),
        opts.as_bytes(),
        ver.as_bytes(),
        arch.as_bytes(),
        env!("CARGO_PKG_VERSION").as_bytes(),
    ])
}

/// `$FREEKV_HOME/kernels`, else `$XDG_CACHE_HOME/freekv/kernels`, else `$HOME/.cache/freekv/kernels`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let nonempty = |v: &str| {
        std::env::var_os(v)
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    };
    if let Some(h) = nonempty("FREEKV_HOME") {
        return Some(h.join("kernels"));
    }
    if let Some(x) = nonempty("XDG_CACHE_HOME") {
        return Some(x.join("freekv").join("kernels"));
    }
    nonempty("HOME").map(|h| h.join(".cache").join("freekv").join("kernels"))
}

/// File name of a cached CUBIN.
pub fn cache_file_name(module: &str, key: u64, arch: &str) -> String {
    format!("{module}-{arch}-{key:016x}.cubin")
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Reads a cached CUBIN; `None` (logged at debug level) when absent or not an ELF image.
pub fn read_cached(path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) if b.len() > 64 && b.starts_with(ELF_MAGIC) => Some(b),
        Ok(_) => {
            tracing::warn!(path = %path.display(), "ignoring corrupt kernel cache file");
            None
        }
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "kernel cache miss");
            None
        }
    }
}

/// Writes a CUBIN atomically (temporary file + rename). Failures are logged, never fatal.
pub fn write_cached(path: &Path, bytes: &[u8]) {
    let res = (|| -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        tracing::warn!(path = %path.display(), error = %e, "could not write the kernel cache");
    }
}

struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed exactly once here.
        if let Err(e) = unsafe { nvrtc_result::destroy_program(self.0) } {
            tracing::warn!(error = %e, "nvrtcDestroyProgram failed");
        }
    }
}

fn c_log(bytes: &[std::ffi::c_char]) -> String {
    let b: Vec<u8> = bytes
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    String::from_utf8_lossy(&b).into_owned()
}

/// Compiles `source` with NVRTC to a CUBIN. The caller must have checked that NVRTC is loadable
/// ([`crate::probe::nvrtc_version`]).
pub fn compile_cubin(
    module: &'static str,
    source: &str,
    options: &[String],
) -> Result<Vec<u8>, KernelError> {
    let _span = tracing::debug_span!("nvrtc_compile", module).entered();
    let opts_text = options.join(" ");
    let err = |log: String| KernelError::Compile {
        module,
        options: opts_text.clone(),
        log,
    };
    let src = CString::new(source).map_err(|_| err("source contains a NUL byte".into()))?;
    let name = CString::new(format!("{module}.cu")).map_err(|_| err("bad module name".into()))?;
    if options.iter().any(|o| o.contains('\0')) {
        return Err(err("an option contains a NUL byte".into()));
    }
    let prog = Program(
        nvrtc_result::create_program(&src, Some(name.as_c_str()))
            .map_err(|e| err(format!("nvrtcCreateProgram: {e}")))?,
    );
    // SAFETY: prog is a live program; the options hold no NUL byte (checked above).
    let compiled = unsafe { nvrtc_result::compile_program(prog.0, options) };
    // SAFETY: prog is live.
    let log = unsafe { nvrtc_result::get_program_log(prog.0) }
        .map(|l| c_log(&l))
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(err(format!("{e}\n{log}")));
    }
    if !log.trim().is_empty() {
        tracing::debug!(module, log = %log.trim(), "NVRTC log");
    }
    let mut size = 0usize;
    // SAFETY: prog is live and compiled.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(|e| {
            err(format!(
                "nvrtcGetCUBINSize: {e} (was a real sm_XX architecture given?)"
            ))
        })?;
    if size == 0 {
        return Err(err("NVRTC produced no CUBIN (virtual architecture?)".into()));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: buf holds `size` bytes as NVRTC requires.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| err(format!("nvrtcGetCUBIN: {e}")))?;
    Ok(buf)
}

fn process_cache() -> &'static Mutex<HashMap<u64, Arc<Vec<u8>>>> {
    static CACHE: OnceLock<Mutex<HashMap<u64, Arc<Vec<u8>>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Where a compiled module came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CubinSource {
    /// Already compiled earlier in this process.
    Process,
    /// Read from the disk cache.
    Disk,
    /// Compiled now by NVRTC.
    Compiled,
}

/// Returns the CUBIN of `module` for `arch`: from the process cache, the disk cache (in
/// `cache_dir`, when given) or a fresh NVRTC compilation (then stored in both caches).
pub fn module_cubin(
    module: &KernelModule,
    arch: &str,
    nvrtc_version: (i32, i32),
    include_dirs: &[PathBuf],
    cache_dir: Option<&Path>,
) -> Result<(Arc<Vec<u8>>, CubinSource), KernelError> {
    let source = module.full_source();
    let options = nvrtc_options(arch, include_dirs);
    // Include paths differ between machines but do not change the output: keep them out of the key.
    let key_opts: Vec<String> = options
        .iter()
        .filter(|o| !o.starts_with("-I"))
        .cloned()
        .collect();
    let key = cache_key(&source, &key_opts, nvrtc_version, arch);
    if let Ok(map) = process_cache().lock()
        && let Some(b) = map.get(&key)
    {
        return Ok((b.clone(), CubinSource::Process));
    }
    let path = cache_dir.map(|d| d.join(cache_file_name(module.name, key, arch)));
    let (bytes, src) = match path.as_deref().and_then(read_cached) {
        Some(b) => (b, CubinSource::Disk),
        None => {
            let b = compile_cubin(module.name, &source, &options)?;
            if let Some(p) = path.as_deref() {
                write_cached(p, &b);
            }
            (b, CubinSource::Compiled)
        }
    };
    let bytes = Arc::new(bytes);
    if let Ok(mut map) = process_cache().lock() {
        map.insert(key, bytes.clone());
    }
    Ok((bytes, src))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable_and_boundary_sensitive() {
        // FNV-1a of nothing with the length prefix of an empty part: fixed value.
        assert_eq!(fnv1a64(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv1a64(&[b"ab", b"c"]), fnv1a64(&[b"a", b"bc"]));
        assert_eq!(fnv1a64(&[b"abc"]), fnv1a64(&[b"abc"]));
    }

    #[test]
    fn key_changes_with_every_input() {
        let o = vec!["--gpu-architecture=sm_90".to_string()];
        let k = cache_key("src", &o, (13, 0), "sm_90");
        assert_ne!(k, cache_key("src2", &o, (13, 0), "sm_90"));
        assert_ne!(k, cache_key("src", &[], (13, 0), "sm_90"));
        assert_ne!(k, cache_key("src", &o, (13, 1), "sm_90"));
        assert_ne!(k, cache_key("src", &o, (13, 0), "sm_80"));
    }

    #[test]
    fn headers_error_lists_every_path() {
        let dir = std::env::temp_dir().join(format!("freekv-kernels-hdr-{}", std::process::id()));
        let a = dir.join("a");
        let b = dir.join("b");
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(b.join("cccl")).unwrap();
        let err = resolve_include_dirs_from(std::slice::from_ref(&a)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("cuda_bf16.h") && msg.contains(&a.display().to_string()),
            "{msg}"
        );
        std::fs::write(b.join("cuda_bf16.h"), "// test").unwrap();
        let dirs = resolve_include_dirs_from(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(dirs, vec![b.clone(), b.join("cccl")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("freekv-kernels-cache-{}", std::process::id()));
        let p = dir.join(cache_file_name("m", 42, "sm_90"));
        assert!(read_cached(&p).is_none());
        let mut img = ELF_MAGIC.to_vec();
        img.extend(std::iter::repeat_n(7u8, 100));
        write_cached(&p, &img);
        assert_eq!(read_cached(&p).as_deref(), Some(&img[..]));
        std::fs::write(&p, b"garbage").unwrap();
        assert!(read_cached(&p).is_none());
        // Writing under a path whose parent is a file fails and is only logged.
        write_cached(&p.join("sub.cubin"), &img);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_module_has_source() {
        for m in ALL_MODULES {
            let s = m.full_source();
            assert!(
                s.contains("cuda_bf16.h") && s.contains("extern \"C\" __global__"),
                "{}",
                m.name
            );
        }
    }
}
