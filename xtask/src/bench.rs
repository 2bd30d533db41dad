//! `cargo xtask bench`: orchestration of the criterion runs, the end-to-end matrix, the
//! ceilings and the peers; writing the JSON, markdown and SVG outputs.

use crate::criterion::{self, Estimate};
use crate::{probe, report, svg};
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
}

impl Options {
    /// Parses the arguments after `bench`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--cpu-only" => o.cpu_only = true,
                "--gpu-only" => o.gpu_only = true,
                "--no-criterion" => o.no_criterion = true,
                "--no-e2e" => o.no_e2e = true,
                "--peer" => {
                    let p = it
                        .next()
                        .ok_or_else(|| anyhow!("--peer needs hf or llamacpp"))?;
                    for p in p.split(',') {
                        if p != "hf" && p != "llamacpp" {
                            bail!("unknown peer `{p}` (hf, llamacpp)");
                        }
                        o.peers.push(p.to_string());
                    }
                }
                "--targets" => {
                    let t = it
                        .next()
                        .ok_or_else(|| anyhow!("--targets needs a comma list"))?;
                    for name in t.split(',').filter(|n| !n.is_empty()) {
                        if !TARGETS.iter().any(|x| x.bench == name) {
                            let known: Vec<&str> = TARGETS.iter().map(|x| x.bench).collect();
                            bail!(
                                "unknown bench target `{name}` (known: {})",
                                known.join(", ")
                            );
                        }
                        o.targets.push(name.to_string());
                    }
                }
                "--out" => {
                    o.out = Some(PathBuf::from(
                        it.next().ok_or_else(|| anyhow!("--out needs a folder"))?,
                    ));
                }
                other => bail!("unknown bench option `{other}` (see cargo xtask help)"),
            }
        }
        if o.cpu_only && o.gpu_only {
            bail!("--cpu-only and --gpu-only exclude each other");
        }
        Ok(o)
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run_status(mut c: Command) -> Result<()> {
    let status = c.status().with_context(|| format!("cannot run {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

fn output(mut c: Command) -> Result<String> {
    let o = c
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {c:?}"))?;
    if !o.status.success() {
        bail!(
            "{c:?} failed: {}: {}",
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
    scale_t0: Instant,
    est_done: f64,
}

impl Progress {
    fn start(&mut self) {
        let el = self.t0.elapsed().as_secs_f64();
        let scale = if self.est_done > 0.0 {
            (self.scale_t0.elapsed().as_secs_f64() / self.est_done).clamp(0.3, 5.0)
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
    /// Ends the build item: its time (other people's edits, cold caches) says nothing about
    /// the rest, so the ETA scale restarts after it.
    fn finish_build(&mut self) {
        self.done += 1;
        self.scale_t0 = Instant::now();
    }
}

/// Runs one criterion bench target, printing one line per finished benchmark (its id and
/// criterion's `time:` interval) as it goes; `skipped` lines become notes.
fn stream_criterion(
    mut c: Command,
    bench: &str,
    t0: Instant,
    notes: &mut Vec<String>,
) -> Result<()> {
    use std::io::BufRead;
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().with_context(|| format!("cannot run {c:?}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    // Drain stderr on a thread (cargo's progress, criterion's warnings) so the child never blocks.
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        let mut tail = Vec::new();
        if let Some(e) = stderr {
            for l in std::io::BufReader::new(e).lines().map_while(Result::ok) {
                tail.push(l);
                if tail.len() > 5 {
                    tail.remove(0);
                }
            }
        }
        tail
    });
    let mut id = String::new();
    let mut n = 0usize;
    for line in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        let l = line.trim_end();
        if l.starts_with("skipped") || l.contains("not cached") {
            println!("  {bench}: {l}");
            notes.push(format!("criterion `{bench}`: {l}"));
        } else if l.starts_with("device:") {
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
        } else if !l.is_empty() && !l.starts_with(' ') && !l.contains(':') {
            id = l.trim().to_string();
        }
    }
    let status = child.wait()?;
    let tail = err_thread.join().unwrap_or_default();
    if !status.success() {
        bail!("{status}: {}", tail.join(" / "));
    }
    Ok(())
}

/// A criterion bench target and what to run of it.
struct CritTarget {
    bench: &'static str,
    gpu: bool,
    /// Criterion filter in quick mode (`None`: skipped in quick mode).
    quick_filter: Option<&'static str>,
    env: &'static [(&'static str, &'static str)],
    quick_env: &'static [(&'static str, &'static str)],
    est_s: f64,
    quick_est_s: f64,
}

const TARGETS: &[CritTarget] = &[
    CritTarget {
        bench: "transpose",
        gpu: false,
        quick_filter: Some("^transpose_page/.*/f32/P32_H3_d64"),
        env: &[],
        quick_env: &[],
        est_s: 120.0,
        quick_est_s: 4.0,
    },
    CritTarget {
        bench: "select",
        gpu: false,
        quick_filter: Some("mean-softmax/(256|1024)$"),
        env: &[],
        quick_env: &[],
        est_s: 170.0,
        quick_est_s: 5.0,
    },
    CritTarget {
        bench: "recall",
        gpu: false,
        quick_filter: Some("recall_f32_P32_H3_d64/(double_buffered|sync_direct)/(64|256)$"),
        env: &[],
        quick_env: &[],
        est_s: 260.0,
        quick_est_s: 6.0,
    },
    CritTarget {
        bench: "dequant",
        gpu: false,
        quick_filter: Some("^dequant/(q4_1|q8_0|q4_k)/4M$"),
        env: &[],
        quick_env: &[],
        est_s: 160.0,
        quick_est_s: 5.0,
    },
    CritTarget {
        bench: "tokenizer",
        gpu: false,
        quick_filter: Some("^encode/text-5k$"),
        env: &[],
        quick_env: &[],
        est_s: 40.0,
        quick_est_s: 4.0,
    },
    CritTarget {
        bench: "qmatmul",
        gpu: false,
        quick_filter: Some("^model/decode-step/2t$"),
        env: &[],
        quick_env: &[],
        est_s: 900.0,
        quick_est_s: 6.0,
    },
    CritTarget {
        bench: "decode",
        gpu: false,
        quick_filter: Some("^(prefill|decode)/37$"),
        env: &[],
        quick_env: &[("FREEKV_BENCH_SIZES", "37")],
        est_s: 240.0,
        quick_est_s: 10.0,
    },
    CritTarget {
        bench: "kv",
        gpu: false,
        quick_filter: None,
        env: &[("FREEKV_BENCH_CONTEXT", "2048")],
        quick_env: &[],
        est_s: 120.0,
        quick_est_s: 0.0,
    },
    CritTarget {
        bench: "kernels",
        gpu: true,
        quick_filter: Some("(decode_attention|gemm)"),
        env: &[],
        quick_env: &[],
        est_s: 200.0,
        quick_est_s: 30.0,
    },
];

/// Parses `freekv info` output into the figures the ceilings need.
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

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn git_rev() -> String {
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

/// Runs `cargo xtask bench`.
pub fn run(o: &Options) -> Result<()> {
    let t_start = SystemTime::now();
    let gpu = if o.cpu_only { None } else { detect_gpu() };
    if o.gpu_only && gpu.is_none() {
        bail!("--gpu-only: no GPU found (nvidia-smi)");
    }
    let cpu_part = !o.gpu_only;
    let host = host_kind(gpu.as_deref());
    let out_dir = o.out.clone().unwrap_or_else(|| root().join("docs/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let out_dir = out_dir.canonicalize()?;
    let work = root().join("target/xtask-bench");
    std::fs::create_dir_all(&work)?;
    let load0 = loadavg();
    println!(
        "cargo xtask bench{}: host {host}{}, output {}",
        if o.quick { " --quick" } else { "" },
        gpu.as_ref().map(|g| format!(" ({g})")).unwrap_or_default(),
        out_dir.display()
    );

    // The plan, for progress lines.
    let plan = E2ePlan::new(o.quick);
    // The CLI on the CPU always; on a GPU machine also on CUDA (policies the CUDA path does not
    // support yet are reported as such).
    let backends: Vec<&str> = if gpu.is_some() {
        vec!["cpu", "cuda"]
    } else {
        vec!["cpu"]
    };
    let mut items: Vec<(String, f64)> =
        vec![("build (cargo bench --no-run, freekv CLI)".into(), 20.0)];
    if cpu_part {
        items.push(("ceiling: CPU memory bandwidth".into(), 5.0));
    }
    let targets: Vec<&CritTarget> = if o.no_criterion {
        Vec::new()
    } else {
        TARGETS
            .iter()
            .filter(|t| if t.gpu { gpu.is_some() } else { cpu_part })
            .filter(|t| {
                if o.targets.is_empty() {
                    !o.quick || t.quick_filter.is_some()
                } else {
                    o.targets.iter().any(|n| n == t.bench)
                }
            })
            .collect()
    };
    for t in &targets {
        items.push((
            format!("criterion: {}", t.bench),
            if o.quick { t.quick_est_s } else { t.est_s },
        ));
    }
    if cpu_part && !o.no_e2e {
        for &ctx in &plan.contexts {
            for b in &backends {
                for p in &plan.policies {
                    let est = plan.reps as f64
                        * (ctx as f64 / 200.0 + plan.new_tokens as f64 / 60.0 + 0.5);
                    items.push((format!("e2e {b}: {p} @ {ctx} tokens × {}", plan.reps), est));
                }
            }
        }
    }
    if gpu.is_some() && !o.no_e2e {
        items.push((
            "e2e cuda: decode matrix (cuda_decode bench)".into(),
            if o.quick { 60.0 } else { 300.0 },
        ));
        items.push((
            "ceiling: host → device pinned bandwidth (torch probe)".into(),
            15.0,
        ));
    }
    for p in &o.peers {
        items.push((format!("peer {p}"), if p == "hf" { 300.0 } else { 60.0 }));
    }
    let mut prog = Progress {
        est: items,
        done: 0,
        t0: Instant::now(),
        scale_t0: Instant::now(),
        est_done: 0.0,
    };

    let mut notes: Vec<String> = Vec::new();
    let mut ceilings = json!({});
    let mut results = json!({
        "schema": "freekv-bench/1", "host_kind": host, "date": now_utc(), "quick": o.quick,
        "git": git_rev(), "machine": machine(gpu.as_deref()),
        "options": {"targets": o.targets, "no_criterion": o.no_criterion, "no_e2e": o.no_e2e,
                    "cpu_only": o.cpu_only, "gpu_only": o.gpu_only, "peers": o.peers},
    });

    // Build.
    prog.start();
    let mut c = cargo();
    c.args(["bench", "--workspace", "--bench", "*", "--no-run"]);
    if let Err(e) = run_status(c) {
        // Go on: each bench target reports its own failure below.
        notes.push(format!(
            "building the benches failed ({e}); targets that build still ran"
        ));
    }
    if cpu_part {
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
    prog.finish_build();

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

    // Criterion, into a folder of our own (CRITERION_HOME), so that benches other people run
    // at the same time in the shared target/criterion never mix into these results.
    let crit_dir = work.join("criterion");
    let crit_t0 = SystemTime::now();
    for t in &targets {
        prog.start();
        let t_target = SystemTime::now();
        let mut c = cargo();
        c.args(["bench", "--workspace", "--bench", t.bench, "--"]);
        c.env("CRITERION_HOME", &crit_dir);
        if o.quick {
            c.args([
                "--warm-up-time",
                "0.3",
                "--measurement-time",
                "0.6",
                "--sample-size",
                "10",
            ]);
            if let Some(f) = t.quick_filter {
                c.arg(f);
            }
            for (k, v) in t.quick_env {
                c.env(k, v);
            }
        } else {
            c.args(["--warm-up-time", "1", "--measurement-time", "3"]);
            for (k, v) in t.env {
                c.env(k, v);
            }
        }
        let t_bench = Instant::now();
        if let Err(e) = stream_criterion(c, t.bench, t_bench, &mut notes) {
            notes.push(format!("criterion `{}` failed: {e}", t.bench));
        }
        let done = criterion::collect(&crit_dir, Some(t_target))?;
        println!(
            "  {}: {} benchmarks in {:.0} s",
            t.bench,
            done.len(),
            t_bench.elapsed().as_secs_f64()
        );
        prog.finish();
    }
    let ests: Vec<Estimate> = criterion::collect(&crit_dir, Some(crit_t0))?;
    results["criterion"] = Value::Array(ests.iter().map(Estimate::to_json).collect());

    // End to end on the CPU.
    let mut model_path = default_model_path();
    if cpu_part && !o.no_e2e {
        let bin = freekv_bin();
        let model_args = |c: &mut Command, mp: &Option<PathBuf>| {
            if let Some(p) = mp {
                c.arg("--model").arg(p);
            }
        };
        let mut c = Command::new(&bin);
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
            let prompt = work.join(format!("prompt-{ctx}.txt"));
            std::fs::write(&prompt, build_prompt(ctx, per_rep))?;
            for backend in &backends {
                for p in &plan.policies {
                    prog.start();
                    let budget = E2ePlan::budget(ctx);
                    let mut row = json!({"backend": backend, "policy": p, "target_context": ctx,
                                         "new_tokens": plan.new_tokens});
                    if *p != "full" {
                        row["budget"] = json!(budget);
                    }
                    let (mut dec, mut pre) = (Vec::new(), Vec::new());
                    for _ in 0..plan.reps {
                        let mut c = Command::new(&bin);
                        c.args(["generate", "--json", "--device", backend, "--kv", p]);
                        c.args(["--budget", &budget.to_string()]);
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
        let mut c = Command::new(freekv_bin());
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

    // GPU: the CUDA decode matrix and the pinned-bandwidth probe.
    if gpu.is_some() && !o.no_e2e {
        prog.start();
        let json_path = work.join("cuda_decode.json");
        let _ = std::fs::remove_file(&json_path);
        let mut c = cargo();
        c.args(["bench", "--workspace", "--bench", "cuda_decode", "--"]);
        c.env("FREEKV_BENCH_JSON", &json_path);
        if o.quick {
            c.env(
                "FREEKV_BENCH_CONFIGS",
                "llama-3.1-8b:1:4096,llama-3.1-8b:8:4096,llama-3.1-8b:1:32768,smollm2-135m:1:512",
            );
            c.args(["--warm-up-time", "0.5", "--measurement-time", "1"]);
        }
        c.env("CRITERION_HOME", &crit_dir);
        let t_cd = Instant::now();
        match stream_criterion(c, "cuda_decode", t_cd, &mut notes)
            .and_then(|_| Ok(std::fs::read_to_string(&json_path)?))
        {
            Ok(t) => {
                let v: Value = serde_json::from_str(&t)?;
                ceilings["gpu_copy_gbs"] = v["copy_bandwidth_gbs"].clone();
                results["cuda_decode"] = v;
            }
            Err(e) => notes.push(format!("cuda_decode: {e}")),
        }
        prog.finish();
        prog.start();
        let script = root().join("xtask/peers/hf_decode.py");
        if python_has("torch") {
            let mut c = Command::new("python3");
            c.arg(&script).arg("--bandwidth-only");
            match output(c).and_then(|t| {
                t.lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<Value>(l).ok())
                    .ok_or_else(|| anyhow!("no JSON line"))
            }) {
                Ok(v) => ceilings["h2d_pinned_gbs"] = v["h2d_pinned_gbs"].clone(),
                Err(e) => notes.push(format!("pinned bandwidth probe: {e}")),
            }
        } else {
            notes.push(
                "host → device pinned bandwidth: not measured (the probe needs python3 with torch)"
                    .into(),
            );
        }
        prog.finish();
    }
    results["ceilings"] = ceilings;

    // Peers.
    let mut peers = json!({});
    for p in &o.peers {
        prog.start();
        let v = match p.as_str() {
            "hf" => peer_hf(gpu.is_some(), &results, &work, o.quick),
            _ => peer_llamacpp(&model_path, &plan, &work),
        };
        println!("  {}", v["status"].as_str().unwrap_or("peer ran"));
        peers[p.as_str()] = v;
        prog.finish();
    }
    if !o.peers.is_empty() {
        results["peers"] = peers;
    }

    notes.push(format!(
        "This machine is shared: other processes (other helpers' builds and experiments) ran during the run; \
         load average {load0} at the start, {} at the end. Treat spreads accordingly.",
        loadavg()
    ));
    let secs = SystemTime::now()
        .duration_since(t_start)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    notes.push(format!("Wall time of the run: {secs} s."));
    results["notes"] = json!(notes);

    // Plots, JSON, README.
    let plots = write_plots(&results, &out_dir, &host)?;
    results["plots"] = json!(plots);
    let json_path = out_dir.join(format!("results-{host}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&results)? + "\n")?;
    write_readme(&out_dir)?;
    println!(
        "wrote {}, README.md and {} plots in {} ({secs} s)",
        json_path.display(),
        plots.len(),
        out_dir.display()
    );
    Ok(())
}

fn peer_hf(has_gpu: bool, results: &Value, work: &Path, quick: bool) -> Value {
    if !has_gpu {
        return json!({"status": "peer hf: skipped (no GPU; it runs on the GPU machine)"});
    }
    if !python_has("torch") || !python_has("transformers") {
        return json!({"status": "peer hf: not installed (python3 with torch and transformers)"});
    }
    let configs: Vec<String> = results["cuda_decode"]["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .filter(|r| r["model"].as_str() == Some("synthetic:llama-3.1-8b"))
                .map(|r| format!("{}:{}", r["batch"], r["context"]))
                .collect()
        })
        .unwrap_or_default();
    let configs = if configs.is_empty() {
        "1:4096,8:4096".to_string()
    } else {
        configs.join(",")
    };
    let path = work.join("hf.json");
    let mut c = Command::new("python3");
    c.arg(root().join("xtask/peers/hf_decode.py"))
        .args([
            "--configs",
            &configs,
            "--deadline-s",
            if quick { "150" } else { "420" },
            "--json",
        ])
        .arg(&path);
    match run_status(c).and_then(|_| {
        Ok(serde_json::from_str::<Value>(&std::fs::read_to_string(
            &path,
        )?)?)
    }) {
        Ok(v) => v,
        Err(e) => json!({"status": format!("peer hf: failed: {e}")}),
    }
}

fn peer_llamacpp(model: &Option<PathBuf>, plan: &E2ePlan, work: &Path) -> Value {
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
    c.arg(root().join("xtask/peers/llamacpp_decode.py"))
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
    let cuda = res["cuda_decode"]["rows"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !cuda.is_empty() {
        let s = series_by(
            &cuda,
            |r| {
                Some(format!(
                    "{} b{}",
                    r["model"].as_str()?.trim_start_matches("synthetic:"),
                    r["batch"]
                ))
            },
            |r| Some((r["context"].as_f64()?, r["ms_per_step"].as_f64()?)),
        );
        put(
            format!("step-time-cuda-{host}.svg"),
            svg::line_plot(
                "CUDA decode step time (synthetic models, full KV)",
                "context (log scale)",
                "ms per step",
                &s,
                true,
            ),
        )?;
        let one: Vec<(String, u64, f64)> = cuda
            .iter()
            .filter(|r| r["batch"].as_u64() == Some(1))
            .filter_map(|r| {
                Some((
                    r["model"].as_str()?.to_string(),
                    r["context"].as_u64()?,
                    r["ms_per_step"].as_f64()?,
                ))
            })
            .collect();
        let s = series_by(
            &cuda,
            |r| {
                Some(format!(
                    "{} ctx {}",
                    r["model"].as_str()?.trim_start_matches("synthetic:"),
                    r["context"]
                ))
            },
            |r| {
                let (m, c, b) = (
                    r["model"].as_str()?,
                    r["context"].as_u64()?,
                    r["batch"].as_f64()?,
                );
                let base = one.iter().find(|o| o.0 == m && o.1 == c)?.2;
                Some((b, b * base / r["ms_per_step"].as_f64()?))
            },
        );
        put(
            format!("speedup-batch-{host}.svg"),
            svg::line_plot(
                "CUDA decode throughput speedup against batch size",
                "batch (log scale)",
                "tokens/s ÷ batch-1 tokens/s",
                &s,
                true,
            ),
        )?;
    }
    let ests: Vec<Estimate> = res["criterion"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| Estimate::from_json(v).ok())
                .collect()
        })
        .unwrap_or_default();
    let bars: Vec<(String, f64)> = ests
        .iter()
        .filter(|e| e.group.starts_with("recall"))
        .filter_map(|e| {
            Some((
                e.id.trim_start_matches("recall_").to_string(),
                e.bytes_per_s()? / 1e9,
            ))
        })
        .collect();
    if !bars.is_empty() {
        let ceiling = res["ceilings"]["cpu_copy_gbs"]
            .as_f64()
            .map(|c| ("CPU copy ceiling (one way)", c / 2.0));
        put(
            format!("recall-{host}.svg"),
            svg::bar_plot(
                "Recall executor throughput (criterion median)",
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
cargo xtask bench --targets kv       # only some criterion targets (here the KV policies' decode step)\n\
cargo xtask bench-report             # re-render this file and the plots from the JSON, measuring nothing\n\
cargo test -p xtask                  # tests of the parsing, tables and plots\n\
```\n\n\
`--quick` runs: criterion with 0.3 s warm-up and 0.6 s measurement on a subset of each target \
(page transposes, selection and recall at two sizes, three dequantizers, tokenizer encode, one \
decode-step matrix product, prefill/decode at 37 tokens), no `kv` target, and the end-to-end matrix \
at 256 and 1024 tokens with 32 new tokens, twice each. A full run uses 1 s / 3 s criterion times, \
every benchmark of every target, and prompts of 512, 1K, 2K and 4K tokens with 64 new tokens, three \
times each (about half an hour on 2 cores). On a GPU machine the command needs cargo there (it \
builds and runs the benches); where only prebuilt bench binaries can be copied, run them as \
[cuda-decode.md](cuda-decode.md) shows.\n\n\
What runs:\n\n\
* **Criterion micro-benchmarks** (`cargo bench --workspace --bench NAME`): transposes, selection, the \
recall executor, dequantization, the tokenizer, the quantized matrix products, prefill/decode of the \
default model, the KV policies' decode step (full runs only) and, on a GPU machine, the CUDA kernels \
(timed with CUDA events). Medians, MAD and the 95 % interval of the median are read from \
`target/xtask-bench/criterion/**/new/estimates.json` (`CRITERION_HOME`, so that benches run by others at the same time never mix in).\n\
* **End-to-end matrix**: on the CPU, `freekv generate --json` on the default model (SmolLM2-135M-Instruct \
Q4_1) with the policies full / quest / arkvale / freekv at several prompt lengths (prompts built from a \
repeated, numbered paragraph; sparse budgets a quarter of the context); on a GPU machine the \
`cuda_decode` bench (synthetic models, batch × context), whose JSON also gives the device-copy \
bandwidth.\n\
* **Ceilings**: CPU streaming-read and copy bandwidth (a Rust probe over 256 MiB, all threads, best of \
several repetitions); device copy bandwidth (from `cuda_decode`) and host → device pinned bandwidth \
(`xtask/peers/hf_decode.py --bandwidth-only`, torch) on a GPU machine.\n\
* **Peers**: `--peer hf` (`xtask/peers/hf_decode.py`), `--peer llamacpp` \
(`xtask/peers/llamacpp_decode.py`; when `llama_cpp` is not importable the run says so and goes on).\n\n\
On a CPU-only machine there is no batch dimension (the CLI decodes one sequence), so the \
\"speedup against batch size\" plot comes from a GPU run; the CPU plots are step time against \
context per policy and speed relative to full attention. For orientation only (not measured by \
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
        assert!(Options::parse(&a(&["--targets", "nope"])).is_err());
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
        // The GPU plots: step time against context per batch, speedup against batch.
        let mut g = res.clone();
        g["cuda_decode"] = json!({"rows": [
            {"model": "synthetic:llama-3.1-8b", "batch": 1, "context": 4096, "ms_per_step": 5.0},
            {"model": "synthetic:llama-3.1-8b", "batch": 8, "context": 4096, "ms_per_step": 8.0},
            {"model": "synthetic:llama-3.1-8b", "batch": 1, "context": 32768, "ms_per_step": 6.0},
            {"model": "synthetic:llama-3.1-8b", "batch": 32, "context": 32768, "ms_per_step": null}]});
        let gn = write_plots(&g, &dir, "gpu-x").unwrap();
        assert!(gn.contains(&"step-time-cuda-gpu-x.svg".to_string()));
        let sb = std::fs::read_to_string(dir.join("speedup-batch-gpu-x.svg")).unwrap();
        assert!(crate::svg::tests::well_formed(&sb) && crate::svg::tests::coords_numeric(&sb));
        // batch 8 at 4096: 8 × 5 / 8 = 5× the batch-1 tokens/s.
        assert!(sb.contains("llama-3.1-8b ctx 4096: x=8 y=5<"), "{sb}");
        assert!(sb.contains("llama-3.1-8b ctx 4096: x=1 y=1<"));
        std::fs::write(dir.join("results-cpu.json"), res.to_string()).unwrap();
        write_readme(&dir).unwrap();
        let md = std::fs::read_to_string(dir.join("README.md")).unwrap();
        assert!(md.starts_with("# Benchmarks"));
        assert!(md.contains("Raw results: [`results-cpu.json`](results-cpu.json)"));
        assert!(md.contains("| freekv | 1010 | 256 | 80.0 |"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
