//! Running bench binaries and scripts for `cargo xtask bench`: the command line of a criterion
//! bench binary (built here by cargo or prebuilt in a bundle), the settings of each bench in
//! each mode, the run's time budget, and child processes streamed line by line and stopped at
//! a deadline.

use anyhow::{Context, Result, anyhow};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A command as one short line for messages and notes: the program's file name and the
/// arguments, absolute paths cut to their file names (results files are committed; they name
/// no folder of the machine that ran them).
pub fn show(c: &Command) -> String {
    let short = |s: &std::ffi::OsStr| {
        let p = Path::new(s);
        if p.is_absolute() {
            p.file_name().unwrap_or(s).to_string_lossy().into_owned()
        } else {
            s.to_string_lossy().into_owned()
        }
    };
    std::iter::once(short(c.get_program()))
        .chain(c.get_args().map(short))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A runnable criterion bench binary.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchBin {
    /// The bench target's name.
    pub name: String,
    /// Its package.
    pub package: String,
    /// The executable.
    pub exe: PathBuf,
    /// Working folder (cargo runs a bench in its package folder); `None`: the current one.
    pub cwd: Option<PathBuf>,
    /// It has GPU groups (runs on a GPU machine).
    pub gpu: bool,
}

/// What to run of a criterion bench target in quick mode.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quick {
    /// Not in quick mode.
    Skip,
    /// Everything, with quick times.
    All,
    /// Only the benchmarks matching this criterion filter.
    Filter(&'static str),
}

/// Settings of a known bench target; unknown ones get [`Target::default_for`].
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Bench target name.
    pub bench: &'static str,
    /// Its package (two packages may have benches of the same name).
    pub package: &'static str,
    /// Runs on the CPU machine (the CPU part of the run).
    pub cpu: bool,
    /// An end-to-end matrix bench (its rows come from a JSON side file or its ids).
    pub e2e: bool,
    /// Quick-mode subset.
    pub quick: Quick,
    /// Environment of a full run.
    pub env: &'static [(&'static str, &'static str)],
    /// Environment of a quick run (only where not set by the caller already).
    pub quick_env: &'static [(&'static str, &'static str)],
    /// Estimated seconds, full run (2 cores for the CPU benches, an H200 for the GPU ones).
    pub est_s: f64,
    /// Estimated seconds, quick run.
    pub quick_est_s: f64,
}

/// The bench targets whose settings are known. GPU benches not listed here (a later
/// `cuda_freekv`, `cuda_recall`, ...) run with [`Target::default_for`].
pub const TARGETS: &[Target] = &[
    Target::cpu(
        "transpose",
        "freekv-layout",
        "^transpose_page/.*/f32/P32_H3_d64",
        120.0,
        4.0,
    ),
    Target::cpu(
        "select",
        "freekv-select",
        "mean-softmax/(256|1024)$",
        170.0,
        5.0,
    ),
    Target::cpu(
        "recall",
        "freekv-recall",
        "recall_f32_P32_H3_d64/(double_buffered|sync_direct)/(64|256)$",
        260.0,
        6.0,
    ),
    Target::cpu(
        "dequant",
        "freekv-model",
        "^dequant/(q4_1|q8_0|q4_k)/4M$",
        160.0,
        5.0,
    ),
    Target::cpu("tokenizer", "freekv-model", "^encode/text-5k$", 40.0, 4.0),
    Target::cpu(
        "qmatmul",
        "freekv-model",
        "^model/decode-step/2t$",
        900.0,
        6.0,
    ),
    Target {
        quick_env: &[("FREEKV_BENCH_SIZES", "37")],
        est_s: 240.0,
        quick_est_s: 10.0,
        ..Target::cpu("decode", "freekv-model", "^(prefill|decode)/37$", 0.0, 0.0)
    },
    Target {
        bench: "kv",
        package: "freekv-model",
        cpu: true,
        e2e: false,
        quick: Quick::Skip,
        env: &[("FREEKV_BENCH_CONTEXT", "2048")],
        quick_env: &[],
        est_s: 120.0,
        quick_est_s: 0.0,
    },
    Target {
        bench: "kernels",
        package: "freekv-kernels",
        cpu: false,
        e2e: false,
        quick: Quick::Filter("(decode_attention|gemm)"),
        env: &[],
        quick_env: &[],
        est_s: 90.0,
        quick_est_s: 30.0,
    },
    Target {
        bench: "gemv",
        package: "freekv-kernels",
        cpu: false,
        e2e: false,
        quick: Quick::All,
        // The launch-shape sweep is a tuning aid, not a figure of the report.
        env: &[("FREEKV_GEMV_SWEEP", "0")],
        quick_env: &[("FREEKV_GEMV_SWEEP", "0")],
        est_s: 120.0,
        quick_est_s: 40.0,
    },
    Target {
        bench: "cuda_recall",
        package: "freekv-recall",
        cpu: false,
        e2e: false,
        quick: Quick::Filter("gather_b16|per_page|h2d_ceiling"),
        env: &[],
        quick_env: &[],
        est_s: 100.0,
        quick_est_s: 25.0,
    },
    Target {
        bench: "cuda_decode",
        package: "freekv-model",
        cpu: false,
        e2e: true,
        quick: Quick::All,
        env: &[],
        quick_env: &[(
            "FREEKV_BENCH_CONFIGS",
            "llama-3.1-8b:1:4096,llama-3.1-8b:8:4096,llama-3.1-8b:1:32768,smollm2-135m:1:512",
        )],
        est_s: 120.0,
        quick_est_s: 45.0,
    },
    Target {
        bench: "cuda_freekv",
        package: "freekv-model",
        cpu: false,
        e2e: true,
        quick: Quick::All,
        env: &[],
        quick_env: &[
            (
                "FREEKV_BENCH_SCENARIOS",
                // Plain random weights, then the calibrated coherent models; the long
                // generation of the quick run starts past the budget (sparse from its first step).
                "long-input:32768:48,long-generation:1024:128,\
                 long-input:32768:48:llama-3.1-8b+persistent=0.84,\
                 long-generation:2560:128:llama-3.1-8b+persistent=0.92",
            ),
            ("FREEKV_BENCH_BATCHES", "1,4"),
        ],
        est_s: 480.0,
        quick_est_s: 170.0,
    },
];

impl Target {
    const fn cpu(
        bench: &'static str,
        package: &'static str,
        filter: &'static str,
        est_s: f64,
        quick_est_s: f64,
    ) -> Self {
        Self {
            bench,
            package,
            cpu: true,
            e2e: false,
            quick: Quick::Filter(filter),
            env: &[],
            quick_env: &[],
            est_s,
            quick_est_s,
        }
    }

    /// The known settings of bench `name` of `package` (any package when empty), if any.
    pub fn known(name: &str, package: &str) -> Option<&'static Target> {
        TARGETS
            .iter()
            .find(|t| t.bench == name && (package.is_empty() || t.package == package))
    }

    /// Settings of a bench not in [`TARGETS`]: a GPU bench, an end-to-end one when its name
    /// says so (`cuda_decode*`, `cuda_freekv*`, `*e2e*`), everything run in quick mode too.
    pub fn default_for(name: &str) -> Target {
        let e2e = is_e2e_name(name);
        Target {
            bench: "",
            package: "",
            cpu: false,
            e2e,
            quick: Quick::All,
            env: &[],
            quick_env: &[],
            est_s: if e2e { 180.0 } else { 90.0 },
            quick_est_s: if e2e { 60.0 } else { 30.0 },
        }
    }

    /// Settings of bench `name` of `package`: known, else the defaults.
    pub fn of(name: &str, package: &str) -> Target {
        Self::known(name, package)
            .cloned()
            .unwrap_or_else(|| Self::default_for(name))
    }
}

/// Whether a bench name marks an end-to-end matrix bench.
pub fn is_e2e_name(name: &str) -> bool {
    name.starts_with("cuda_decode") || name.starts_with("cuda_freekv") || name.contains("e2e")
}

/// Everything that makes up one bench binary's run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSpec {
    /// Criterion filter (a regular expression on the ids).
    pub filter: Option<String>,
    /// Criterion warm-up and measurement seconds and sample size (`None`: the bench's own).
    pub times: Option<(f64, f64, Option<u32>)>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Criterion's output folder (`CRITERION_HOME`).
    pub criterion_home: PathBuf,
    /// The JSON side file the bench may write (`FREEKV_BENCH_JSON`).
    pub side_json: Option<PathBuf>,
    /// Estimated seconds.
    pub est_s: f64,
}

/// Mode of the run a spec is made for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mode {
    /// `--quick`.
    pub quick: bool,
    /// `--gpu-only`.
    pub gpu_only: bool,
    /// The bench runs as a GPU bench (on a GPU machine) rather than in the CPU part.
    pub as_gpu: bool,
}

/// The run of bench `name` of `package` in `mode`: criterion times, filter, environment and estimate; `None` for
/// a target left out of quick runs unless it was `named` (`--targets`): then all of it runs
/// with quick times. `env_set` tells which variables the caller's environment already sets
/// (they win over the quick defaults).
pub fn spec_for(
    name: &str,
    package: &str,
    mode: Mode,
    criterion_home: &Path,
    side_json: Option<PathBuf>,
    env_set: &dyn Fn(&str) -> bool,
    named: bool,
) -> Option<RunSpec> {
    let t = Target::of(name, package);
    let mut env: Vec<(String, String)> = Vec::new();
    let mut filter = None;
    let times;
    let est_s;
    if mode.quick {
        match t.quick {
            Quick::Skip if !named => return None,
            Quick::Skip | Quick::All => {}
            Quick::Filter(f) => filter = Some(f.to_string()),
        }
        for (k, v) in t.quick_env {
            if !env_set(k) {
                env.push((k.to_string(), v.to_string()));
            }
        }
        env.push(("FREEKV_BENCH_QUICK".into(), "1".into()));
        times = Some(if t.e2e {
            (0.5, 1.0, None)
        } else {
            (0.3, 0.6, Some(10))
        });
        est_s = t.quick_est_s;
    } else {
        for (k, v) in t.env {
            if !env_set(k) {
                env.push((k.to_string(), v.to_string()));
            }
        }
        times = Some(if !mode.as_gpu {
            (1.0, 3.0, None)
        } else if t.e2e {
            (1.0, 2.0, None)
        } else {
            (0.5, 1.5, None)
        });
        est_s = t.est_s;
    }
    if mode.gpu_only {
        env.push(("FREEKV_BENCH_GPU_ONLY".into(), "1".into()));
    }
    Some(RunSpec {
        filter,
        times,
        env,
        criterion_home: criterion_home.to_path_buf(),
        side_json: if mode.as_gpu { side_json } else { None },
        est_s,
    })
}

/// The arguments of a criterion bench binary run directly (what `cargo bench -- ARGS` passes):
/// `--bench`, the filter, then the criterion times.
pub fn bench_args(spec: &RunSpec) -> Vec<String> {
    let mut a = vec!["--bench".to_string()];
    if let Some(f) = &spec.filter {
        a.push(f.clone());
    }
    if let Some((w, m, s)) = spec.times {
        a.extend([
            "--warm-up-time".into(),
            format!("{w}"),
            "--measurement-time".into(),
            format!("{m}"),
        ]);
        if let Some(s) = s {
            a.extend(["--sample-size".into(), s.to_string()]);
        }
    }
    a
}

/// The command that runs `b` with `spec`.
pub fn bench_command(b: &BenchBin, spec: &RunSpec) -> Command {
    let mut c = Command::new(&b.exe);
    c.args(bench_args(spec));
    if let Some(d) = &b.cwd {
        c.current_dir(d);
    }
    c.env("CRITERION_HOME", &spec.criterion_home);
    if let Some(j) = &spec.side_json {
        c.env("FREEKV_BENCH_JSON", j);
    }
    for (k, v) in &spec.env {
        c.env(k, v);
    }
    c
}

/// The run's time budget (`--max-minutes`): what is left, whether an item fits, the deadline
/// children are stopped at.
#[derive(Debug, Clone)]
pub struct Budget {
    t0: Instant,
    limit_s: Option<f64>,
    /// Seconds kept at the end for writing the results.
    pub reserve_s: f64,
}

impl Budget {
    /// A budget of `minutes` (none: unlimited) from now, keeping `reserve_s` for the end.
    pub fn new(minutes: Option<f64>, reserve_s: f64) -> Self {
        Self {
            t0: Instant::now(),
            limit_s: minutes.map(|m| m * 60.0),
            reserve_s,
        }
    }

    /// Whether the run has a limit.
    pub fn limited(&self) -> bool {
        self.limit_s.is_some()
    }

    /// Seconds left before the reserve (infinite without a limit).
    pub fn left_s(&self) -> f64 {
        match self.limit_s {
            Some(l) => (l - self.reserve_s - self.t0.elapsed().as_secs_f64()).max(0.0),
            None => f64::INFINITY,
        }
    }

    /// Whether an item estimated at `est_s` may start: at least half of it, and at least
    /// `min(est_s, 20 s)`, is left (an item cut at the deadline keeps what it measured).
    pub fn admits(&self, est_s: f64) -> bool {
        Self::admits_with(self.left_s(), est_s)
    }

    /// [`Budget::admits`] with `left_s` given.
    pub fn admits_with(left_s: f64, est_s: f64) -> bool {
        left_s >= (0.5 * est_s).max(est_s.min(20.0))
    }

    /// The instant children are stopped at: the budget's end, or `cap_s` from now when that
    /// comes first (`None`: no limit at all).
    pub fn deadline(&self, cap_s: Option<f64>) -> Option<Instant> {
        let end = self
            .limit_s
            .map(|_| Instant::now() + Duration::from_secs_f64(self.left_s()));
        let cap = cap_s.map(|c| Instant::now() + Duration::from_secs_f64(c.max(0.0)));
        match (end, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// How a streamed child ended.
#[derive(Debug)]
pub struct Ended {
    /// Its exit status.
    pub status: ExitStatus,
    /// Stopped at the deadline.
    pub killed: bool,
    /// The last lines of its stderr.
    pub stderr_tail: Vec<String>,
}

fn kill_tree(child: &mut std::process::Child, group: bool) {
    if group {
        // The child leads its own process group: end it and whatever it started (torch's
        // compile workers) by the group's id.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .stderr(Stdio::null())
            .status();
    }
    let _ = child.kill();
}

/// Runs `c`, calling `on_line` with each stdout line as it comes, and stops it (with the
/// processes it started) at `deadline`. Stderr is drained on a thread; its last 5 lines are
/// returned.
pub fn stream(
    mut c: Command,
    deadline: Option<Instant>,
    mut on_line: impl FnMut(&str),
) -> Result<Ended> {
    use std::io::BufRead;
    let group = deadline.is_some();
    if group {
        use std::os::unix::process::CommandExt;
        c.process_group(0);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot run `{}`", show(&c)))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let stderr = child.stderr.take();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let (etx, erx) = mpsc::channel::<Vec<String>>();
    std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        if let Some(e) = stderr {
            for l in std::io::BufReader::new(e).lines().map_while(Result::ok) {
                tail.push(l);
                if tail.len() > 5 {
                    tail.remove(0);
                }
            }
        }
        let _ = etx.send(tail);
    });
    let mut killed = false;
    loop {
        let wait = match deadline {
            Some(d) if !killed => d.saturating_duration_since(Instant::now()),
            _ => Duration::from_millis(500),
        };
        match rx.recv_timeout(wait.min(Duration::from_millis(500))) {
            Ok(l) => on_line(&l),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !killed && deadline.is_some_and(|d| Instant::now() >= d) {
                    kill_tree(&mut child, group);
                    killed = true;
                }
                // A grandchild may keep the pipe open after the child is gone: stop reading
                // once the child has exited and nothing came for a while.
                if let Ok(Some(_)) = child.try_wait() {
                    if !killed {
                        match rx.recv_timeout(Duration::from_secs(2)) {
                            Ok(l) => {
                                on_line(&l);
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                        }
                    }
                    while let Ok(l) = rx.try_recv() {
                        on_line(&l);
                    }
                    break;
                }
            }
        }
    }
    let status = child.wait()?;
    let stderr_tail = erx.recv_timeout(Duration::from_secs(2)).unwrap_or_default();
    Ok(Ended {
        status,
        killed,
        stderr_tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(quick: bool, gpu_only: bool, as_gpu: bool) -> Mode {
        Mode {
            quick,
            gpu_only,
            as_gpu,
        }
    }

    #[test]
    fn prebuilt_bench_command_line() {
        let b = BenchBin {
            name: "cuda_decode".into(),
            package: "freekv-model".into(),
            exe: PathBuf::from("/b/bench-cuda_decode"),
            cwd: None,
            gpu: true,
        };
        let home = Path::new("/w/criterion");
        let side = Some(PathBuf::from("/w/side-cuda_decode.json"));
        let none = |_: &str| false;
        let s = spec_for(
            "cuda_decode",
            "",
            mode(true, true, true),
            home,
            side.clone(),
            &none,
            false,
        )
        .unwrap();
        assert_eq!(
            bench_args(&s),
            [
                "--bench",
                "--warm-up-time",
                "0.5",
                "--measurement-time",
                "1"
            ]
        );
        let c = bench_command(&b, &s);
        assert_eq!(c.get_program(), "/b/bench-cuda_decode");
        let env: Vec<(String, String)> = c
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
            })
            .collect();
        let has = |k: &str, v: &str| env.iter().any(|(a, b)| a == k && b == v);
        assert!(has("CRITERION_HOME", "/w/criterion"));
        assert!(has("FREEKV_BENCH_JSON", "/w/side-cuda_decode.json"));
        assert!(has("FREEKV_BENCH_QUICK", "1"));
        assert!(has("FREEKV_BENCH_GPU_ONLY", "1"));
        assert!(
            env.iter()
                .any(|(k, v)| k == "FREEKV_BENCH_CONFIGS" && v.contains("llama-3.1-8b:8:4096"))
        );
        assert_eq!(c.get_current_dir(), None);
        // The caller's own configurations win over the quick default.
        let set = |k: &str| k == "FREEKV_BENCH_CONFIGS";
        let s = spec_for(
            "cuda_decode",
            "",
            mode(true, true, true),
            home,
            side.clone(),
            &set,
            false,
        )
        .unwrap();
        assert!(!s.env.iter().any(|(k, _)| k == "FREEKV_BENCH_CONFIGS"));
        // Full GPU run: the e2e bench 1 s / 2 s, a micro bench 0.5 s / 1.5 s, no quick variables.
        let s = spec_for(
            "cuda_decode",
            "",
            mode(false, true, true),
            home,
            side.clone(),
            &none,
            false,
        )
        .unwrap();
        assert_eq!(
            bench_args(&s),
            ["--bench", "--warm-up-time", "1", "--measurement-time", "2"]
        );
        assert!(!s.env.iter().any(|(k, _)| k == "FREEKV_BENCH_QUICK"));
        let s = spec_for(
            "kernels",
            "",
            mode(true, true, true),
            home,
            None,
            &none,
            false,
        )
        .unwrap();
        assert_eq!(
            bench_args(&s),
            [
                "--bench",
                "(decode_attention|gemm)",
                "--warm-up-time",
                "0.3",
                "--measurement-time",
                "0.6",
                "--sample-size",
                "10"
            ]
        );
        let s = spec_for(
            "kernels",
            "",
            mode(false, false, true),
            home,
            None,
            &none,
            false,
        )
        .unwrap();
        assert_eq!(
            &bench_args(&s)[1..],
            ["--warm-up-time", "0.5", "--measurement-time", "1.5"]
        );
        assert!(s.env.is_empty());
        // An unknown GPU bench: everything, quick times; a new e2e bench by its name.
        let s = spec_for(
            "cuda_freekv",
            "",
            mode(true, true, true),
            home,
            side.clone(),
            &none,
            false,
        )
        .unwrap();
        assert_eq!(s.filter, None);
        assert_eq!(s.est_s, 170.0);
        assert!(
            s.env
                .contains(&("FREEKV_BENCH_BATCHES".to_string(), "1,4".to_string()))
        );
        assert_eq!(s.side_json, side);
        assert!(Target::of("cuda_freekv", "").e2e && !Target::of("cuda_recall", "").e2e);
        assert!(Target::of("cuda_foo_e2e", "p").e2e && !Target::of("cuda_foo", "p").e2e);
        // Two packages' `select` benches: the CPU one has its quick filter, the GPU one
        // (unknown settings) runs everything.
        let cpu_sel = spec_for(
            "select",
            "freekv-select",
            mode(true, false, false),
            home,
            None,
            &none,
            false,
        )
        .unwrap();
        assert_eq!(cpu_sel.filter.as_deref(), Some("mean-softmax/(256|1024)$"));
        let gpu_sel = spec_for(
            "select",
            "freekv-kernels",
            mode(true, true, true),
            home,
            None,
            &none,
            false,
        )
        .unwrap();
        assert_eq!(gpu_sel.filter, None);
        assert!(
            Target::of("select", "freekv-select").cpu
                && !Target::of("select", "freekv-kernels").cpu
        );
        // The gemv sweep is off unless the caller sets it.
        let g = spec_for(
            "gemv",
            "freekv-kernels",
            mode(false, true, true),
            home,
            None,
            &none,
            false,
        )
        .unwrap();
        assert!(
            g.env
                .contains(&("FREEKV_GEMV_SWEEP".to_string(), "0".to_string()))
        );
        let set = |k: &str| k == "FREEKV_GEMV_SWEEP";
        let g = spec_for(
            "gemv",
            "freekv-kernels",
            mode(false, true, true),
            home,
            None,
            &set,
            false,
        )
        .unwrap();
        assert!(!g.env.iter().any(|(k, _)| k == "FREEKV_GEMV_SWEEP"));
        // CPU targets: a side file only for GPU runs; `kv` is not part of quick runs.
        let s = spec_for(
            "recall",
            "",
            mode(false, false, false),
            home,
            side,
            &none,
            false,
        )
        .unwrap();
        assert_eq!(s.side_json, None);
        assert_eq!(
            &bench_args(&s)[1..],
            ["--warm-up-time", "1", "--measurement-time", "3"]
        );
        assert!(spec_for("kv", "", mode(true, false, false), home, None, &none, false).is_none());
        let s = spec_for("kv", "", mode(true, false, false), home, None, &none, true).unwrap();
        assert_eq!(s.filter, None);
        assert_eq!(s.times, Some((0.3, 0.6, Some(10))));
        let s = spec_for(
            "kv",
            "",
            mode(false, false, false),
            home,
            None,
            &none,
            false,
        )
        .unwrap();
        assert_eq!(
            s.env,
            [("FREEKV_BENCH_CONTEXT".to_string(), "2048".to_string())]
        );
        // The working folder of a cargo-built bench is its package's.
        let b2 = BenchBin {
            cwd: Some(PathBuf::from("/r/freekv-model")),
            ..b
        };
        assert_eq!(
            bench_command(&b2, &s).get_current_dir(),
            Some(Path::new("/r/freekv-model"))
        );
    }

    #[test]
    fn commands_show_without_folders() {
        let mut c = Command::new("/opt/toolchain/bin/cargo");
        c.args(["bench", "--no-run"]).arg("/srv/x/prompt-256.txt");
        c.current_dir("/srv/x");
        assert_eq!(show(&c), "cargo bench --no-run prompt-256.txt");
    }

    #[test]
    fn budget_admits_and_deadlines() {
        assert!(Budget::admits_with(100.0, 150.0));
        assert!(!Budget::admits_with(70.0, 150.0));
        assert!(Budget::admits_with(15.0, 15.0));
        assert!(!Budget::admits_with(14.0, 15.0));
        assert!(!Budget::admits_with(19.0, 30.0));
        let b = Budget::new(None, 10.0);
        assert!(!b.limited() && b.left_s().is_infinite() && b.deadline(None).is_none());
        assert!(b.deadline(Some(5.0)).is_some());
        let b = Budget::new(Some(1.0), 10.0);
        assert!(b.left_s() <= 50.0 && b.left_s() > 49.0);
        let d = b.deadline(Some(5.0)).unwrap();
        assert!(d <= Instant::now() + Duration::from_secs(5));
        let d = b.deadline(None).unwrap();
        assert!(d > Instant::now() + Duration::from_secs(45));
        // An exhausted budget admits nothing.
        let b = Budget::new(Some(0.0), 10.0);
        assert_eq!(b.left_s(), 0.0);
        assert!(!b.admits(1.0));
    }

    #[test]
    fn streams_lines_and_stops_at_the_deadline() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo one; echo err >&2; echo two"]);
        let mut lines = Vec::new();
        let e = stream(c, None, |l| lines.push(l.to_string())).unwrap();
        assert_eq!(lines, ["one", "two"]);
        assert!(e.status.success() && !e.killed);
        assert_eq!(e.stderr_tail, ["err"]);
        let mut c = Command::new("sh");
        c.args(["-c", "echo start; sleep 30; echo never"]);
        let t = Instant::now();
        let mut lines = Vec::new();
        let e = stream(c, Some(Instant::now() + Duration::from_millis(300)), |l| {
            lines.push(l.to_string())
        })
        .unwrap();
        assert!(e.killed && !e.status.success());
        assert_eq!(lines, ["start"]);
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
