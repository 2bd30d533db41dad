//! `cargo xtask sanitize`: NVIDIA compute-sanitizer (memcheck, racecheck, synccheck) over a short
//! `freekv generate --device cuda` run of every KV policy asked for, with the error count of each.
//!
//! For each policy a plain run comes first: a policy the CUDA backend does not accept (or any
//! other failure) is reported as such and not sanitized. Each (tool, policy) writes its
//! sanitizer log under `--out` (default `target/sanitize`), and `summary.json` holds the table
//! that is also printed. Exit status: non-zero when a sanitizer reports an error or a run fails.
//!
//! Every tool also runs over the [`KERNEL_BENCHES`] (the FreeKV selection and recall kernels,
//! no cuBLAS) in criterion's test mode. On the H200 racecheck could not run the engine through
//! cuBLAS (the tool fails inside a cuBLAS GEMM, reported as "sanitizer internal error", not as
//! a finding), so the racecheck runs of the engine set [`RACECHECK_ENV`] (`FREEKV_GEMM=native`:
//! the products go through freekv-kernels' own tensor-core GEMM and cuBLAS never runs); they
//! instrument only `--racecheck-kernels` (default [`DEFAULT_RACECHECK_KERNELS`]).
//!
//! The GPU machine has no cargo: `cargo xtask sanitize --bundle` builds the release `freekv` and
//! `xtask` binaries and the kernel benches into `.device/sanitize`, and there `./xtask sanitize
//! --prebuilt .device/sanitize --out OUT` runs them.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The sanitizer tools, in run order.
pub const TOOLS: [&str; 3] = ["memcheck", "racecheck", "synccheck"];

/// Default bundle folder (git-ignored).
pub const DEFAULT_BUNDLE_DIR: &str = ".device/sanitize";

/// Options of `cargo xtask sanitize`.
#[derive(Debug, Clone, PartialEq)]
pub struct SanitizeOptions {
    /// Use `DIR/freekv` instead of building it.
    pub prebuilt: Option<PathBuf>,
    /// Build the binaries into this folder and stop.
    pub bundle: Option<PathBuf>,
    /// Tools to run.
    pub tools: Vec<String>,
    /// KV policies (one `--kv` each).
    pub kv: Vec<String>,
    /// Model: a GGUF path or `synthetic:NAME` (default: the default model when cached, else
    /// `synthetic:smollm2-135m`).
    pub model: Option<String>,
    /// Prompt length in tokens (synthetic models: ids; GGUF: a repeated sentence of about that
    /// many tokens).
    pub prompt_tokens: usize,
    /// Tokens to generate.
    pub tokens: usize,
    /// `--budget` of the policies other than `full`: small, so that the sparse path runs.
    pub budget: usize,
    /// Where the logs and the summary go.
    pub out: Option<PathBuf>,
    /// The compute-sanitizer executable.
    pub sanitizer: Option<PathBuf>,
    /// Limit per run.
    pub timeout_s: u64,
    /// More `freekv generate` flags for every run.
    pub extra: Vec<String>,
    /// Also run the [`KERNEL_BENCHES`] under every tool (default on).
    pub kernel_benches: bool,
    /// racecheck instruments only the kernels whose names match this regular expression
    /// (`None`: every kernel; racecheck slows shared-memory kernels by orders of magnitude, and
    /// a whole generation under it does not finish in minutes).
    pub racecheck_kernels: Option<String>,
}

/// Default `--racecheck-kernels`: the FreeKV kernels (correction, selection, offload, gather,
/// scatter, slot copies).
pub const DEFAULT_RACECHECK_KERNELS: &str = "freekv|copy_pages";

/// Benches that exercise the FreeKV kernels without cuBLAS (package, bench): each is also run
/// once per tool in criterion's test mode (`--bench --test`, every benchmark once). On the
/// H200 (compute-sanitizer 2025, cuBLAS 13.1) racecheck stopped the engine inside a cuBLAS GEMM
/// with "Internal Sanitizer Error: The Sanitizer failed to handle a hardware exception" even
/// when the GEMM kernels were filtered out; these runs check the FreeKV kernels without the
/// engine, and the engine's racecheck runs avoid cuBLAS with [`RACECHECK_ENV`].
pub const KERNEL_BENCHES: [(&str, &str); 2] = [
    ("freekv-kernels", "select"),
    ("freekv-recall", "cuda_recall"),
];

/// Environment of the racecheck runs of the engine: the native GEMM backend, so that cuBLAS
/// (inside which racecheck fails on the H200) never runs.
pub const RACECHECK_ENV: [(&str, &str); 1] = [("FREEKV_GEMM", "native")];

/// The marker compute-sanitizer prints when the tool itself failed (not a finding).
pub const INTERNAL_ERROR: &str = "Internal Sanitizer Error";

impl Default for SanitizeOptions {
    fn default() -> Self {
        Self {
            prebuilt: None,
            bundle: None,
            tools: TOOLS.iter().map(|s| s.to_string()).collect(),
            kv: vec!["full".into(), "freekv".into()],
            model: None,
            prompt_tokens: 640,
            tokens: 16,
            budget: 256,
            out: None,
            sanitizer: None,
            timeout_s: 300,
            extra: Vec::new(),
            racecheck_kernels: Some(DEFAULT_RACECHECK_KERNELS.into()),
            kernel_benches: true,
        }
    }
}

pub fn usage() -> &'static str {
    "sanitize [--prebuilt DIR] [--tools memcheck,racecheck,synccheck] [--kv full,freekv]\n      \
     [--model PATH|synthetic:NAME] [--prompt-tokens 640] [-n 16] [--budget 256] [--out DIR]\n      \
     [--sanitizer PATH] [--timeout-s 300] [--racecheck-kernels REGEX|all]\n      \
     [--no-kernel-benches] [-- more freekv generate flags]\n  \
     sanitize --bundle [DIR]   build freekv and xtask (release) into DIR (default .device/sanitize)\n  \
     racecheck runs of the engine set FREEKV_GEMM=native (the native GEMM, no cuBLAS)"
}

fn list(v: Option<&String>, flag: &str) -> Result<Vec<String>> {
    let items: Vec<String> = v
        .ok_or_else(|| anyhow!("{flag} needs a comma list"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if items.is_empty() {
        bail!("{flag} needs at least one item");
    }
    Ok(items)
}

impl SanitizeOptions {
    /// Parses the arguments after `sanitize`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        let mut it = args.iter().peekable();
        let num = |v: Option<&String>, flag: &str| -> Result<usize> {
            v.and_then(|s| s.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| anyhow!("{flag} needs a positive integer"))
        };
        while let Some(a) = it.next() {
            match a.as_str() {
                "--prebuilt" => {
                    o.prebuilt = Some(crate::flag_value(&mut it, "--prebuilt", "a folder")?.into())
                }
                "--bundle" => {
                    let dir = match it.peek() {
                        Some(d) if !d.starts_with('-') => it.next().map(PathBuf::from),
                        _ => None,
                    };
                    o.bundle = Some(dir.unwrap_or_else(|| DEFAULT_BUNDLE_DIR.into()));
                }
                "--tools" => {
                    o.tools = list(it.next(), "--tools")?;
                    if let Some(t) = o.tools.iter().find(|t| !TOOLS.contains(&t.as_str())) {
                        bail!("unknown sanitizer tool `{t}` (memcheck, racecheck, synccheck)");
                    }
                }
                "--kv" => o.kv = list(it.next(), "--kv")?,
                "--model" => {
                    o.model = Some(crate::flag_value(&mut it, "--model", "a path")?.clone())
                }
                "--prompt-tokens" => o.prompt_tokens = num(it.next(), "--prompt-tokens")?,
                "-n" | "--tokens" => o.tokens = num(it.next(), "-n")?,
                "--budget" => o.budget = num(it.next(), "--budget")?,
                "--timeout-s" => o.timeout_s = num(it.next(), "--timeout-s")? as u64,
                "--out" => o.out = Some(crate::flag_value(&mut it, "--out", "a folder")?.into()),
                "--sanitizer" => {
                    o.sanitizer = Some(crate::flag_value(&mut it, "--sanitizer", "a path")?.into())
                }
                "--racecheck-kernels" => {
                    let r = crate::flag_value(&mut it, "--racecheck-kernels", "a regex or `all`")?;
                    o.racecheck_kernels = match r.trim() {
                        "" => bail!("--racecheck-kernels needs a regex or `all`"),
                        "all" => None,
                        r => Some(r.to_string()),
                    };
                }
                "--no-kernel-benches" => o.kernel_benches = false,
                "--" => o.extra = it.by_ref().cloned().collect(),
                other => {
                    bail!(
                        "unknown sanitize option `{other}`\nusage: cargo xtask {}",
                        usage()
                    )
                }
            }
        }
        Ok(o)
    }
}

/// Errors reported by a compute-sanitizer log: memcheck and synccheck end with `ERROR SUMMARY:
/// N errors`, racecheck with `RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)`
/// (errors counted; warnings returned apart). `None` when the log has no summary (the run did
/// not finish).
pub fn parse_summary(log: &str) -> Option<(u64, u64)> {
    let num_before = |s: &str, word: &str| -> Option<u64> {
        let i = s.find(word)?;
        s[..i]
            .split_whitespace()
            .last()?
            .trim_start_matches('(')
            .parse()
            .ok()
    };
    for line in log.lines().rev() {
        if let Some(rest) = line.split("RACECHECK SUMMARY:").nth(1) {
            let errors = num_before(rest, "error").unwrap_or(0);
            let warnings = num_before(rest, "warning").unwrap_or(0);
            return Some((errors, warnings));
        }
        if let Some(rest) = line.split("ERROR SUMMARY:").nth(1) {
            return Some((num_before(rest, "error")?, 0));
        }
    }
    None
}

/// Whether a CUDA GPU is visible (nvidia-smi, else the driver's /proc entries).
fn gpu_present() -> bool {
    let smi = Command::new("nvidia-smi")
        .arg("-L")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output();
    if let Ok(o) = smi
        && o.status.success()
        && String::from_utf8_lossy(&o.stdout).contains("GPU")
    {
        return true;
    }
    std::fs::read_dir("/proc/driver/nvidia/gpus").is_ok_and(|mut d| d.next().is_some())
}

/// The compute-sanitizer executable: `--sanitizer`, `$COMPUTE_SANITIZER`, `$CUDA_HOME/bin`,
/// `/usr/local/cuda*/bin`, then `PATH`.
fn find_sanitizer(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(anyhow!("--sanitizer {} is not a file", p.display()))
        };
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("COMPUTE_SANITIZER") {
        candidates.push(p.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(h) = std::env::var_os(var) {
            candidates.push(PathBuf::from(h).join("bin").join("compute-sanitizer"));
        }
    }
    candidates.push("/usr/local/cuda/bin/compute-sanitizer".into());
    if let Ok(dir) = std::fs::read_dir("/usr/local") {
        let mut more: Vec<PathBuf> = dir
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("cuda-"))
            })
            .map(|p| p.join("bin").join("compute-sanitizer"))
            .collect();
        more.sort();
        candidates.extend(more.into_iter().rev());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("compute-sanitizer")));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "compute-sanitizer not found (--sanitizer, $COMPUTE_SANITIZER, $CUDA_HOME/bin, \
             /usr/local/cuda*/bin, PATH)"
        )
    })
}

/// The default model's path when it is cached (the CLI's lookup: `$FREEKV_MODEL`, else
/// `$FREEKV_HOME`, `$XDG_CACHE_HOME/freekv` or `~/.cache/freekv`, then `models/`).
fn cached_default_model() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(m) = var("FREEKV_MODEL") {
        return Some(PathBuf::from(m)).filter(|p| p.is_file());
    }
    let home = var("FREEKV_HOME")
        .map(PathBuf::from)
        .or_else(|| var("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("freekv")))
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache").join("freekv")))?;
    Some(home.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")).filter(|p| p.is_file())
}

fn cargo_build_release(root: &Path, packages: &[&str]) -> Result<PathBuf> {
    let mut c = crate::bench::cargo();
    c.args(["build", "--release"]).current_dir(root);
    for p in packages {
        c.args(["-p", p]);
    }
    println!(
        "sanitize: cargo build --release -p {} ...",
        packages.join(" -p ")
    );
    if !c.status().context("running cargo")?.success() {
        bail!("cargo build --release failed");
    }
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release"))
}

/// `--bundle DIR`: the release `freekv` and `xtask` binaries, copied into DIR.
fn bundle(dir: &Path) -> Result<()> {
    let root = crate::bench::root();
    let release = cargo_build_release(&root, &["freekv-cli", "xtask"])?;
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        root.join(dir)
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files: Vec<(PathBuf, String)> = ["freekv", "xtask"]
        .iter()
        .map(|n| (release.join(n), n.to_string()))
        .collect();
    for (name, exe) in build_kernel_benches()? {
        files.push((exe, format!("bench-{name}")));
    }
    for (src, name) in files {
        let dst = dir.join(&name);
        if let Some(note) = crate::bundle::copy_stripped(&src, &dst)? {
            println!("sanitize: {note}");
        }
        let size = std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
        println!(
            "sanitize: {} ({:.1} MiB)",
            dst.display(),
            size as f64 / (1 << 20) as f64
        );
    }
    println!(
        "sanitize: on the GPU machine: {}/xtask sanitize --prebuilt {} --out OUT",
        dir.display(),
        dir.display()
    );
    Ok(())
}

/// Builds the [`KERNEL_BENCHES`] (`cargo bench --no-run`) and returns (bench name, executable).
fn build_kernel_benches() -> Result<Vec<(String, PathBuf)>> {
    let packages: Vec<String> = KERNEL_BENCHES.iter().map(|(p, _)| p.to_string()).collect();
    let (arts, res) = crate::bundle::cargo_bench_no_run(&packages);
    res?;
    KERNEL_BENCHES
        .iter()
        .map(|(pkg, name)| {
            arts.iter()
                .find(|a| a.package == *pkg && a.name == *name)
                .map(|a| (name.to_string(), a.exe.clone()))
                .ok_or_else(|| anyhow!("cargo built no `{name}` bench in {pkg}"))
        })
        .collect()
}

/// The kernel benches to sanitize: `DIR/bench-NAME` of a prebuilt folder (those present), or
/// built here.
fn kernel_bench_bins(o: &SanitizeOptions) -> Result<Vec<(String, PathBuf)>> {
    match &o.prebuilt {
        Some(dir) => Ok(KERNEL_BENCHES
            .iter()
            .map(|(_, n)| (n.to_string(), dir.join(format!("bench-{n}"))))
            .filter(|(_, p)| p.is_file())
            .collect()),
        None => build_kernel_benches(),
    }
}

/// The status of one sanitizer run from its outcome and log text: (status, errors, warnings).
pub fn run_status(
    timed_out: bool,
    code: Option<i32>,
    log: &str,
) -> (String, Option<u64>, Option<u64>) {
    if log.contains(INTERNAL_ERROR) {
        return ("sanitizer internal error".into(), None, None);
    }
    match (timed_out, parse_summary(log)) {
        (true, _) => ("timed out".into(), None, None),
        (false, Some((e, w))) if e == 0 && code == Some(0) => ("clean".into(), Some(e), Some(w)),
        (false, Some((e, w))) => (
            if e > 0 {
                "errors".into()
            } else {
                format!("exit {code:?}")
            },
            Some(e),
            Some(w),
        ),
        (false, None) => (format!("no summary (exit {code:?})"), None, None),
    }
}

/// `stem.ext` (a `.` in the stem stays: `freekv@0.5` gives `freekv@0.5.log`).
fn suffixed(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    s.into()
}

/// One compute-sanitizer run: `tool` over `program` (executable and arguments), the log in
/// `stem.log` and the program's stderr in `stem.stderr`.
struct SanitizerRun<'a> {
    sanitizer: &'a Path,
    tool: &'a str,
    /// What the printed line names (`--kv freekv`, `bench select`).
    label: String,
    stem: PathBuf,
    /// racecheck: instrument only the kernels matching this regex.
    kernels: Option<&'a str>,
    /// Environment variables set for the program.
    env: &'a [(&'a str, &'a str)],
    program: Vec<std::ffi::OsString>,
    timeout: Duration,
}

impl SanitizerRun<'_> {
    /// Runs it, prints one line and returns the summary row (`kv` names the subject).
    fn run(&self, kv: Value) -> Result<Value> {
        let log = suffixed(&self.stem, "log");
        let mut c = Command::new(self.sanitizer);
        c.args([
            "--tool",
            self.tool,
            "--error-exitcode",
            "86",
            "--print-limit",
            "200",
        ]);
        if self.tool == "memcheck" {
            c.args(["--leak-check", "full"]);
        }
        if let Some(re) = self.kernels {
            c.arg("--kernel-regex").arg(format!("kns={re}"));
        }
        c.arg("--log-file").arg(&log).args(&self.program);
        c.envs(self.env.iter().copied());
        let r = run_with_timeout(c, self.timeout)?;
        // The run's own messages (a failed run says why here, not in the sanitizer log).
        let err_log = suffixed(&self.stem, "stderr");
        std::fs::write(&err_log, &r.stderr)
            .with_context(|| format!("writing {}", err_log.display()))?;
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let (status, errors, warnings) = run_status(r.timed_out, r.code, &text);
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "sanitize: {:<9} {:<16} {status}: {} errors, {} warnings ({:.0} s) -> {}{}",
            self.tool,
            self.label,
            errors.map_or("?".into(), |e| e.to_string()),
            warnings.map_or("?".into(), |w| w.to_string()),
            r.secs,
            log.display(),
            if env.is_empty() {
                String::new()
            } else {
                format!(" ({})", env.join(" "))
            }
        );
        Ok(json!({
            "kv": kv,
            "tool": self.tool,
            "env": env,
            "status": status,
            "errors": errors,
            "warnings": warnings,
            "exit": r.code,
            "seconds": r.secs,
            "log": log.display().to_string(),
            "stderr_tail": last_line(&r.stderr),
        }))
    }
}

/// The outcome of one child process.
struct Ran {
    code: Option<i32>,
    timed_out: bool,
    stderr: String,
    secs: f64,
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Ran> {
    let t0 = Instant::now();
    // Its own process group, so that a timeout also stops what the sanitizer started (the
    // engine under the tool keeps the stderr pipe open: killing only the sanitizer left the
    // reader below waiting for the engine to finish).
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the run")?;
    let mut err_pipe = child.stderr.take().context("no stderr pipe")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t0.elapsed() > timeout {
            timed_out = true;
            #[cfg(unix)]
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(Ran {
        code: status.code(),
        timed_out,
        stderr: reader.join().unwrap_or_default(),
        secs: t0.elapsed().as_secs_f64(),
    })
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

/// Environment of an engine run under `tool`: [`RACECHECK_ENV`] for racecheck, nothing else.
fn engine_env(tool: &str) -> &'static [(&'static str, &'static str)] {
    if tool == "racecheck" {
        &RACECHECK_ENV
    } else {
        &[]
    }
}

/// The `freekv generate` arguments of one policy.
fn generate_args(o: &SanitizeOptions, kv: &str, model: &str) -> Vec<String> {
    let mut a: Vec<String> = ["generate", "--device", "cuda", "--kv", kv, "-n"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(o.tokens.to_string());
    if kv != "full" {
        a.push("--budget".into());
        a.push(o.budget.to_string());
    }
    a.push("--model".into());
    a.push(model.to_string());
    a.extend(o.extra.iter().cloned());
    if model.starts_with("synthetic:") {
        let ids: Vec<String> = (0..o.prompt_tokens)
            .map(|i| (1 + (i * 7919) % 30000).to_string())
            .collect();
        a.push("--prompt-ids".into());
        a.push(ids.join(","));
    } else {
        // About one token per word.
        let words = "the lighthouse keeper wrote down every ship that passed the cape ";
        let n = o.prompt_tokens / words.split_whitespace().count() + 1;
        a.push(words.repeat(n).trim_end().to_string());
    }
    a
}

/// Runs `cargo xtask sanitize`.
pub fn run(o: &SanitizeOptions) -> Result<()> {
    if let Some(dir) = &o.bundle {
        return bundle(dir);
    }
    let (freekv, out_dir) = match &o.prebuilt {
        Some(dir) => (
            dir.join("freekv"),
            o.out.clone().unwrap_or_else(|| dir.join("sanitize-out")),
        ),
        None => {
            let root = crate::bench::root();
            let release = cargo_build_release(&root, &["freekv-cli"])?;
            let out = match &o.out {
                Some(p) if p.is_absolute() => p.clone(),
                Some(p) => root.join(p),
                None => root.join("target").join("sanitize"),
            };
            (release.join("freekv"), out)
        }
    };
    if !freekv.is_file() {
        bail!(
            "{} not found (make it with `cargo xtask sanitize --bundle`)",
            freekv.display()
        );
    }
    if !gpu_present() {
        bail!(
            "no CUDA GPU found (nvidia-smi -L, /proc/driver/nvidia/gpus): run this on the GPU machine"
        );
    }
    let sanitizer = find_sanitizer(o.sanitizer.as_deref())?;
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let model = match &o.model {
        Some(m) => m.clone(),
        None => cached_default_model()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "synthetic:smollm2-135m".into()),
    };
    println!(
        "sanitize: {} with {}; model {model}; policies {}; tools {}; out {}",
        freekv.display(),
        sanitizer.display(),
        o.kv.join(","),
        o.tools.join(","),
        out_dir.display()
    );
    let timeout = Duration::from_secs(o.timeout_s);
    let mut rows: Vec<Value> = Vec::new();
    let mut failed = false;
    for kv in &o.kv {
        let args = generate_args(o, kv, &model);
        let mut plain = Command::new(&freekv);
        plain.args(&args);
        let p = run_with_timeout(plain, timeout)?;
        if p.timed_out || p.code != Some(0) {
            let why = if p.timed_out {
                format!("timed out after {} s", o.timeout_s)
            } else {
                last_line(&p.stderr)
            };
            println!("sanitize: --kv {kv}: the plain run failed, not sanitized: {why}");
            rows.push(json!({"kv": kv, "tool": null, "status": "run failed", "detail": why}));
            failed = true;
            continue;
        }
        println!(
            "sanitize: --kv {kv}: plain run ok in {:.1} s ({})",
            p.secs,
            last_line(&p.stderr)
        );
        for tool in &o.tools {
            let kernels = match (&o.racecheck_kernels, tool.as_str()) {
                (Some(re), "racecheck") => Some(re.as_str()),
                _ => None,
            };
            let mut program = vec![freekv.as_os_str().to_owned()];
            program.extend(args.iter().map(Into::into));
            let run = SanitizerRun {
                sanitizer: &sanitizer,
                tool,
                label: format!("--kv {kv}"),
                stem: out_dir.join(format!("{tool}-{kv}")),
                kernels,
                env: engine_env(tool),
                program,
                timeout,
            };
            let row = run.run(json!(kv))?;
            failed |= row["status"] != "clean";
            rows.push(row);
        }
    }
    if o.kernel_benches {
        let bins = kernel_bench_bins(o)?;
        if bins.is_empty() {
            println!(
                "sanitize: no kernel benches next to {} (make them with `cargo xtask sanitize --bundle`)",
                freekv.display()
            );
        }
        for (name, bin) in bins {
            for tool in &o.tools {
                let run = SanitizerRun {
                    sanitizer: &sanitizer,
                    tool,
                    label: format!("bench {name}"),
                    stem: out_dir.join(format!("{tool}-bench-{name}")),
                    kernels: None,
                    env: &[],
                    program: vec![bin.clone().into(), "--bench".into(), "--test".into()],
                    timeout,
                };
                let row = run.run(json!(format!("kernels: {name} bench")))?;
                failed |= row["status"] != "clean";
                rows.push(row);
            }
        }
    }
    if rows
        .iter()
        .any(|r| r["status"] == "sanitizer internal error")
    {
        println!(
            "sanitize: \"{INTERNAL_ERROR}\" is the tool failing (racecheck on the H200 stopped \
             inside a cuBLAS GEMM; the engine's racecheck runs use FREEKV_GEMM=native), not a \
             finding in the code; the kernel-bench rows cover the FreeKV kernels"
        );
    }
    let summary = json!({
        "freekv": freekv.display().to_string(),
        "sanitizer": sanitizer.display().to_string(),
        "model": model,
        "tokens": o.tokens,
        "prompt_tokens": o.prompt_tokens,
        "budget": o.budget,
        "extra_args": o.extra,
        "racecheck_kernels": o.racecheck_kernels,
        "runs": rows,
    });
    let path = out_dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("\n| tool | --kv | status | errors | warnings |\n|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            r["tool"].as_str().unwrap_or("(plain run)"),
            r["kv"].as_str().unwrap_or(""),
            r["status"].as_str().unwrap_or(""),
            r["errors"],
            r["warnings"]
        );
    }
    println!("sanitize: summary in {}", path.display());
    if failed {
        bail!("compute-sanitizer found problems or a run failed (see above)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn options() {
        let o = SanitizeOptions::parse(&args(&[
            "--prebuilt",
            "b",
            "--tools",
            "memcheck,synccheck",
            "--kv",
            "freekv",
            "-n",
            "8",
            "--",
            "--tau",
            "0.5",
        ]))
        .unwrap();
        assert_eq!(o.prebuilt, Some(PathBuf::from("b")));
        assert_eq!(o.tools, args(&["memcheck", "synccheck"]));
        assert_eq!((o.kv.clone(), o.tokens), (args(&["freekv"]), 8));
        assert_eq!(o.extra, args(&["--tau", "0.5"]));
        let b = SanitizeOptions::parse(&args(&["--bundle"])).unwrap();
        assert_eq!(b.bundle, Some(PathBuf::from(DEFAULT_BUNDLE_DIR)));
        let b = SanitizeOptions::parse(&args(&["--bundle", "x", "--kv", "full"])).unwrap();
        assert_eq!(b.bundle, Some(PathBuf::from("x")));
        assert!(SanitizeOptions::parse(&args(&["--tools", "leakcheck"])).is_err());
        assert!(SanitizeOptions::parse(&args(&["-n", "0"])).is_err());
        assert_eq!(
            o.racecheck_kernels.as_deref(),
            Some(DEFAULT_RACECHECK_KERNELS)
        );
        let r = SanitizeOptions::parse(&args(&["--racecheck-kernels", "all"])).unwrap();
        assert_eq!(r.racecheck_kernels, None);
        let r = SanitizeOptions::parse(&args(&["--racecheck-kernels", "decode_attn"])).unwrap();
        assert_eq!(r.racecheck_kernels.as_deref(), Some("decode_attn"));
        assert!(SanitizeOptions::parse(&args(&["--racecheck-kernels"])).is_err());
        assert!(SanitizeOptions::parse(&args(&["--racecheck-kernels", " "])).is_err());
    }

    /// A timeout stops the whole process group: a grandchild holding stderr open (as the engine
    /// under compute-sanitizer does) must not keep the run waiting.
    #[cfg(unix)]
    #[test]
    fn timeout_stops_grandchildren_too() {
        let mut c = Command::new("sh");
        c.args(["-c", "sleep 30 & sleep 30"]);
        let r = run_with_timeout(c, Duration::from_millis(300)).unwrap();
        assert!(r.timed_out);
        assert!(r.secs < 10.0, "waited {} s", r.secs);
    }

    #[test]
    fn racecheck_runs_use_the_native_gemm() {
        assert_eq!(engine_env("racecheck"), &[("FREEKV_GEMM", "native")]);
        assert!(engine_env("memcheck").is_empty() && engine_env("synccheck").is_empty());
        assert!(usage().contains("FREEKV_GEMM=native"));
    }

    #[test]
    fn log_names_keep_dots() {
        assert_eq!(
            suffixed(Path::new("out/racecheck-freekv@0.5"), "log"),
            PathBuf::from("out/racecheck-freekv@0.5.log")
        );
    }

    #[test]
    fn run_statuses() {
        let clean = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n";
        assert_eq!(run_status(false, Some(0), clean).0, "clean");
        assert_eq!(run_status(true, None, clean).0, "timed out");
        let found = "========= ERROR SUMMARY: 3 errors\n";
        assert_eq!(
            run_status(false, Some(86), found),
            ("errors".to_string(), Some(3), Some(0))
        );
        // The tool failing inside cuBLAS also prints a racecheck summary with one "hazard":
        // it must not read as a finding.
        let internal = "========= Internal Sanitizer Error: The Sanitizer failed to handle a \
                        hardware exception.\n========= Target application returned an error\n\
                        ========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)\n";
        assert_eq!(
            run_status(false, Some(1), internal),
            ("sanitizer internal error".to_string(), None, None)
        );
        assert_eq!(
            run_status(false, Some(1), "no summary here").0,
            "no summary (exit Some(1))"
        );
        assert_eq!(
            run_status(false, Some(2), "ERROR SUMMARY: 0 errors").0,
            "exit Some(2)"
        );
        assert!(
            SanitizeOptions::parse(&args(&["--no-kernel-benches"]))
                .is_ok_and(|o| !o.kernel_benches)
        );
    }

    #[test]
    fn summaries() {
        assert_eq!(
            parse_summary("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"),
            Some((0, 0))
        );
        assert_eq!(
            parse_summary("...\n========= ERROR SUMMARY: 12 errors (2 suppressed)\n"),
            Some((12, 0))
        );
        assert_eq!(
            parse_summary("========= ERROR SUMMARY: 1 error\n"),
            Some((1, 0))
        );
        assert_eq!(
            parse_summary(
                "========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n"
            ),
            Some((1, 2))
        );
        assert_eq!(parse_summary("========= COMPUTE-SANITIZER\n"), None);
    }

    #[test]
    fn policy_arguments() {
        let o = SanitizeOptions {
            prompt_tokens: 4,
            ..SanitizeOptions::default()
        };
        let a = generate_args(&o, "freekv", "synthetic:smollm2-135m");
        let s = a.join(" ");
        assert!(
            s.starts_with("generate --device cuda --kv freekv -n 16 --budget 256"),
            "{s}"
        );
        assert_eq!(a.last().map(|l| l.split(',').count()), Some(4));
        let a = generate_args(&o, "full", "m.gguf");
        assert!(!a.contains(&"--budget".to_string()));
        assert!(a.last().unwrap().starts_with("the lighthouse"));
    }
}
