//! `cargo xtask bench`: orchestration of the criterion runs, the end-to-end matrix, the
//! ceilings and the peers; writing the JSON, markdown and SVG outputs. With `--prebuilt DIR`
//! it runs on a machine without cargo from a bundle made by `cargo xtask bench-bundle`.

use crate::bundle::{self, Manifest};
use crate::criterion::{self, Estimate};
use crate::runner::{self, BenchBin, Budget, Mode, Target};
use crate::{gpu_e2e, probe, report, svg};
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

/// Command-line options of `bench`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Options {
    pub quick: bool,
    pub cpu_only: bool,
    pub gpu_only: bool,
    pub peers: Vec<String>,
    pub out: Option<PathBuf>,
    pub no_criterion: bool,
    pub no_e2e: bool,
    /// Only these criterion bench targets (empty: all that apply).
    pub targets: Vec<String>,
    /// Run the bench binaries of this bundle (`cargo xtask bench-bundle`) instead of cargo.
    pub prebuilt: Option<PathBuf>,
    /// Time budget of the whole run, minutes: what does not fit is skipped (and said so), a
    /// bench still running at the end is stopped and keeps what it measured.
    pub max_minutes: Option<f64>,
    /// GPU name to assume instead of detecting one (`FREEKV_XTASK_ASSUME_GPU`): rehearses the
    /// GPU flow on a machine without a GPU, where the GPU benches say "skipped: no CUDA device".
    pub assume_gpu: Option<String>,
}

impl Options {
    /// Parses the arguments after `bench`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            assume_gpu: std::env::var("FREEKV_XTASK_ASSUME_GPU")
                .ok()
                .filter(|n| !n.trim().is_empty()),
            ..Options::default()
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--cpu-only" => o.cpu_only = true,
                "--gpu-only" => o.gpu_only = true,
                "--no-criterion" => o.no_criterion = true,
                "--no-e2e" => o.no_e2e = true,
                "--peer" => {
                    let p = crate::flag_value(&mut it, "--peer", "hf or llamacpp")?;
                    for p in p.split(',') {
                        if p != "hf" && p != "llamacpp" {
                            bail!("unknown peer `{p}` (hf, llamacpp)");
                        }
                        o.peers.push(p.to_string());
                    }
                }
                "--targets" => {
                    let t = crate::flag_value(&mut it, "--targets", "a comma list")?;
                    o.targets
                        .extend(t.split(',').filter(|n| !n.is_empty()).map(str::to_string));
                }
                "--out" => {
                    o.out = Some(PathBuf::from(crate::flag_value(
                        &mut it, "--out", "a folder",
                    )?));
                }
                "--prebuilt" => {
                    o.prebuilt =
                        Some(PathBuf::from(it.next().ok_or_else(|| {
                            anyhow!("--prebuilt needs the bundle folder")
                        })?));
                }
                "--max-minutes" => {
                    let m: f64 = it
                        .next()
                        .and_then(|m| m.parse().ok())
                        .filter(|m: &f64| m.is_finite() && *m > 0.0)
                        .ok_or_else(|| anyhow!("--max-minutes needs a positive number"))?;
                    o.max_minutes = Some(m);
                }
                other => bail!("unknown bench option `{other}` (see cargo xtask help)"),
            }
        }
        if o.cpu_only && o.gpu_only {
            bail!("--cpu-only and --gpu-only exclude each other");
        }
        if o.prebuilt.is_some() {
            if o.cpu_only {
                bail!("--prebuilt runs the bundled GPU benches: not with --cpu-only");
            }
            if o.out.is_none() {
                bail!("--prebuilt needs --out DIR (the repository's docs/bench is not there)");
            }
            // The bundle holds the GPU benches; the CPU part needs cargo and the model.
            o.gpu_only = true;
        }
        Ok(o)
    }
}

/// Checks `--targets` names against the known targets and the benches at hand.
pub fn check_targets(names: &[String], available: &[String]) -> Result<()> {
    for n in names {
        if !available.contains(n) && Target::known(n, "").is_none() {
            let mut known: Vec<String> = runner::TARGETS
                .iter()
                .map(|t| t.bench.to_string())
                .chain(available.iter().cloned())
                .collect();
            known.sort();
            known.dedup();
            bail!("unknown bench target `{n}` (known: {})", known.join(", "));
        }
    }
    Ok(())
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub(crate) fn run_status(mut c: Command) -> Result<()> {
    let status = c
        .status()
        .with_context(|| format!("cannot run `{}`", crate::runner::show(&c)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", crate::runner::show(&c));
    }
    Ok(())
}

pub(crate) fn output(mut c: Command) -> Result<String> {
    let o = c
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run `{}`", crate::runner::show(&c)))?;
    if !o.status.success() {
        bail!(
            "`{}` failed: {}: {}",
            crate::runner::show(&c),
            o.status,
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Progress: one line per item with elapsed time and an ETA from the items' estimates, scaled
/// by how the finished items compared with theirs.
struct Progress {
    est: Vec<(String, f64)>,
    done: usize,
    t0: Instant,
    est_done: f64,
}

impl Progress {
    fn new(est: Vec<(String, f64)>) -> Self {
        Self {
            est,
            done: 0,
            t0: Instant::now(),
            est_done: 0.0,
        }
    }
    fn start(&mut self) {
        let el = self.t0.elapsed().as_secs_f64();
        let scale = if self.est_done > 0.0 {
            (el / self.est_done).clamp(0.3, 5.0)
        } else {
            1.0
        };
        let left: f64 = self.est.iter().skip(self.done).map(|e| e.1).sum::<f64>() * scale;
        let name = self
            .est
            .get(self.done)
            .map(|e| e.0.clone())
            .unwrap_or_default();
        println!(
            "[{}/{}] {name} (elapsed {:.0} s, ETA ~{:.0} s)",
            self.done + 1,
            self.est.len(),
            el,
            left
        );
    }
    fn finish(&mut self) {
        self.est_done += self.est.get(self.done).map_or(0.0, |e| e.1);
        self.done += 1;
    }
    /// Ends an item that was skipped (its estimate does not count towards the ETA scale).
    fn skip(&mut self) {
        self.done += 1;
    }
}

/// Runs one criterion bench binary, printing one line per finished benchmark (its id and
/// criterion's `time:` interval) as it goes; `skipped` lines become notes. Stops it at
/// `deadline`; returns whether it was stopped.
fn run_criterion(
    c: Command,
    bench: &str,
    deadline: Option<Instant>,
    notes: &mut Vec<String>,
) -> Result<bool> {
    let t0 = Instant::now();
    let mut id = String::new();
    let mut n = 0usize;
    let ended = runner::stream(c, deadline, |line| {
        let l = line.trim_end();
        if l.starts_with("skipped") || l.contains("not cached") {
            println!("  {bench}: {l}");
            notes.push(format!("criterion `{bench}`: {l}"));
        } else if l.starts_with("device:")
            || l.starts_with("model:")
            || l.contains("does not fit")
            || l.contains(" ms/step")
            || l.contains(": failed")
            || l.contains(": skipped")
        {
            // Progress lines of the end-to-end benches (`cuda_freekv` prints one per cell).
            println!("  {bench}: {l}");
        } else if let Some(k) = l.find("time:").filter(|_| !l.contains('%')) {
            // (`time:` lines with percentages are criterion's change against the last run.)
            let head = l[..k].trim();
            if !head.is_empty() {
                id = head.to_string();
            }
            n += 1;
            println!(
                "  {n:>3}. {id}: {} ({:.0} s)",
                l[k + 5..].trim(),
                t0.elapsed().as_secs_f64()
            );
        } else if !l.is_empty() && !l.starts_with(' ') && !l.starts_with('|') && !l.contains(':') {
            id = l.trim().to_string();
        }
    })?;
    if ended.killed {
        return Ok(true);
    }
    if !ended.status.success() {
        bail!("{}: {}", ended.status, ended.stderr_tail.join(" / "));
    }
    Ok(false)
}

pub fn parse_model_info(text: &str, name: &str) -> Result<Value> {
    let key = |suffix: &str| -> Option<f64> {
        text.lines().find_map(|l| {
            let l = l.trim();
            let (k, v) = l.split_once(" = ")?;
            if k.ends_with(suffix) {
                v.trim().parse().ok()
            } else {
                None
            }
        })
    };
    let layers = key(".block_count").ok_or_else(|| anyhow!("no block_count in `freekv info`"))?;
    let heads = key(".attention.head_count").ok_or_else(|| anyhow!("no head_count"))?;
    let kv_heads = key(".attention.head_count_kv").unwrap_or(heads);
    let emb = key(".embedding_length").ok_or_else(|| anyhow!("no embedding_length"))?;
    let head_dim = key(".attention.key_length").unwrap_or(emb / heads);
    let weight_bytes = text
        .lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix("tensors: ")?;
            let inner = rest.split_once('(')?.1;
            let bytes = inner.split(", ").nth(1)?;
            bytes.split_whitespace().next()?.parse::<f64>().ok()
        })
        .ok_or_else(|| anyhow!("no tensor byte total in `freekv info`"))?;
    Ok(json!({
        "name": name, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "weight_bytes": weight_bytes, "dense_layers": 1.0,
        "kv_bytes_per_token_layer": 2.0 * kv_heads * head_dim * 4.0,
    }))
}

fn default_model_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FREEKV_MODEL") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let home = std::env::var("FREEKV_HOME")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("XDG_CACHE_HOME")
                .map(|x| PathBuf::from(x).join("freekv"))
                .ok()
                .or_else(|| {
                    std::env::var("HOME")
                        .ok()
                        .map(|h| PathBuf::from(h).join(".cache/freekv"))
                })
        })?;
    Some(home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")).filter(|p| p.is_file())
}

const FILLER: &str = "The old lighthouse keeper climbed the spiral stairs each evening, counting the \
steps as his father had taught him. Below, the harbour filled with fishing boats returning from the \
grey sea, their nets heavy with silver fish. Gulls circled the masts, and the smell of salt and tar \
drifted up the cliff. ";

/// A prompt of about `tokens` tokens built from numbered repetitions of a filler paragraph
/// (`per_rep`: tokens of one repetition, measured with the model's tokenizer).
pub fn build_prompt(tokens: usize, per_rep: usize) -> String {
    let reps = tokens.div_ceil(per_rep.max(1) + 3).max(1);
    let mut s = String::new();
    for i in 0..reps {
        s.push_str(&format!("{}. {FILLER}", i + 1));
    }
    s
}

fn freekv_bin() -> PathBuf {
    root().join("target/release").join(if cfg!(windows) {
        "freekv.exe"
    } else {
        "freekv"
    })
}

/// The first NVIDIA GPU's name: from nvidia-smi, else from the driver's /proc entries.
fn detect_gpu() -> Option<String> {
    let smi = Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let name = String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()?
                .trim()
                .to_string();
            (!name.is_empty()).then_some(name)
        });
    smi.or_else(|| {
        let dir = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?;
        dir.filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path().join("information")).ok())
            .find_map(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
            })
    })
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A file name fragment from a GPU name: "NVIDIA H200" → "gpu-nvidia-h200".
pub fn host_kind(gpu: Option<&str>) -> String {
    match gpu {
        None => "cpu".into(),
        Some(g) => {
            let slug: String = g
                .to_lowercase()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            let slug: Vec<&str> = slug.split('-').filter(|p| !p.is_empty()).collect();
            format!("gpu-{}", slug.join("-"))
        }
    }
}

fn machine(gpu: Option<&str>) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let l3 = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index3/size")
        .ok()
        .and_then(|t| {
            let t = t.trim();
            let (n, mult) = match t.strip_suffix('K') {
                Some(n) => (n, 1024.0),
                None => match t.strip_suffix('M') {
                    Some(n) => (n, 1024.0 * 1024.0),
                    None => (t, 1.0),
                },
            };
            n.parse::<f64>().ok().map(|v| v * mult)
        });
    json!({
        "cpu": cpu, "l3_bytes": l3,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mem_gib": mem, "kernel": kernel, "gpu": gpu,
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn git_rev() -> String {
    let mut c = Command::new("git");
    c.current_dir(root()).args(["rev-parse", "--short", "HEAD"]);
    let rev = output(c)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mut c = Command::new("git");
    c.current_dir(root())
        .args(["status", "--porcelain", "--untracked-files=no"]);
    let dirty = output(c).map(|s| !s.trim().is_empty()).unwrap_or(false);
    if dirty {
        format!("{rev} (tree with uncommitted changes)")
    } else {
        rev
    }
}

/// Plan of the end-to-end CPU matrix: (target context, budget) pairs, policies, tokens, reps.
pub struct E2ePlan {
    pub contexts: Vec<usize>,
    pub policies: Vec<&'static str>,
    pub new_tokens: usize,
    pub reps: usize,
}

impl E2ePlan {
    pub fn new(quick: bool) -> Self {
        if quick {
            Self {
                contexts: vec![256, 1024],
                policies: vec!["full", "quest", "arkvale", "freekv"],
                new_tokens: 32,
                reps: 2,
            }
        } else {
            Self {
                contexts: vec![512, 1024, 2048, 4096],
                policies: vec!["full", "quest", "arkvale", "freekv"],
                new_tokens: 64,
                reps: 3,
            }
        }
    }
    /// Budget of the sparse policies at a context: a quarter of it, whole pages of 8, at least 128.
    pub fn budget(ctx: usize) -> usize {
        (ctx / 4 / 8 * 8).max(128)
    }
}

/// Where the binaries, scripts and scratch files of a run are.
struct Setup {
    bins: Vec<BenchBin>,
    freekv: PathBuf,
    peers: PathBuf,
    work: PathBuf,
    git: String,
    bundle: Option<(PathBuf, Manifest)>,
    /// Environment every bench gets (`CUDA_HOME` on the GPU machine, where NVRTC needs it).
    env: Vec<(String, String)>,
}

/// The bench binaries of a bundle folder, as [`BenchBin`]s (all GPU benches).
pub fn bundle_bins(dir: &Path, m: &Manifest) -> Vec<BenchBin> {
    m.benches
        .iter()
        .map(|b| BenchBin {
            name: b.name.clone(),
            package: b.package.clone(),
            exe: dir.join(&b.file),
            cwd: None,
            gpu: true,
        })
        .collect()
}

fn setup(o: &Options, cpu_part: bool, notes: &mut Vec<String>) -> Result<Setup> {
    if let Some(dir) = &o.prebuilt {
        let m = Manifest::load(dir)?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("bundle folder {}", dir.display()))?;
        let mut env = Vec::new();
        if std::env::var_os("CUDA_HOME").is_none() && Path::new("/usr/local/cuda/include").is_dir()
        {
            env.push(("CUDA_HOME".to_string(), "/usr/local/cuda".to_string()));
        }
        return Ok(Setup {
            bins: bundle_bins(&dir, &m),
            freekv: m.freekv.as_ref().map(|f| dir.join(f)).unwrap_or_default(),
            peers: dir.join("peers"),
            work: std::env::temp_dir().join(format!("freekv-xtask-bench-{}", std::process::id())),
            git: format!("{} (prebuilt bundle of {})", m.git, m.created),
            bundle: Some((dir, m)),
            env,
        });
    }
    println!("building the benches (cargo bench --workspace --no-run) ...");
    let (arts, n) = bundle::build_benches();
    notes.extend(n);
    let bins = arts
        .into_iter()
        .map(|a| {
            let src = std::fs::read_to_string(&a.src).unwrap_or_default();
            BenchBin {
                gpu: bundle::has_gpu_groups(&src),
                name: a.name,
                package: a.package,
                exe: a.exe,
                cwd: a.package_dir,
            }
        })
        .collect();
    if cpu_part {
        println!("building the freekv CLI ...");
        let mut c = cargo();
        c.args(["build", "--release", "-p", "freekv-cli", "--bin", "freekv"]);
        if let Err(e) = run_status(c) {
            if !freekv_bin().is_file() {
                return Err(e.context("building the freekv CLI"));
            }
            notes.push(format!(
                "building the freekv CLI failed ({e}); the existing binary was used"
            ));
        }
    }
    Ok(Setup {
        bins,
        freekv: freekv_bin(),
        peers: root().join("xtask/peers"),
        work: root().join("target/xtask-bench"),
        git: git_rev(),
        bundle: None,
        env: Vec::new(),
    })
}

/// Order of the GPU benches in a run (lower first): `cuda_freekv*`, `cuda_decode`, recall,
/// `kernels`, then the rest by name.
pub fn gpu_priority(name: &str) -> (u8, String) {
    let rank = if name.starts_with("cuda_freekv") {
        0
    } else if name == "cuda_decode" {
        1
    } else if name.contains("recall") {
        2
    } else if name == "kernels" {
        3
    } else {
        4
    };
    (rank, name.to_string())
}

/// `package/name` of a bench: how results files name the bench an estimate came from.
fn qualified(b: &BenchBin) -> String {
    format!("{}/{}", b.package, b.name)
}

/// The self-limit (`FREEKV_BENCH_MAX_SECONDS`) of an end-to-end bench: in a quick run 80 % of
/// its estimate; in a budgeted run its estimate, at most what is left less a minute (the
/// configuration running at the limit still finishes); none when unlimited or when the
/// caller set the variable.
pub fn e2e_self_limit(
    quick: bool,
    est_s: f64,
    left_s: f64,
    env_set: &dyn Fn(&str) -> bool,
) -> Option<f64> {
    if env_set("FREEKV_BENCH_MAX_SECONDS") {
        return None;
    }
    let share = if quick { 0.8 * est_s } else { est_s };
    if left_s.is_finite() {
        Some(share.min(left_s - 60.0).max(10.0))
    } else if quick {
        Some(share)
    } else {
        None
    }
}

/// Starts the next item when the budget admits it; else notes it as skipped.
fn admit(
    budget: &Budget,
    prog: &mut Progress,
    what: &str,
    est_s: f64,
    notes: &mut Vec<String>,
) -> bool {
    if budget.admits(est_s) {
        prog.start();
        return true;
    }
    let msg = format!(
        "skipped: {what} does not fit in the time budget (estimated {est_s:.0} s, {:.0} s left)",
        budget.left_s()
    );
    println!("  {msg}");
    notes.push(msg);
    prog.skip();
    false
}

/// Runs criterion bench binaries one after the other within the budget, collecting their
/// estimates (tagged with their bench) into `out`.
fn run_micro(
    benches: &[(BenchBin, runner::RunSpec)],
    budget: &Budget,
    prog: &mut Progress,
    env: &[(String, String)],
    notes: &mut Vec<String>,
    out: &mut Vec<Value>,
) -> Result<()> {
    for (b, sp) in benches {
        if !admit(
            budget,
            prog,
            &format!("criterion `{}`", b.name),
            sp.est_s,
            notes,
        ) {
            continue;
        }
        // This bench's own criterion folder, emptied: what is there afterwards is this run's.
        let _ = std::fs::remove_dir_all(&sp.criterion_home);
        let t_i = Instant::now();
        let mut c = runner::bench_command(b, sp);
        c.envs(env.iter().map(|(k, v)| (k, v)));
        // In a budgeted run one bench may take at most twice its estimate.
        let cap = budget.limited().then_some(2.0 * sp.est_s.max(30.0));
        match run_criterion(c, &b.name, budget.deadline(cap), notes) {
            Ok(true) => notes.push(format!(
                "criterion `{}` stopped after {:.0} s ({}); the benchmarks it finished are kept",
                b.name,
                t_i.elapsed().as_secs_f64(),
                if budget.left_s() <= 1.0 {
                    "the time budget"
                } else {
                    "twice its estimate, in a budgeted run"
                }
            )),
            Ok(false) => {}
            Err(e) => notes.push(format!("criterion `{}` failed: {e}", b.name)),
        }
        let done = criterion::collect(&sp.criterion_home, None)?;
        println!(
            "  {}: {} benchmarks in {:.0} s",
            b.name,
            done.len(),
            t_i.elapsed().as_secs_f64()
        );
        for e in done {
            let mut v = e.to_json();
            v["bench"] = json!(qualified(b));
            out.push(v);
        }
        prog.finish();
    }
    Ok(())
}

/// The GPU ceilings from `hf_decode.py --bandwidth-only` (torch, CUDA events).
fn gpu_probe(peers: &Path, deadline: Option<Instant>) -> Result<Value> {
    if !python_has("torch") {
        bail!("not measured (the probe needs python3 with torch)");
    }
    let mut c = Command::new("python3");
    c.arg(peers.join("hf_decode.py")).arg("--bandwidth-only");
    let mut v = None;
    let e = runner::stream(c, deadline, |l| {
        if let Ok(j) = serde_json::from_str::<Value>(l)
            && j.get("h2d_pinned_gbs").is_some()
        {
            v = Some(j);
        }
    })?;
    v.ok_or_else(|| anyhow!("no JSON line ({})", e.stderr_tail.join(" / ")))
}

/// Runs `cargo xtask bench` (or, with `--prebuilt`, `xtask bench` from a bundle).
pub fn run(o: &Options) -> Result<()> {
    let t_start = SystemTime::now();
    let budget = Budget::new(o.max_minutes, 15.0);
    let gpu = if o.cpu_only {
        None
    } else {
        o.assume_gpu.clone().or_else(detect_gpu)
    };
    if o.gpu_only && gpu.is_none() {
        bail!("--gpu-only: no GPU found (nvidia-smi, /proc/driver/nvidia)");
    }
    let cpu_part = !o.gpu_only;
    let host = host_kind(gpu.as_deref());
    let out_dir = o.out.clone().unwrap_or_else(|| root().join("docs/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out_dir = out_dir.canonicalize()?;
    let load0 = loadavg();
    println!(
        "{}xtask bench{}: host {host}{}, output {}{}",
        if o.prebuilt.is_some() { "" } else { "cargo " },
        if o.quick { " --quick" } else { "" },
        gpu.as_ref().map(|g| format!(" ({g})")).unwrap_or_default(),
        out_dir.display(),
        o.max_minutes
            .map(|m| format!(", time budget {m} min"))
            .unwrap_or_default()
    );
    let mut notes: Vec<String> = Vec::new();
    let s = setup(o, cpu_part, &mut notes)?;
    std::fs::create_dir_all(&s.work)?;
    let available: Vec<String> = s.bins.iter().map(|b| b.name.clone()).collect();
    check_targets(&o.targets, &available)?;
    let named = |n: &str| o.targets.iter().any(|t| t == n);
    let wanted = |n: &str| o.targets.is_empty() || named(n);
    let crit_dir = s.work.join("criterion");
    let env_set = |k: &str| std::env::var_os(k).is_some();

    // What runs: the CPU criterion targets, the GPU benches (end-to-end matrix, micro).
    let mut cpu_crit = Vec::new();
    if cpu_part && !o.no_criterion {
        let mode = Mode {
            quick: o.quick,
            gpu_only: false,
            as_gpu: false,
        };
        for t in runner::TARGETS.iter().filter(|t| t.cpu && wanted(t.bench)) {
            let bins: Vec<&BenchBin> = s
                .bins
                .iter()
                .filter(|b| b.name == t.bench && b.package == t.package)
                .collect();
            if bins.is_empty() {
                notes.push(format!(
                    "criterion `{}`: no bench binary (it did not build)",
                    t.bench
                ));
            }
            for b in bins {
                if let Some(sp) = runner::spec_for(
                    &b.name,
                    &b.package,
                    mode,
                    &crit_dir.join(format!("{}-{}", b.package, b.name)),
                    None,
                    &env_set,
                    named(&b.name),
                ) {
                    cpu_crit.push((b.clone(), sp));
                }
            }
        }
    }
    let mut gpu_e2e_runs = Vec::new();
    let mut gpu_micro = Vec::new();
    if gpu.is_some() {
        let mode = Mode {
            quick: o.quick,
            gpu_only: o.gpu_only,
            as_gpu: true,
        };
        for b in s.bins.iter().filter(|b| b.gpu && wanted(&b.name)) {
            let t = Target::of(&b.name, &b.package);
            if (t.cpu && cpu_part) || (t.e2e && o.no_e2e) || (!t.e2e && o.no_criterion) {
                continue;
            }
            let side = s.work.join(format!("side-{}-{}.json", b.package, b.name));
            if let Some(sp) = runner::spec_for(
                &b.name,
                &b.package,
                mode,
                &crit_dir.join(format!("{}-{}", b.package, b.name)),
                Some(side),
                &env_set,
                named(&b.name),
            ) {
                if t.e2e {
                    gpu_e2e_runs.push((b.clone(), sp));
                } else {
                    gpu_micro.push((b.clone(), sp));
                }
            }
        }
    }
    // The headline figures first: FreeKV's matrix before the full-KV one, recall and the
    // decode kernels before the other micro-benchmarks.
    gpu_e2e_runs.sort_by_key(|(b, _)| gpu_priority(&b.name));
    gpu_micro.sort_by_key(|(b, _)| gpu_priority(&b.name));
    let gpu_benches: Vec<String> = gpu_e2e_runs
        .iter()
        .chain(&gpu_micro)
        .filter(|(b, _)| !Target::of(&b.name, &b.package).cpu)
        .map(|(b, _)| qualified(b))
        .collect();

    // The plan, for progress lines and the budget.
    let plan = E2ePlan::new(o.quick);
    // The CLI on the CPU always; on a GPU machine also on CUDA (policies the CUDA path does not
    // support yet are reported as such).
    let backends: Vec<&str> = if gpu.is_some() {
        vec!["cpu", "cuda"]
    } else {
        vec!["cpu"]
    };
    let cpu_e2e = cpu_part && !o.no_e2e;
    let mut items: Vec<(String, f64)> = Vec::new();
    if cpu_part {
        items.push(("ceiling: CPU memory bandwidth".into(), 5.0));
    }
    if gpu.is_some() {
        items.push((
            "ceiling: GPU bandwidths (torch probe: host → device pinned, device copy)".into(),
            20.0,
        ));
    }
    for (b, sp) in &gpu_e2e_runs {
        items.push((format!("e2e gpu: {} bench", b.name), sp.est_s));
    }
    let peer_est = |p: &str| match (p, o.quick) {
        ("hf", true) => 90.0,
        ("hf", false) => 300.0,
        _ => 60.0,
    };
    let (micro_first, micro_rest): (Vec<_>, Vec<_>) = gpu_micro
        .into_iter()
        .partition(|(b, _)| gpu_priority(&b.name).0 <= 2);
    for (b, sp) in &micro_first {
        items.push((format!("criterion: {}", b.name), sp.est_s));
    }
    for p in o.peers.iter().filter(|p| *p == "hf") {
        items.push((format!("peer {p}"), peer_est(p)));
    }
    for (b, sp) in micro_rest.iter().chain(&cpu_crit) {
        items.push((format!("criterion: {}", b.name), sp.est_s));
    }
    let e2e_est =
        |ctx: usize| plan.reps as f64 * (ctx as f64 / 200.0 + plan.new_tokens as f64 / 60.0 + 0.5);
    if cpu_e2e {
        for &ctx in &plan.contexts {
            for b in &backends {
                for p in &plan.policies {
                    items.push((
                        format!("e2e {b}: {p} @ {ctx} tokens × {}", plan.reps),
                        e2e_est(ctx),
                    ));
                }
            }
        }
    }
    for p in o.peers.iter().filter(|p| *p != "hf") {
        items.push((format!("peer {p}"), peer_est(p)));
    }
    let mut prog = Progress::new(items);

    let mut ceilings = json!({});
    let mut results = json!({
        "schema": "freekv-bench/1", "host_kind": host, "date": now_utc(), "quick": o.quick,
        "git": s.git, "machine": machine(gpu.as_deref()),
        "options": {"targets": o.targets, "no_criterion": o.no_criterion, "no_e2e": o.no_e2e,
                    "cpu_only": o.cpu_only, "gpu_only": o.gpu_only, "peers": o.peers,
                    "max_minutes": o.max_minutes, "prebuilt": o.prebuilt.is_some()},
    });

    // Ceilings.
    if cpu_part {
        prog.start();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let bw = probe::cpu_bandwidth(256 << 20, threads, if o.quick { 3 } else { 8 });
        println!(
            "  CPU read {:.1} GB/s, copy {:.1} GB/s (read + written), {} threads",
            bw.read_gbs, bw.copy_gbs, bw.threads
        );
        ceilings["cpu_read_gbs"] = json!(bw.read_gbs);
        ceilings["cpu_copy_gbs"] = json!(bw.copy_gbs);
        ceilings["cpu_probe"] =
            json!({"threads": bw.threads, "bytes": bw.bytes, "estimate": "best of repetitions"});
        prog.finish();
    }
    if gpu.is_some()
        && admit(
            &budget,
            &mut prog,
            "the GPU bandwidth probe",
            20.0,
            &mut notes,
        )
    {
        match gpu_probe(&s.peers, budget.deadline(Some(120.0))) {
            Ok(v) => {
                println!(
                    "  host → device pinned {:.1} GB/s, device → host {:.1} GB/s, device copy {:.0} GB/s (read + written)",
                    v["h2d_pinned_gbs"].as_f64().unwrap_or(f64::NAN),
                    v["d2h_pinned_gbs"].as_f64().unwrap_or(f64::NAN),
                    v["d2d_copy_gbs"].as_f64().unwrap_or(f64::NAN)
                );
                ceilings["h2d_pinned_gbs"] = v["h2d_pinned_gbs"].clone();
                ceilings["d2h_pinned_gbs"] = v["d2h_pinned_gbs"].clone();
                ceilings["gpu_copy_gbs"] = v["d2d_copy_gbs"].clone();
                ceilings["gpu_probe"] = json!({
                    "by": "xtask/peers/hf_decode.py --bandwidth-only (torch, CUDA events, median of 10 copies)",
                    "bytes": v["bytes"], "device": v["device"]});
            }
            Err(e) => {
                println!("  GPU bandwidth probe: {e}");
                notes.push(format!("GPU bandwidth probe: {e}"));
            }
        }
        prog.finish();
    }

    // The GPU end-to-end matrix: each bench's side file, else its criterion ids.
    let mut e2e_meta = serde_json::Map::new();
    let mut e2e_rows: Vec<Value> = Vec::new();
    for (b, sp) in &gpu_e2e_runs {
        if !admit(
            &budget,
            &mut prog,
            &format!("the `{}` bench", b.name),
            sp.est_s,
            &mut notes,
        ) {
            continue;
        }
        if let Some(p) = &sp.side_json {
            let _ = std::fs::remove_file(p);
        }
        // This bench's own criterion folder, emptied: what is there afterwards is this run's.
        let _ = std::fs::remove_dir_all(&sp.criterion_home);
        let t_i = Instant::now();
        let mut c = runner::bench_command(b, sp);
        c.envs(s.env.iter().map(|(k, v)| (k, v)));
        // Benches that budget themselves (`FREEKV_BENCH_MAX_SECONDS`: start nothing after it)
        // get their share, so that they write their results before the run's deadline.
        if let Some(m) = e2e_self_limit(o.quick, sp.est_s, budget.left_s(), &env_set) {
            c.env("FREEKV_BENCH_MAX_SECONDS", format!("{m:.0}"));
        }
        let killed = match run_criterion(c, &b.name, budget.deadline(None), &mut notes) {
            Ok(k) => k,
            Err(e) => {
                notes.push(format!("`{}` failed: {e}", b.name));
                false
            }
        };
        let ests = criterion::collect(&sp.criterion_home, None)?;
        let side: Option<Value> = sp
            .side_json
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok());
        let (meta, rows) = gpu_e2e::bench_rows(&b.name, side.as_ref(), &ests);
        let source = meta["source"].as_str().unwrap_or("output");
        let msg = if rows.is_empty() {
            format!(
                "`{}`: no matrix rows, {source}, in {:.0} s",
                b.name,
                t_i.elapsed().as_secs_f64()
            )
        } else {
            format!(
                "`{}`: {} matrix rows (from its {source}) in {:.0} s",
                b.name,
                rows.len(),
                t_i.elapsed().as_secs_f64()
            )
        };
        println!("  {msg}");
        if killed {
            notes.push(format!("{msg}: stopped at the time budget"));
        }
        if ceilings["gpu_copy_gbs"].is_null()
            && let Some(bw) = meta.get("copy_bandwidth_gbs").filter(|v| v.is_number())
        {
            ceilings["gpu_copy_gbs"] = bw.clone();
        }
        e2e_meta.insert(b.name.clone(), meta);
        e2e_rows.extend(rows);
        prog.finish();
    }

    // Criterion micro-benchmarks, each into a folder of its own (CRITERION_HOME), so that
    // benches other people run at the same time in the shared target/criterion never mix into
    // these results. GPU recall first (a plot and a target of its own), then the HF peer (it
    // takes the matrix's shapes), then the other GPU benches, then the CPU ones.
    let mut crit_json: Vec<Value> = Vec::new();
    let env = &s.env;
    run_micro(
        &micro_first,
        &budget,
        &mut prog,
        env,
        &mut notes,
        &mut crit_json,
    )?;
    let mut peers = json!({});
    for p in o.peers.iter().filter(|p| *p == "hf") {
        if !admit(
            &budget,
            &mut prog,
            &format!("peer {p}"),
            peer_est(p),
            &mut notes,
        ) {
            peers[p.as_str()] = json!({"status": format!("peer {p}: skipped (time budget)")});
            continue;
        }
        let v = peer_hf(
            gpu.is_some(),
            &e2e_rows,
            &s.peers,
            &s.work,
            o.quick,
            &budget,
        );
        println!("  {}", v["status"].as_str().unwrap_or("peer ran"));
        peers[p.as_str()] = v;
        prog.finish();
    }

    let rest: Vec<(BenchBin, runner::RunSpec)> = micro_rest.into_iter().chain(cpu_crit).collect();
    run_micro(&rest, &budget, &mut prog, env, &mut notes, &mut crit_json)?;
    results["criterion"] = Value::Array(crit_json);

    // End to end on the CPU.
    let mut model_path = default_model_path();
    if cpu_e2e {
        let bin = &s.freekv;
        let model_args = |c: &mut Command, mp: &Option<PathBuf>| {
            if let Some(p) = mp {
                c.arg("--model").arg(p);
            }
        };
        let mut c = Command::new(bin);
        c.args(["tokenize", &format!("1. {FILLER}")]);
        model_args(&mut c, &model_path);
        let per_rep = output(c)?
            .trim()
            .split(',')
            .count()
            .saturating_sub(1)
            .max(1);
        model_path = model_path.or_else(default_model_path);
        let mut rows = Vec::new();
        for &ctx in &plan.contexts {
            let prompt = s.work.join(format!("prompt-{ctx}.txt"));
            std::fs::write(&prompt, build_prompt(ctx, per_rep))?;
            for backend in &backends {
                for p in &plan.policies {
                    if !admit(
                        &budget,
                        &mut prog,
                        &format!("e2e {backend} {p} @ {ctx}"),
                        e2e_est(ctx),
                        &mut notes,
                    ) {
                        continue;
                    }
                    let budget_tokens = E2ePlan::budget(ctx);
                    let mut row = json!({"backend": backend, "policy": p, "target_context": ctx,
                                         "new_tokens": plan.new_tokens});
                    if *p != "full" {
                        row["budget"] = json!(budget_tokens);
                    }
                    let (mut dec, mut pre) = (Vec::new(), Vec::new());
                    for _ in 0..plan.reps {
                        let mut c = Command::new(bin);
                        c.args(["generate", "--json", "--device", backend, "--kv", p]);
                        c.args(["--budget", &budget_tokens.to_string()]);
                        c.args(["-n", &plan.new_tokens.to_string(), "--prompt-file"]);
                        c.arg(&prompt);
                        model_args(&mut c, &model_path);
                        let g: Value = match output(c).and_then(|s| Ok(serde_json::from_str(&s)?)) {
                            Ok(g) => g,
                            Err(e) => {
                                let msg = format!("e2e {backend} {p} @ {ctx}: {e}");
                                println!("  {msg}");
                                row["note"] = json!(msg);
                                notes.push(msg);
                                break;
                            }
                        };
                        let t = &g["timings"];
                        dec.extend(t["decode_tok_s"].as_f64());
                        pre.extend(t["prefill_tok_s"].as_f64());
                        row["prompt_tokens"] = t["prompt_tokens"].clone();
                        let k = &g["kv_stats"];
                        row["pages_per_step"] = k["units_per_step"].clone();
                        row["correction_rate"] = k["correction_rate_kv_head"].clone();
                        row["bytes_per_step"] = k["bytes_per_step"].clone();
                    }
                    println!(
                        "  {backend} {p} @ {} tokens: decode {} tok/s",
                        row["prompt_tokens"],
                        report::median(&dec).map_or("-".into(), |x| format!("{x:.1}"))
                    );
                    row["decode_tok_s"] = json!(dec);
                    row["prefill_tok_s"] = json!(pre);
                    rows.push(row);
                    prog.finish();
                }
            }
        }
        results["e2e"] = Value::Array(rows);
    }
    if let Some(mp) = &model_path
        && cpu_part
    {
        let mut c = Command::new(&s.freekv);
        c.arg("info").arg("--model").arg(mp);
        let name = mp
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model")
            .to_string();
        match output(c).and_then(|t| parse_model_info(&t, &name)) {
            Ok(m) => results["model"] = m,
            Err(e) => notes.push(format!("model info: {e}")),
        }
    }
    if gpu.is_some() && (!e2e_rows.is_empty() || !e2e_meta.is_empty()) {
        results["gpu_e2e"] = json!({"benches": e2e_meta, "rows": e2e_rows});
    }
    if !gpu_benches.is_empty() {
        results["gpu_benches"] = json!(gpu_benches);
    }
    results["ceilings"] = ceilings; // The other peers (llama.cpp uses the CPU matrix's prompts).
    for p in o.peers.iter().filter(|p| *p != "hf") {
        if !admit(
            &budget,
            &mut prog,
            &format!("peer {p}"),
            peer_est(p),
            &mut notes,
        ) {
            peers[p.as_str()] = json!({"status": format!("peer {p}: skipped (time budget)")});
            continue;
        }
        let v = peer_llamacpp(&model_path, &plan, &s.work, &s.peers);
        println!("  {}", v["status"].as_str().unwrap_or("peer ran"));
        peers[p.as_str()] = v;
        prog.finish();
    }
    if !o.peers.is_empty() {
        results["peers"] = peers;
    }

    if let Some((_, m)) = &s.bundle {
        results["bundle"] = json!({"git": m.git, "created": m.created,
            "benches": m.benches.iter().map(|b| b.name.clone()).collect::<Vec<_>>()});
        notes.push(format!(
            "Prebuilt bundle (commit {}, built {}); load average {load0} at the start, {} at the end.",
            m.git,
            m.created,
            loadavg()
        ));
    } else {
        notes.push(format!(
            "This machine is shared: other processes (other helpers' builds and experiments) ran during the run; \
             load average {load0} at the start, {} at the end. Treat spreads accordingly.",
            loadavg()
        ));
    }
    let secs = SystemTime::now()
        .duration_since(t_start)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match o.max_minutes {
        Some(m) => notes.push(format!(
            "Wall time of the run: {secs} s (time budget {m} min)."
        )),
        None => notes.push(format!("Wall time of the run: {secs} s.")),
    }
    results["notes"] = json!(notes);

    // Plots, JSON, README.
    let plots = write_plots(&results, &out_dir, &host)?;
    results["plots"] = json!(plots);
    let json_path = out_dir.join(format!("results-{host}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    write_readme(&out_dir)?;
    if s.bundle.is_some() {
        // The scratch folder of a prebuilt run is this process's own.
        let _ = std::fs::remove_dir_all(&s.work);
    }
    println!(
        "wrote {}, README.md and {} plots in {} ({secs} s)",
        json_path.display(),
        plots.len(),
        out_dir.display()
    );
    Ok(())
}

/// The `--configs` of the HF peer: the (batch, context) cells of the GPU matrix on synthetic
/// llama-3.1-8b, in order, once each, at most `max` (without a matrix: the cells of the CUDA
/// decode report, 1/8/32 × 4096 and 1/4/8 × 32768).
pub fn hf_configs(rows: &[Value], max: usize) -> String {
    let mut configs: Vec<String> = Vec::new();
    for r in rows {
        if gpu_e2e::model_short(r["model"].as_str().unwrap_or_default()) != "llama-3.1-8b" {
            continue;
        }
        let (Some(b), Some(c)) = (r["batch"].as_u64(), r["context"].as_u64()) else {
            continue;
        };
        let cfg = format!("{b}:{c}");
        if !configs.contains(&cfg) {
            configs.push(cfg);
        }
    }
    if configs.is_empty() {
        // No matrix in this run: the cells of the CUDA decode report and FreeKV's batch 4.
        configs = [
            "1:4096", "8:4096", "32:4096", "1:32768", "4:32768", "8:32768",
        ]
        .map(String::from)
        .to_vec();
    }
    configs.truncate(max.max(1));
    configs.join(",")
}

fn peer_hf(
    has_gpu: bool,
    rows: &[Value],
    peers: &Path,
    work: &Path,
    quick: bool,
    budget: &Budget,
) -> Value {
    if !has_gpu {
        return json!({"status": "peer hf: skipped (no GPU; it runs on the GPU machine)"});
    }
    if !python_has("torch") || !python_has("transformers") {
        return json!({"status": "peer hf: not installed (python3 with torch and transformers)"});
    }
    let cap: f64 = if quick { 150.0 } else { 420.0 };
    let deadline_s = cap.min(budget.left_s() - 20.0).max(30.0);
    let path = work.join("hf.json");
    let _ = std::fs::remove_file(&path);
    let mut c = Command::new("python3");
    c.arg(peers.join("hf_decode.py"))
        .args([
            "--configs",
            &hf_configs(rows, if quick { 3 } else { usize::MAX }),
            "--deadline-s",
            &format!("{deadline_s:.0}"),
            "--compile-reserve-s",
            "75",
            "--json",
        ])
        .arg(&path)
        .env("PYTHONUNBUFFERED", "1");
    let mut streamed: Vec<Value> = Vec::new();
    let ended = runner::stream(c, budget.deadline(Some(deadline_s + 90.0)), |l| {
        if let Ok(v) = serde_json::from_str::<Value>(l)
            && v.get("form").is_some()
        {
            println!(
                "  hf {} b{} ctx {}: {} ms/step {}",
                v["form"].as_str().unwrap_or("?"),
                v["batch"],
                v["context"],
                v["ms_per_step"]
                    .as_f64()
                    .map_or("-".into(), |m| format!("{m:.2}")),
                v["note"].as_str().unwrap_or_default()
            );
            streamed.push(v);
        }
    });
    match ended {
        Err(e) => json!({"status": format!("peer hf: failed: {e}")}),
        Ok(e) => {
            if let Some(mut v) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            {
                v["status"] = json!("peer hf: ran");
                return v;
            }
            let status = if e.killed {
                "peer hf: stopped at the time budget; the configurations it finished are kept"
                    .to_string()
            } else if !e.status.success() {
                format!(
                    "peer hf: failed ({}): {}",
                    e.status,
                    e.stderr_tail.join(" / ")
                )
            } else {
                "peer hf: ran (no JSON file)".to_string()
            };
            let mut v = json!({ "status": status });
            if !streamed.is_empty() {
                v["rows"] = json!(streamed);
            }
            v
        }
    }
}

fn peer_llamacpp(model: &Option<PathBuf>, plan: &E2ePlan, work: &Path, peers: &Path) -> Value {
    if !python_has("llama_cpp") {
        return json!({"status": "peer llamacpp: not installed (pip install llama-cpp-python)"});
    }
    let Some(model) = model else {
        return json!({"status": "peer llamacpp: the default model is not cached"});
    };
    let prompts: Vec<String> = plan
        .contexts
        .iter()
        .map(|c| format!("{c}={}", work.join(format!("prompt-{c}.txt")).display()))
        .collect();
    let path = work.join("llamacpp.json");
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut c = Command::new("python3");
    c.arg(peers.join("llamacpp_decode.py"))
        .arg("--model")
        .arg(model)
        .args([
            "--prompts",
            &prompts.join(","),
            "--n",
            &plan.new_tokens.to_string(),
            "--threads",
            &threads.to_string(),
            "--json",
        ])
        .arg(&path);
    match run_status(c).and_then(|_| {
        Ok(serde_json::from_str::<Value>(&std::fs::read_to_string(
            &path,
        )?)?)
    }) {
        Ok(v) => v,
        Err(e) => json!({"status": format!("peer llamacpp: failed: {e}")}),
    }
}

/// Series of (x, y) per key from rows.
fn series_by(
    rows: &[Value],
    key: impl Fn(&Value) -> Option<String>,
    xy: impl Fn(&Value) -> Option<(f64, f64)>,
) -> Vec<svg::Series> {
    let mut out: Vec<svg::Series> = Vec::new();
    for r in rows {
        let (Some(k), Some(p)) = (key(r), xy(r)) else {
            continue;
        };
        match out.iter_mut().find(|s| s.name == k) {
            Some(s) => s.points.push(p),
            None => out.push(svg::Series {
                name: k,
                points: vec![p],
            }),
        }
    }
    out
}

fn med_tok_s(r: &Value) -> Option<f64> {
    report::median(
        &r["decode_tok_s"]
            .as_array()?
            .iter()
            .filter_map(Value::as_f64)
            .collect::<Vec<_>>(),
    )
}

/// Writes the SVG plots of a results file; returns their file names.
pub fn write_plots(res: &Value, dir: &Path, host: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut put = |name: String, text: String| -> Result<()> {
        std::fs::write(dir.join(&name), text)?;
        names.push(name);
        Ok(())
    };
    let e2e = res["e2e"].as_array().cloned().unwrap_or_default();
    let multi = e2e
        .iter()
        .any(|r| r["backend"].as_str().is_some_and(|b| b != "cpu"));
    let label = |r: &Value| -> Option<String> {
        let p = r["policy"].as_str()?;
        Some(if multi {
            format!("{} {p}", r["backend"].as_str().unwrap_or("cpu"))
        } else {
            p.to_string()
        })
    };
    if !e2e.is_empty() {
        let s = series_by(&e2e, label, |r| {
            Some((r["prompt_tokens"].as_f64()?, 1e3 / med_tok_s(r)?))
        });
        put(
            format!("step-time-{host}.svg"),
            svg::line_plot(
                "Decode step time per policy, freekv generate (batch 1, budget = context/4, at least 128)",
                "prompt tokens (log scale)",
                "ms per step (median)",
                &s,
                true,
            ),
        )?;
        let full: Vec<(&str, u64, f64)> = e2e
            .iter()
            .filter(|r| r["policy"] == "full")
            .filter_map(|r| {
                Some((
                    r["backend"].as_str().unwrap_or("cpu"),
                    r["target_context"].as_u64()?,
                    med_tok_s(r)?,
                ))
            })
            .collect();
        let s = series_by(
            &e2e,
            |r| label(r).filter(|_| r["policy"] != "full"),
            |r| {
                let (b, ctx) = (
                    r["backend"].as_str().unwrap_or("cpu"),
                    r["target_context"].as_u64()?,
                );
                let base = full.iter().find(|f| f.0 == b && f.1 == ctx)?.2;
                Some((r["prompt_tokens"].as_f64()?, med_tok_s(r)? / base))
            },
        );
        put(
            format!("speedup-vs-full-{host}.svg"),
            svg::line_plot(
                "Decode speed relative to full attention (same backend)",
                "prompt tokens (log scale)",
                "tok/s ÷ full's tok/s",
                &s,
                true,
            ),
        )?;
    }
    for (name, text) in gpu_e2e::plots(res, host) {
        put(name, text)?;
    }
    let gpu_benches = gpu_e2e::gpu_bench_names(res);
    let mut bars: Vec<(String, f64)> = res["criterion"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|v| !report::is_gpu_estimate(v, &gpu_benches))
                .filter_map(|v| Estimate::from_json(v).ok())
                .filter(|e| e.group.starts_with("recall"))
                .filter_map(|e| {
                    Some((
                        e.id.trim_start_matches("recall_").to_string(),
                        e.bytes_per_s()? / 1e9,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let gpu_bars: Vec<(String, f64)> = gpu_e2e::gpu_recall_bars(res)
        .into_iter()
        .map(|(g, id)| (id, g))
        .chain(gpu_e2e::row_recall_bars(res))
        .collect();
    let ceiling = if gpu_bars.is_empty() {
        res["ceilings"]["cpu_copy_gbs"]
            .as_f64()
            .map(|c| ("CPU copy ceiling (one way)", c / 2.0))
    } else {
        res["ceilings"]["h2d_pinned_gbs"]
            .as_f64()
            .map(|c| ("host → device pinned", c))
    };
    bars.extend(gpu_bars);
    if !bars.is_empty() {
        put(
            format!("recall-{host}.svg"),
            svg::bar_plot(
                "Recall throughput (criterion medians; GPU matrix rows)",
                "GB/s of recalled KV",
                &bars,
                ceiling,
            ),
        )?;
    }
    Ok(names)
}

/// `cargo xtask bench-report [DIR]`: re-renders the plots and `README.md` from the
/// `results-*.json` files already in `DIR` (default docs/bench), measuring nothing.
pub fn rerender(dir: Option<&Path>) -> Result<()> {
    let dir = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root().join("docs/bench"));
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = entry?.path();
        let Some(host) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("results-"))
            .and_then(|n| n.strip_suffix(".json"))
            .map(str::to_string)
        else {
            continue;
        };
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
            .with_context(|| format!("reading {}", p.display()))?;
        v["plots"] = json!(write_plots(&v, &dir, &host)?);
        std::fs::write(&p, serde_json::to_string_pretty(&v)? + "\n")?;
    }
    write_readme(&dir)
}

/// Combines two results files of one host kind (`later` ran after `earlier`, e.g. the
/// end-to-end matrix in one device call and the micro-benchmarks in another): criterion
/// estimates by id, the GPU matrix by bench, ceilings, peers and the GPU bench list key by
/// key, the later one winning; notes of both; the later date, machine and commit.
pub fn combine(earlier: &Value, later: &Value) -> Result<Value> {
    if earlier["host_kind"] != later["host_kind"] {
        bail!(
            "results of different host kinds ({} and {}) do not combine",
            earlier["host_kind"],
            later["host_kind"]
        );
    }
    let mut out = later.clone();
    let arr = |v: &Value, k: &str| v[k].as_array().cloned().unwrap_or_default();
    // Criterion: by id.
    let mut crit = arr(earlier, "criterion");
    for e in arr(later, "criterion") {
        crit.retain(|x| x["id"] != e["id"]);
        crit.push(e);
    }
    out["criterion"] = json!(crit);
    // The GPU matrix: a bench's rows come from its latest run.
    let g0 = earlier.get("gpu_e2e").cloned().unwrap_or(json!({}));
    let g1 = later.get("gpu_e2e").cloned().unwrap_or(json!({}));
    let mut benches = g0["benches"].as_object().cloned().unwrap_or_default();
    let newer = g1["benches"].as_object().cloned().unwrap_or_default();
    let mut rows: Vec<Value> = arr(&g0, "rows")
        .into_iter()
        .filter(|r| !r["bench"].as_str().is_some_and(|b| newer.contains_key(b)))
        .collect();
    rows.extend(arr(&g1, "rows"));
    benches.extend(newer);
    if !rows.is_empty() || !benches.is_empty() {
        out["gpu_e2e"] = json!({"benches": benches, "rows": rows});
    }
    for key in ["ceilings", "peers"] {
        let mut m = earlier[key].as_object().cloned().unwrap_or_default();
        m.extend(later[key].as_object().cloned().unwrap_or_default());
        if !m.is_empty() {
            out[key] = Value::Object(m);
        }
    }
    let mut gb = arr(earlier, "gpu_benches");
    for b in arr(later, "gpu_benches") {
        if !gb.contains(&b) {
            gb.push(b);
        }
    }
    if !gb.is_empty() {
        out["gpu_benches"] = json!(gb);
    }
    for key in ["e2e", "model"] {
        if out.get(key).is_none_or(Value::is_null) && !earlier[key].is_null() {
            out[key] = earlier[key].clone();
        }
    }
    let mut notes: Vec<Value> = arr(earlier, "notes")
        .into_iter()
        .map(|n| {
            json!(format!(
                "(run of {}) {}",
                earlier["date"].as_str().unwrap_or("?"),
                n.as_str().unwrap_or_default()
            ))
        })
        .collect();
    notes.extend(arr(later, "notes").into_iter().map(|n| {
        json!(format!(
            "(run of {}) {}",
            later["date"].as_str().unwrap_or("?"),
            n.as_str().unwrap_or_default()
        ))
    }));
    out["notes"] = json!(notes);
    if earlier["git"] != later["git"] {
        out["git"] = json!(format!(
            "{} + {}",
            earlier["git"].as_str().unwrap_or("?"),
            later["git"].as_str().unwrap_or("?")
        ));
    }
    out["quick"] = json!(earlier["quick"] == true && later["quick"] == true);
    let mut from = arr(earlier, "merged_options");
    if from.is_empty() {
        from.push(earlier["options"].clone());
    }
    from.push(later["options"].clone());
    out["merged_options"] = json!(from);
    // The run was partial in what both left out only.
    let both = |k: &str| earlier["options"][k] == true && later["options"][k] == true;
    let mut opts = later["options"].clone();
    for k in ["no_criterion", "no_e2e", "cpu_only", "gpu_only"] {
        if opts.is_object() {
            opts[k] = json!(both(k));
        }
    }
    if opts.is_object() {
        let t0 = arr(&earlier["options"], "targets");
        let t1 = arr(&later["options"], "targets");
        opts["targets"] = if t0.is_empty() || t1.is_empty() {
            json!([])
        } else {
            let mut t = t0;
            t.extend(t1);
            json!(t)
        };
        out["options"] = opts;
    }
    Ok(out)
}

fn read_results(src: &Path) -> Result<Value> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(src).with_context(|| format!("reading {}", src.display()))?,
    )
    .with_context(|| format!("parsing {}", src.display()))?;
    if v["schema"] != "freekv-bench/1" {
        bail!(
            "{}: not a results file of cargo xtask bench (schema {})",
            src.display(),
            v["schema"]
        );
    }
    Ok(v)
}

/// `cargo xtask bench-report --merge FILE [--merge FILE2 ...] [DIR]`: takes results files
/// written elsewhere (the GPU machine's `xtask bench --prebuilt ... --out $OUT/bench`), combined
/// in the order given when there are several of one host kind (see [`combine`]), into `DIR`
/// (default docs/bench) as `results-<host kind>.json`, replacing the one there; draws their
/// plots and rewrites `README.md` from every results file of `DIR`, so that it shows the latest
/// results of each host kind side by side. Returns the paths written.
pub fn merge(srcs: &[PathBuf], dir: Option<&Path>) -> Result<Vec<PathBuf>> {
    let dir = dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root().join("docs/bench"));
    let mut by_host: Vec<(String, Value)> = Vec::new();
    for src in srcs {
        let v = read_results(src)?;
        let host = v["host_kind"]
            .as_str()
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
            .ok_or_else(|| anyhow!("{}: no usable host_kind", src.display()))?
            .to_string();
        match by_host.iter_mut().find(|(h, _)| *h == host) {
            Some((_, acc)) => *acc = combine(acc, &v)?,
            None => by_host.push((host, v)),
        }
    }
    std::fs::create_dir_all(&dir)?;
    let mut written = Vec::new();
    for (host, mut v) in by_host {
        v["plots"] = json!(write_plots(&v, &dir, &host)?);
        let dst = dir.join(format!("results-{host}.json"));
        std::fs::write(&dst, serde_json::to_string_pretty(&v)? + "\n")?;
        written.push(dst);
    }
    write_readme(&dir)?;
    Ok(written)
}

/// `cargo xtask bench-report [--merge FILE ...] [DIR]`.
pub fn report_cmd(args: &[String]) -> Result<()> {
    let mut merge_from: Vec<PathBuf> = Vec::new();
    let mut dir: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--merge" => merge_from
                .push(PathBuf::from(it.next().ok_or_else(|| {
                    anyhow!("--merge needs a results JSON file")
                })?)),
            other if !other.starts_with('-') && dir.is_none() => dir = Some(PathBuf::from(other)),
            other => bail!("unknown bench-report argument `{other}`"),
        }
    }
    if merge_from.is_empty() {
        return rerender(dir.as_deref());
    }
    for dst in merge(&merge_from, dir.as_deref())? {
        println!("wrote {}", dst.display());
    }
    println!("README.md and the plots re-rendered");
    Ok(())
}

/// Rewrites `README.md` in `dir` from every `results-*.json` there.
pub fn write_readme(dir: &Path) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("results-") && n.ends_with(".json"))
        })
        .collect();
    files.sort();
    let mut md = String::from(README_HEAD);
    for f in files {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&f)?)
            .with_context(|| format!("reading {}", f.display()))?;
        md.push_str(&format!(
            "Raw results: [`{0}`]({0}).\n\n",
            f.file_name().and_then(|n| n.to_str()).unwrap_or_default()
        ));
        md.push_str(&report::render(&v));
    }
    std::fs::write(dir.join("README.md"), md)?;
    Ok(())
}

const README_HEAD: &str = "# Benchmarks\n\n\
Generated by `cargo xtask bench` (do not edit by hand: the command rewrites this file from the \
`results-*.json` files next to it, one section per host kind). Every figure comes from the run that \
wrote its JSON, together with the hardware ceilings measured in that same run.\n\n\
```sh\n\
cargo xtask bench --quick            # about two minutes on 2 cores: a subset, short criterion times\n\
cargo xtask bench                    # everything (criterion defaults shortened to 1 s warm-up, 3 s measurement)\n\
cargo xtask bench --cpu-only         # or --gpu-only\n\
cargo xtask bench --peer llamacpp    # llama-cpp-python on the CPU, same GGUF and prompts\n\
cargo xtask bench --peer hf          # Hugging Face transformers on the GPU, same shapes\n\
cargo xtask bench --out DIR          # write somewhere else than docs/bench\n\
cargo xtask bench --targets kv       # only some bench targets (here the KV policies' decode step)\n\
cargo xtask bench --max-minutes 9    # time budget: what does not fit is skipped and said so\n\
cargo xtask bench-report             # re-render this file and the plots from the JSON, measuring nothing\n\
cargo test -p xtask                  # tests of the parsing, tables, plots, bundle and merge\n\
```\n\n\
`--quick` runs: criterion with 0.3 s warm-up and 0.6 s measurement on a subset of each target \
(page transposes, selection and recall at two sizes, three dequantizers, tokenizer encode, one \
decode-step matrix product, prefill/decode at 37 tokens), no `kv` target, and the end-to-end matrix \
at 256 and 1024 tokens with 32 new tokens, twice each. A full run uses 1 s / 3 s criterion times, \
every benchmark of every target, and prompts of 512, 1K, 2K and 4K tokens with 64 new tokens, three \
times each (about half an hour on 2 cores).\n\n\
## On a GPU machine without cargo\n\n\
The GPU machine has the CUDA driver and python3 with torch and transformers but no Rust toolchain, \
so its half runs from prebuilt binaries:\n\n\
```sh\n\
cargo xtask bench-bundle                          # here: .device/bench (git-ignored), about 20-30 MiB\n\
./.device/bench/xtask bench --prebuilt .device/bench --gpu-only --out OUT/bench --peer hf --max-minutes 9\n\
cargo xtask bench-report --merge OUT/bench/results-gpu-nvidia-h200.json   # here: into docs/bench\n\
```\n\n\
* `bench-bundle` builds every bench (`cargo bench --workspace --no-run --message-format=json`; when \
the workspace does not build, package by package) and keeps the bench binaries with GPU groups \
(their source names CUDA or the GPU; `--add a,b` or `--only a,b` to choose), the xtask binary and \
the `freekv` CLI, stripped, with the peer scripts and `manifest.json` (bench name → file, commit). \
It says so when the bundle is over 50 MiB (the device tool carries at most 64 MiB with the tree).\n\
* `--prebuilt DIR` runs each bench binary directly (`BIN --bench [filter] --warm-up-time … \
--measurement-time …`, `CRITERION_HOME` in a scratch folder, `CUDA_HOME=/usr/local/cuda` when unset) \
in this order: the GPU bandwidth probe, the end-to-end benches (`cuda_freekv`, `cuda_decode`), the \
HF peer, then the micro-benchmarks (recall, kernels, the others). It writes only \
`results-<host>.json`, `README.md` and at most four SVGs into `--out`.\n\
* `--max-minutes N`: an item starts only when at least half its estimate (and 20 s) is left, a bench \
still running at the end is stopped (what criterion finished is kept), end-to-end benches get \
`FREEKV_BENCH_MAX_SECONDS` (their share, at most what is left less a minute), the HF peer its \
deadline; the report lists what was skipped or stopped. 15 s are kept for writing the results.\n\
* `bench-report --merge FILE [--merge FILE2 …] [DIR]` takes results written elsewhere into `DIR` \
(default docs/bench) as `results-<host>.json`, draws their plots and rewrites this file; several \
files of one host kind (say the matrix from one device call, the micro-benchmarks from another) \
are combined, the later winning bench by bench.\n\
* `FREEKV_XTASK_ASSUME_GPU=NAME` rehearses the GPU flow on a machine without a GPU (the GPU benches \
then print \"skipped: no CUDA device\").\n\n\
The GPU end-to-end matrix (backend × KV policy × batch × context) is generic: every bench run as \
an end-to-end bench (`cuda_decode*`, `cuda_freekv*`, `*e2e*`) gets `FREEKV_BENCH_JSON=path` and may \
write `{\"device\", \"model\", \"copy_bandwidth_gbs\", …, \"rows\": [...]}` there; each row gives `batch`, \
`context`, `ms_per_step` (or `ms_median`) and any of `model`, `scenario`, `policy` (default `full`), \
`budget`, `gen`, `ms_p90`, `ms_quarters`, `steps_measured` with `ms_windows` and `window_steps` \
(ratios of rows with unequal step counts compare the last window both measured), `floor_ms`, `recall_gbs`, `correction_rate` (or \
`stats.head_correction_rate`), `gpu_used_gib`, `host_kv_gib`, `note` (or `error`, `skipped`); any \
other number or string becomes a column of its own. A bench that writes no side file gives its rows \
through its criterion ids (`…/b4/ctx32768/freekv@2048`). Writing the side file after every row \
keeps the rows of a bench stopped at the time budget. Benches also see `FREEKV_BENCH_QUICK=1` with \
`--quick` and `FREEKV_BENCH_GPU_ONLY=1` with `--gpu-only`. New policies appear in the table, the \
ratios (`vs full` / `vs oracle` / `vs arkvale`), the targets and the plots with no change here.\n\n\
What runs:\n\n\
* **Criterion micro-benchmarks** (each bench binary of `cargo bench --workspace --no-run`, run with \
criterion's arguments): transposes, selection, the recall executor, dequantization, the tokenizer, \
the quantized matrix products, prefill/decode of the default model, the KV policies' decode step \
(full runs only) and, on a GPU machine, the CUDA kernels, GPU selection, the skinny products and \
GPU recall (timed with CUDA events). Medians, MAD and the 95 % interval of the median are read from \
`CRITERION_HOME/**/new/estimates.json`, one folder per bench (`target/xtask-bench/criterion/PACKAGE-BENCH` \
here, emptied before the bench runs, so that benches run by others at the same time never mix in).\n\
* **End-to-end matrix**: on the CPU, `freekv generate --json` on the default model (SmolLM2-135M-Instruct \
Q4_1) with the policies full / quest / arkvale / freekv at several prompt lengths (prompts built from a \
repeated, numbered paragraph; sparse budgets a quarter of the context); on a GPU machine the \
`cuda_freekv` bench (full / oracle / arkvale / freekv on a synthetic Llama-3.1-8B, long input and \
long generation, batch 1, 4, 16) and the `cuda_decode` bench (full KV, synthetic models, batch × \
context).\n\
* **Ceilings**: CPU streaming-read and copy bandwidth (a Rust probe over 256 MiB, all threads, best of \
several repetitions); on a GPU machine host → device and device → host pinned bandwidth and the \
device copy bandwidth (`xtask/peers/hf_decode.py --bandwidth-only`, torch, CUDA events), and the \
copy bandwidth `cuda_decode` measures for its floors.\n\
* **Peers**: `--peer hf` (`xtask/peers/hf_decode.py`, the matrix's Llama-3.1-8B shapes, eager and \
`torch.compile`), `--peer llamacpp` (`xtask/peers/llamacpp_decode.py`; when `llama_cpp` is not \
importable the run says so and goes on).\n\
* **Plots**: CPU: step time against context per policy, speed relative to full attention, recall \
GB/s. GPU: step time against context per policy and batch, speedup of each policy against full (and \
of freekv against arkvale) against batch size, throughput against batch size, recall GB/s against the \
pinned host → device bandwidth.\n\n\
On a CPU-only machine there is no batch dimension (the CLI decodes one sequence), so the \
\"speedup against batch size\" plot comes from a GPU run. For orientation only (not measured by \
this command unless `--peer llamacpp` runs): llama.cpp with the same GGUF on the 2-core CPU \
machine was quoted in issue 2 at about 90–125 tok/s decode on a short prompt, 57–67 at 1K, \
30–34 at 4K, and about 170 tok/s prefill.\n\n\
The hand-curated H200 report of the CUDA decoder against HF transformers is in \
[cuda-decode.md](cuda-decode.md).\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = Options::parse(&a(&["--quick", "--peer", "hf,llamacpp", "--out", "x"])).unwrap();
        assert!(o.quick && o.peers == ["hf", "llamacpp"] && o.out == Some(PathBuf::from("x")));
        assert!(Options::parse(&a(&["--peer", "vllm"])).is_err());
        assert!(Options::parse(&a(&["--cpu-only", "--gpu-only"])).is_err());
        assert!(Options::parse(&a(&["--out"])).is_err());
        assert!(Options::parse(&a(&["--bogus"])).is_err());
        let o = Options::parse(&a(&["--targets", "kv,recall"])).unwrap();
        assert_eq!(o.targets, ["kv", "recall"]);
        // Target names are checked against the benches at hand when the run starts.
        assert!(check_targets(&o.targets, &[]).is_ok());
        assert!(check_targets(&["nope".into()], &[]).is_err());
        assert!(check_targets(&["cuda_freekv".into()], &["cuda_freekv".into()]).is_ok());
        let o =
            Options::parse(&a(&["--prebuilt", "b", "--out", "o", "--max-minutes", "9"])).unwrap();
        assert!(o.gpu_only && o.prebuilt == Some(PathBuf::from("b")) && o.max_minutes == Some(9.0));
        assert!(Options::parse(&a(&["--prebuilt", "b"])).is_err());
        assert!(Options::parse(&a(&["--prebuilt", "b", "--out", "o", "--cpu-only"])).is_err());
        assert!(Options::parse(&a(&["--max-minutes", "0"])).is_err());
        assert!(Options::parse(&a(&["--max-minutes", "x"])).is_err());
    }

    #[test]
    fn model_info_parse() {
        let t = "x.gguf: GGUF v3\nmetadata (3 keys):\n  llama.block_count = 30\n  llama.embedding_length = 576\n  \
                 llama.attention.head_count = 9\n  llama.attention.head_count_kv = 3\n\
                 tensors: 272 (134515008 parameters, 96576768 bytes = 92.1 MiB)\n";
        let m = parse_model_info(t, "x.gguf").unwrap();
        assert_eq!(m["layers"], 30.0);
        assert_eq!(m["head_dim"], 64.0);
        assert_eq!(m["weight_bytes"], 96576768.0);
        assert_eq!(m["kv_bytes_per_token_layer"], 2.0 * 3.0 * 64.0 * 4.0);
        assert!(parse_model_info("nothing", "x").is_err());
    }

    #[test]
    fn host_kinds() {
        assert_eq!(host_kind(None), "cpu");
        assert_eq!(host_kind(Some("NVIDIA H200")), "gpu-nvidia-h200");
    }

    #[test]
    fn prompts_and_budgets() {
        let p = build_prompt(1000, 60);
        assert!(p.starts_with("1. The old lighthouse"));
        assert_eq!(p.matches("lighthouse").count(), 1000usize.div_ceil(63));
        assert_eq!(E2ePlan::budget(1024), 256);
        assert_eq!(E2ePlan::budget(256), 128);
    }

    #[test]
    fn plots_and_readme_from_results() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let res = json!({
            "host_kind": "cpu",
            "e2e": [
                {"policy": "full", "target_context": 256, "prompt_tokens": 250, "decode_tok_s": [100.0]},
                {"policy": "full", "target_context": 1024, "prompt_tokens": 1010, "decode_tok_s": [50.0]},
                {"policy": "freekv", "target_context": 256, "prompt_tokens": 250, "budget": 128, "decode_tok_s": [110.0]},
                {"policy": "freekv", "target_context": 1024, "prompt_tokens": 1010, "budget": 256, "decode_tok_s": [80.0]}
            ],
            "criterion": [{"id": "recall_f32/double_buffered/64", "group": "recall_f32", "median_ns": 1e6,
                           "median_ci_ns": [1e6, 1e6], "mad_ns": 1.0, "mean_ns": 1e6, "std_dev_ns": 1.0,
                           "throughput_kind": "bytes", "throughput_per_iter": 4000000}],
            "ceilings": {"cpu_copy_gbs": 20.0}
        });
        let names = write_plots(&res, &dir, "cpu").unwrap();
        assert_eq!(
            names,
            [
                "step-time-cpu.svg",
                "speedup-vs-full-cpu.svg",
                "recall-cpu.svg"
            ]
        );
        let step = std::fs::read_to_string(dir.join(&names[0])).unwrap();
        assert!(crate::svg::tests::well_formed(&step) && crate::svg::tests::coords_numeric(&step));
        assert!(step.contains("full: x=1010 y=20<"));
        assert!(step.contains("freekv: x=250 y=9.1"));
        let sp = std::fs::read_to_string(dir.join(&names[1])).unwrap();
        assert!(sp.contains("freekv: x=1010 y=1.6"));
        let rc = std::fs::read_to_string(dir.join(&names[2])).unwrap();
        assert!(rc.contains("f32/double_buffered/64: 4<"));
        // The GPU plots (results of the first version: rows under `cuda_decode`): step time
        // against context per batch, throughput against batch.
        let mut g = res.clone();
        g["cuda_decode"] = json!({"rows": [
            {"model": "synthetic:llama-3.1-8b", "batch": 1, "context": 4096, "ms_per_step": 5.0},
            {"model": "synthetic:llama-3.1-8b", "batch": 8, "context": 4096, "ms_per_step": 8.0},
            {"model": "synthetic:llama-3.1-8b", "batch": 1, "context": 32768, "ms_per_step": 6.0},
            {"model": "synthetic:llama-3.1-8b", "batch": 32, "context": 32768, "ms_per_step": null}]});
        let gn = write_plots(&g, &dir, "gpu-x").unwrap();
        assert!(gn.contains(&"step-time-cuda-gpu-x.svg".to_string()));
        assert!(!gn.contains(&"speedup-batch-gpu-x.svg".to_string()));
        let sb = std::fs::read_to_string(dir.join("throughput-batch-gpu-x.svg")).unwrap();
        assert!(crate::svg::tests::well_formed(&sb) && crate::svg::tests::coords_numeric(&sb));
        // batch 8 at 4096: 8 × 5 / 8 = 5× the batch-1 tokens/s.
        assert!(sb.contains("ctx 4K full: x=8 y=5<"), "{sb}");
        assert!(sb.contains("ctx 4K full: x=1 y=1<"));
        // GPU recall bars join the CPU's, against the pinned host → device bandwidth.
        g["ceilings"]["h2d_pinned_gbs"] = json!(50.0);
        g["gpu_benches"] = json!(["cuda_recall"]);
        g["criterion"].as_array_mut().unwrap().push(json!({"id": "gather/b4", "group": "gather",
            "bench": "cuda_recall", "median_ns": 1e6, "median_ci_ns": [1e6, 1e6], "mad_ns": 1.0,
            "mean_ns": 1e6, "std_dev_ns": 1.0, "throughput_kind": "bytes", "throughput_per_iter": 40000000}));
        write_plots(&g, &dir, "gpu-x").unwrap();
        let rc = std::fs::read_to_string(dir.join("recall-gpu-x.svg")).unwrap();
        assert!(
            rc.contains("gather/b4: 40<") && rc.contains("f32/double_buffered/64: 4<"),
            "{rc}"
        );
        assert!(rc.contains("host → device pinned: 50<"));
        std::fs::write(dir.join("results-cpu.json"), res.to_string()).unwrap();
        write_readme(&dir).unwrap();
        let md = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(md.starts_with("# Benchmarks"));
        assert!(md.contains("Raw results: [`results-cpu.json`](results-cpu.json)"));
        assert!(md.contains("| freekv | 1010 | 256 | 80.0 |"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn merge_takes_gpu_results_next_to_the_cpu_ones() {
        let dir = std::env::temp_dir().join(format!("xtask-merge-{}", std::process::id()));
        let docs = dir.join("docs");
        std::fs::create_dir_all(&docs).unwrap();
        let cpu = json!({"schema": "freekv-bench/1", "host_kind": "cpu", "date": "d1",
            "e2e": [{"policy": "full", "target_context": 256, "prompt_tokens": 250, "decode_tok_s": [100.0]}]});
        std::fs::write(docs.join("results-cpu.json"), cpu.to_string()).unwrap();
        let gpu = json!({"schema": "freekv-bench/1", "host_kind": "gpu-nvidia-h200", "date": "d2",
            "machine": {"gpu": "NVIDIA H200"}, "ceilings": {"h2d_pinned_gbs": 55.0},
            "gpu_e2e": {"benches": {"cuda_freekv": {}}, "rows": [
                {"bench": "cuda_freekv", "model": "m", "policy": "full", "batch": 4, "context": 32768, "ms_per_step": 20.0},
                {"bench": "cuda_freekv", "model": "m", "policy": "freekv", "batch": 4, "context": 32768, "ms_per_step": 8.0,
                 "recall_gbs": 48.0}]}});
        let src = dir.join("from-device.json");
        std::fs::write(&src, gpu.to_string()).unwrap();
        let dst = merge(std::slice::from_ref(&src), Some(&docs)).unwrap();
        assert_eq!(dst, [docs.join("results-gpu-nvidia-h200.json")]);
        let dst = &dst[0];
        let merged: Value = serde_json::from_str(&std::fs::read_to_string(dst).unwrap()).unwrap();
        assert_eq!(
            merged["plots"],
            json!([
                "step-time-cuda-gpu-nvidia-h200.svg",
                "speedup-batch-gpu-nvidia-h200.svg",
                "recall-gpu-nvidia-h200.svg"
            ])
        );
        for p in merged["plots"].as_array().unwrap() {
            assert!(docs.join(p.as_str().unwrap()).is_file());
        }
        let md = std::fs::read_to_string(docs.join("README.md")).unwrap();
        let (c, g) = (
            md.find("## Host `cpu`: d1").unwrap(),
            md.find("## Host `gpu-nvidia-h200`: d2").unwrap(),
        );
        assert!(c < g);
        assert!(
            md.contains("| m | freekv | 4 | 32768 | 8.000 | 500 | 2.50× |"),
            "{md}"
        );
        assert!(md.contains("![recall-gpu-nvidia-h200.svg](recall-gpu-nvidia-h200.svg)"));
        // Two runs of one host kind (the matrix, then the micro-benchmarks) combine.
        let mut micro = json!({"schema": "freekv-bench/1", "host_kind": "gpu-nvidia-h200", "date": "d3",
            "options": {"no_e2e": true, "gpu_only": true, "targets": []},
            "machine": {"gpu": "NVIDIA H200"}, "ceilings": {"gpu_copy_gbs": 4200.0},
            "criterion": [{"id": "gemm_x/tokens/1", "group": "gemm_x", "median_ns": 1e6, "median_ci_ns": [1e6, 1e6],
                "mad_ns": 1.0, "mean_ns": 1e6, "std_dev_ns": 1.0, "throughput_kind": "none"}],
            "notes": ["second"]});
        let src2 = dir.join("micro.json");
        std::fs::write(&src2, micro.to_string()).unwrap();
        merge(&[src.clone(), src2.clone()], Some(&docs)).unwrap();
        let md = std::fs::read_to_string(docs.join("README.md")).unwrap();
        assert!(
            md.contains("| m | freekv | 4 | 32768 | 8.000 | 500 | 2.50× |"),
            "{md}"
        );
        assert!(md.contains("| gemm_x/tokens/1 | 1.000 ms |"), "{md}");
        assert!(md.contains("* (run of d3) second"));
        assert!(md.contains("| GPU device-to-device copy | 4200 |"), "{md}");
        assert!(md.contains("| host → device, pinned | 55.0 |"), "{md}");
        assert!(!md.contains("Partial run"), "{md}");
        // A file of another kind is refused; so are two host kinds in one combination.
        micro["host_kind"] = json!("cpu");
        assert!(combine(&gpu, &micro).is_err());
        std::fs::write(&src, json!({"schema": "other"}).to_string()).unwrap();
        assert!(merge(std::slice::from_ref(&src), Some(&docs)).is_err());
        std::fs::write(
            &src,
            json!({"schema": "freekv-bench/1", "host_kind": "../x"}).to_string(),
        )
        .unwrap();
        assert!(merge(std::slice::from_ref(&src), Some(&docs)).is_err());
        assert!(report_cmd(&["--merge".into()]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hf_configs_follow_the_matrix() {
        let rows = vec![
            json!({"model": "synthetic:llama-3.1-8b", "batch": 1, "context": 4096}),
            json!({"model": "llama-3.1-8b", "policy": "freekv", "batch": 1, "context": 4096}),
            json!({"model": "synthetic:llama-3.1-8b", "batch": 4, "context": 32768}),
            json!({"model": "synthetic:qwen-2.5-7b", "batch": 1, "context": 4096}),
        ];
        assert_eq!(hf_configs(&rows, 9), "1:4096,4:32768");
        assert_eq!(hf_configs(&rows, 1), "1:4096");
        assert_eq!(hf_configs(&[], 3), "1:4096,8:4096,32:4096");
        assert_eq!(
            hf_configs(&[], 9),
            "1:4096,8:4096,32:4096,1:32768,4:32768,8:32768"
        );
    }

    #[test]
    fn bundle_folders_give_bench_binaries() {
        let m = Manifest {
            git: "abc".into(),
            created: "now".into(),
            benches: vec![crate::bundle::BundledBench {
                name: "kernels".into(),
                package: "freekv-kernels".into(),
                file: "bench-kernels".into(),
                bytes: 1,
            }],
            xtask: Some("xtask".into()),
            freekv: None,
            peers: vec![],
        };
        let b = bundle_bins(Path::new("/d"), &m);
        assert_eq!(
            b,
            [BenchBin {
                name: "kernels".into(),
                package: "freekv-kernels".into(),
                exe: PathBuf::from("/d/bench-kernels"),
                cwd: None,
                gpu: true
            }]
        );
    }

    /// A criterion-like bench script: prints a device line and one `time:` line, writes one
    /// benchmark into `CRITERION_HOME` and, when asked, a side file whose note records its
    /// arguments and the variables it got.
    fn fake_bench(dir: &Path, file: &str, id: &str, side_rows: &str) {
        use std::os::unix::fs::PermissionsExt;
        let (group, func) = id.split_once('/').unwrap();
        let est = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":4.9e6,"upper_bound":5.1e6},"point_estimate":5e6,"standard_error":1.0},"median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":4.9e6,"upper_bound":5.1e6},"point_estimate":5e6,"standard_error":1.0},"median_abs_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":1.0},"point_estimate":5e4,"standard_error":1.0},"slope":null,"std_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":1.0},"point_estimate":6e4,"standard_error":1.0}}"#;
        let bench = format!(
            r#"{{"group_id":"{group}","function_id":"{func}","value_str":null,"throughput":{{"BytesDecimal":250000000}},"full_id":"{id}","directory_name":"x","title":"{id}"}}"#
        );
        let script = format!(
            "#!/bin/sh\necho 'device: fake GPU'\nd=\"$CRITERION_HOME/{group}/{}/new\"\nmkdir -p \"$d\"\n\
             printf '%s' '{bench}' > \"$d/benchmark.json\"\nprintf '%s' '{est}' > \"$d/estimates.json\"\n\
             echo '{id}'\necho '                        time:   [4.9 ms 5.0 ms 5.1 ms]'\n\
             if [ -n \"$FREEKV_BENCH_JSON\" ] && [ -n '{side_rows}' ]; then\n\
             printf '{{\"device\": \"fake\", \"model\": \"synthetic:llama-3.1-8b (random weights, seed 1)\", \"rows\": [%s]}}' \
             '{side_rows}' | sed \"s|ARGS|$* max=$FREEKV_BENCH_MAX_SECONDS quick=$FREEKV_BENCH_QUICK gpu=$FREEKV_BENCH_GPU_ONLY|\" > \"$FREEKV_BENCH_JSON\"\nfi\n",
            func.replace('/', "_")
        );
        let path = dir.join(file);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn prebuilt_run_from_a_bundle_folder() {
        let dir = std::env::temp_dir().join(format!("xtask-prebuilt-{}", std::process::id()));
        let (bdir, out) = (dir.join("bundle"), dir.join("out"));
        std::fs::create_dir_all(bdir.join("peers")).unwrap();
        fake_bench(
            &bdir,
            "bench-cuda_freekv",
            "cuda_freekv/none",
            r#"{"scenario": "long-input", "context": 32768, "gen": 64, "batch": 4, "policy": "full", "ms_median": 20.0}, {"scenario": "long-input", "context": 32768, "gen": 64, "batch": 4, "policy": "freekv", "ms_median": 8.0, "note": "ARGS"}"#,
        );
        fake_bench(
            &bdir,
            "bench-cuda_recall",
            "cuda_recall_l8/gather_b16/bs4_32units",
            "",
        );
        let m = Manifest {
            git: "abc1234".into(),
            created: "2026-11-28 15:00 UTC".into(),
            benches: ["cuda_freekv:freekv-model", "cuda_recall:freekv-recall"]
                .iter()
                .map(|x| {
                    let (n, p) = x.split_once(':').unwrap();
                    crate::bundle::BundledBench {
                        name: n.into(),
                        package: p.into(),
                        file: format!("bench-{n}"),
                        bytes: 1,
                    }
                })
                .collect(),
            xtask: None,
            freekv: None,
            peers: vec![],
        };
        std::fs::write(bdir.join("manifest.json"), m.to_json().to_string()).unwrap();
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut o = Options::parse(&a(&[
            "--prebuilt",
            "x",
            "--out",
            "y",
            "--quick",
            "--max-minutes",
            "5",
        ]))
        .unwrap();
        o.prebuilt = Some(bdir.clone());
        o.out = Some(out.clone());
        o.assume_gpu = Some("Fake GPU 9000".into());
        run(&o).unwrap();
        let res: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("results-gpu-fake-gpu-9000.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            res["git"],
            "abc1234 (prebuilt bundle of 2026-11-28 15:00 UTC)"
        );
        assert_eq!(res["options"]["gpu_only"], true);
        // The matrix from the side file, with the model from its top level.
        let rows = res["gpu_e2e"]["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["model"], "synthetic:llama-3.1-8b");
        assert_eq!(rows[1]["ms_per_step"], 8.0);
        // The bench got `--bench` and the quick criterion times, its quick variables and a
        // self-limit within the budget.
        let note = rows[1]["note"].as_str().unwrap();
        assert!(
            note.starts_with(
                "--bench --warm-up-time 0.5 --measurement-time 1 max=136 quick=1 gpu=1"
            ),
            "{note}"
        );
        // The micro-benchmark: tagged with its bench, 250 MB in 5 ms = 50 GB/s of recall.
        let crit = res["criterion"].as_array().unwrap();
        assert_eq!(crit.len(), 1);
        assert_eq!(crit[0]["bench"], "freekv-recall/cuda_recall");
        assert_eq!(
            res["gpu_benches"],
            json!(["freekv-model/cuda_freekv", "freekv-recall/cuda_recall"])
        );
        let mut files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "README.md",
                "recall-gpu-fake-gpu-9000.svg",
                "results-gpu-fake-gpu-9000.json",
                "speedup-batch-gpu-fake-gpu-9000.svg",
                "step-time-cuda-gpu-fake-gpu-9000.svg"
            ]
        );
        let md = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(md.contains("| synthetic:llama-3.1-8b | long-input | freekv | 4 | 32768 | 64 | 8.000 | 500 | 2.50× |"), "{md}");
        assert!(
            md.contains(
                "recall ≥ 45 GB/s: met (best 50.0 GB/s, cuda_recall_l8/gather_b16/bs4_32units)"
            ),
            "{md}"
        );
        // A budget too small for anything: every item is skipped and said so; the results
        // are still written.
        o.max_minutes = Some(0.26);
        run(&o).unwrap();
        let res: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("results-gpu-fake-gpu-9000.json")).unwrap(),
        )
        .unwrap();
        let notes = res["notes"].to_string();
        assert!(
            notes.contains("skipped: the `cuda_freekv` bench does not fit in the time budget"),
            "{notes}"
        );
        assert!(
            notes.contains("skipped: criterion `cuda_recall` does not fit"),
            "{notes}"
        );
        assert!(res["criterion"].as_array().unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gpu_order_and_self_limits() {
        let mut v = vec![
            "gemv",
            "kernels",
            "cuda_recall",
            "cuda_decode",
            "select",
            "cuda_freekv",
        ];
        v.sort_by_key(|n| gpu_priority(n));
        assert_eq!(
            v,
            [
                "cuda_freekv",
                "cuda_decode",
                "cuda_recall",
                "kernels",
                "gemv",
                "select"
            ]
        );
        let unset = |_: &str| false;
        let set = |k: &str| k == "FREEKV_BENCH_MAX_SECONDS";
        assert_eq!(
            e2e_self_limit(true, 100.0, f64::INFINITY, &unset),
            Some(80.0)
        );
        assert_eq!(e2e_self_limit(false, 240.0, f64::INFINITY, &unset), None);
        assert_eq!(e2e_self_limit(false, 240.0, 500.0, &unset), Some(240.0));
        assert_eq!(e2e_self_limit(false, 240.0, 200.0, &unset), Some(140.0));
        assert_eq!(e2e_self_limit(false, 240.0, 30.0, &unset), Some(10.0));
        assert_eq!(e2e_self_limit(true, 100.0, 500.0, &set), None);
    }
}
