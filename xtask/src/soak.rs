//! `cargo xtask soak`: a long CPU generation with a KV policy while the process's resident memory
//! is sampled; fails when it keeps growing after warm-up.
//!
//! The release `freekv` binary generates `--tokens` tokens in runs of `--per-run` tokens
//! (`freekv generate --repeat R --ignore-eos`: one process, each run a new sequence, so that the
//! total can exceed the model's context). The first run is the warm-up: it grows the host KV
//! pools to the size a run needs. Within a run the KV cache grows with the sequence by design,
//! so runs are compared at their peaks: the largest resident set (`VmRSS` of
//! `/proc/<pid>/status`, sampled every `--interval-ms`) of every later run must stay within
//! `--max-growth-mib` of the warm-up run's. Outputs under `--out`
//! (default `target/soak`): `soak-<time>.csv` (time, RSS, run) and `soak-<time>.json` (the
//! summary, also printed). Not part of CI: it runs for minutes.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// Options of `cargo xtask soak`.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakOptions {
    /// Tokens to generate in total.
    pub tokens: usize,
    /// Tokens per run (a new sequence each run).
    pub per_run: usize,
    /// KV policy.
    pub kv: String,
    /// Resident tokens per sparse layer.
    pub budget: usize,
    /// Model file (default: the CLI's default model).
    pub model: Option<PathBuf>,
    /// A prebuilt `freekv` binary (default: `cargo build --release -p freekv-cli`).
    pub bin: Option<PathBuf>,
    /// Output folder.
    pub out: PathBuf,
    /// Allowed RSS growth after warm-up, MiB.
    pub max_growth_mib: f64,
    /// Sampling interval.
    pub interval_ms: u64,
    /// More arguments for `freekv generate`.
    pub extra: Vec<String>,
}

impl Default for SoakOptions {
    fn default() -> Self {
        Self {
            tokens: 16384,
            per_run: 4096,
            kv: "freekv".into(),
            budget: 512,
            model: None,
            bin: None,
            out: PathBuf::from("target/soak"),
            max_growth_mib: 16.0,
            interval_ms: 1000,
            extra: Vec::new(),
        }
    }
}

/// The prompt of every run: ordinary prose, so that the model writes prose back.
const PROMPT: &str = "The history of the lighthouse on the northern cape begins with a storm. \
    Write the long chronicle of its keepers, year after year, with every ship they saved.";

pub fn usage() -> &'static str {
    "soak [--tokens N] [--per-run N] [--kv NAME] [--budget N] [--model PATH] [--bin FREEKV]\n      \
     [--out DIR] [--max-growth-mib F] [--interval-ms N] [-- more freekv generate flags]\n      \
     defaults: 16384 tokens in runs of 4096, freekv, budget 512, target/soak, 16 MiB"
}

impl SoakOptions {
    /// Parses the arguments after `soak`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self::default();
        let mut it = args.iter();
        let num = |v: Option<&String>, flag: &str| -> Result<usize> {
            v.and_then(|s| s.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| anyhow!("{flag} needs a positive integer"))
        };
        while let Some(a) = it.next() {
            match a.as_str() {
                "--tokens" => o.tokens = num(it.next(), "--tokens")?,
                "--per-run" => o.per_run = num(it.next(), "--per-run")?,
                "--budget" => o.budget = num(it.next(), "--budget")?,
                "--interval-ms" => o.interval_ms = num(it.next(), "--interval-ms")? as u64,
                "--kv" => o.kv = crate::flag_value(&mut it, "--kv", "a policy")?.clone(),
                "--model" => {
                    o.model = Some(crate::flag_value(&mut it, "--model", "a path")?.into())
                }
                "--bin" => o.bin = Some(crate::flag_value(&mut it, "--bin", "a path")?.into()),
                "--out" => o.out = crate::flag_value(&mut it, "--out", "a folder")?.into(),
                "--max-growth-mib" => {
                    o.max_growth_mib = it
                        .next()
                        .and_then(|s| s.parse::<f64>().ok())
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .ok_or_else(|| anyhow!("--max-growth-mib needs a number >= 0"))?
                }
                "--" => {
                    o.extra = it.by_ref().cloned().collect();
                }
                other => bail!(
                    "unknown soak option `{other}`\nusage: cargo xtask {}",
                    usage()
                ),
            }
        }
        if o.runs() < 2 {
            bail!(
                "soak compares runs with each other: --tokens ({}) must be at least twice --per-run ({})",
                o.tokens,
                o.per_run
            );
        }
        Ok(o)
    }

    /// Number of runs (the last one may be shorter).
    pub fn runs(&self) -> usize {
        self.tokens.div_ceil(self.per_run)
    }
}

/// One RSS sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Seconds since the start.
    pub t: f64,
    /// Resident set, MiB.
    pub rss_mib: f64,
    /// Runs finished when the sample was taken.
    pub runs_done: usize,
}

/// `VmRSS` of a `/proc/<pid>/status` text, in MiB.
pub fn parse_vm_rss_mib(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The decode token count and rate of a `freekv generate` timing line
/// (`... decode 4095 tokens, 61.2 tok/s; stop: length`).
pub fn parse_timing_line(line: &str) -> Option<(usize, f64)> {
    let rest = line.split("; decode ").nth(1)?;
    let mut words = rest.split_whitespace();
    let tokens = words.next()?.parse().ok()?;
    let _ = words.next(); // "tokens,"
    let rate = words.next()?.parse().ok()?;
    Some((tokens, rate))
}

/// Least-squares slope of `y` over `x` (`None` for fewer than two distinct x).
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    Some(sxy / sxx)
}

/// What the samples say. Within a run the KV cache grows with the sequence by design, so runs
/// are compared with each other at their peaks: after the warm-up run, every run's peak must stay
/// near the warm-up's.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Largest RSS of each run, MiB.
    pub run_peaks_mib: Vec<f64>,
    /// First RSS sample of each run (just after the previous sequence was dropped), MiB.
    pub run_starts_mib: Vec<f64>,
    /// Peak of the warm-up run, MiB.
    pub warm_peak_mib: f64,
    /// Peak of the last run, MiB.
    pub last_peak_mib: f64,
    /// Largest peak after the warm-up minus the warm-up's peak, MiB.
    pub growth_mib: f64,
    /// Least-squares slope of the peaks of the runs after the warm-up, MiB per run.
    pub slope_mib_per_run: Option<f64>,
}

/// Judges the samples of `runs` runs (a sample belongs to the run that was going on, i.e. its
/// `runs_done`); `None` without samples in at least the warm-up and one later run.
pub fn judge(samples: &[Sample], runs: usize) -> Option<Verdict> {
    let mut peaks = Vec::new();
    let mut starts = Vec::new();
    for r in 0..runs {
        let of_run: Vec<f64> = samples
            .iter()
            .filter(|s| s.runs_done == r)
            .map(|s| s.rss_mib)
            .collect();
        let Some(&first) = of_run.first() else {
            continue;
        };
        peaks.push(of_run.iter().copied().fold(f64::MIN, f64::max));
        starts.push(first);
    }
    if peaks.len() < 2 {
        return None;
    }
    let warm = peaks[0];
    let after = &peaks[1..];
    let max_after = after.iter().copied().fold(f64::MIN, f64::max);
    let pts: Vec<(f64, f64)> = after
        .iter()
        .enumerate()
        .map(|(i, &p)| (i as f64, p))
        .collect();
    Some(Verdict {
        warm_peak_mib: warm,
        last_peak_mib: *after.last()?,
        growth_mib: max_after - warm,
        slope_mib_per_run: slope(&pts),
        run_peaks_mib: peaks,
        run_starts_mib: starts,
    })
}

fn repo_root() -> Result<PathBuf> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("cannot find the repository root above {}", here.display()))
}

/// Builds the release `freekv` binary and returns its path.
fn build_freekv(root: &Path) -> Result<PathBuf> {
    println!("soak: building the freekv CLI (cargo build --release -p freekv-cli) ...");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "-p", "freekv-cli"])
        .current_dir(root)
        .status()
        .context("running cargo")?
        .success();
    if !ok {
        bail!("cargo build --release -p freekv-cli failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release").join("freekv"))
}

/// Runs `cargo xtask soak`.
pub fn run(o: &SoakOptions) -> Result<()> {
    if !Path::new("/proc/self/status").exists() {
        bail!("soak reads /proc/<pid>/status: Linux only");
    }
    let root = repo_root()?;
    let bin = match &o.bin {
        Some(b) => b.clone(),
        None => build_freekv(&root)?,
    };
    let out_dir = if o.out.is_absolute() {
        o.out.clone()
    } else {
        root.join(&o.out)
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let runs = o.runs();
    let mut args: Vec<String> = [
        "generate",
        "--device",
        "cpu",
        "--kv",
        &o.kv,
        "--budget",
        &o.budget.to_string(),
        "-n",
        &o.per_run.to_string(),
        "--repeat",
        &runs.to_string(),
        "--ignore-eos",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(m) = &o.model {
        args.push("--model".into());
        args.push(m.display().to_string());
    }
    args.extend(o.extra.iter().cloned());
    args.push(PROMPT.into());
    println!(
        "soak: {} {} ({} runs of {} tokens; RSS every {} ms)",
        bin.display(),
        args.join(" "),
        runs,
        o.per_run,
        o.interval_ms
    );
    let mut child = Command::new(&bin)
        .args(&args)
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let (tx, rx) = mpsc::channel::<(f64, String)>();
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send((t0.elapsed().as_secs_f64(), line)).is_err() {
                break;
            }
        }
    });

    let status_path = format!("/proc/{pid}/status");
    let mut samples: Vec<Sample> = Vec::new();
    let mut lines: Vec<(f64, String)> = Vec::new();
    let mut run_ends: Vec<f64> = Vec::new();
    let mut timings: Vec<(usize, f64)> = Vec::new();
    let take_lines = |lines: &mut Vec<(f64, String)>,
                      run_ends: &mut Vec<f64>,
                      timings: &mut Vec<(usize, f64)>| {
        while let Ok((t, l)) = rx.try_recv() {
            if let Some(tm) = parse_timing_line(&l) {
                run_ends.push(t);
                timings.push(tm);
                println!("soak: [{t:7.1} s] {l}");
            }
            lines.push((t, l));
        }
    };
    let exit = loop {
        take_lines(&mut lines, &mut run_ends, &mut timings);
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if let Some(rss) = std::fs::read_to_string(&status_path)
            .ok()
            .as_deref()
            .and_then(parse_vm_rss_mib)
        {
            samples.push(Sample {
                t: t0.elapsed().as_secs_f64(),
                rss_mib: rss,
                runs_done: run_ends.len(),
            });
        }
        std::thread::sleep(Duration::from_millis(o.interval_ms));
    };
    let _ = reader.join();
    take_lines(&mut lines, &mut run_ends, &mut timings);
    let wall = t0.elapsed().as_secs_f64();

    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let csv_path = out_dir.join(format!("soak-{stamp}.csv"));
    let mut csv = String::from("t_s,rss_mib,runs_done\n");
    for s in &samples {
        csv.push_str(&format!("{:.2},{:.2},{}\n", s.t, s.rss_mib, s.runs_done));
    }
    std::fs::write(&csv_path, csv).with_context(|| format!("writing {}", csv_path.display()))?;

    if !exit.success() {
        let tail: Vec<&str> = lines
            .iter()
            .rev()
            .take(5)
            .map(|(_, l)| l.as_str())
            .collect();
        bail!(
            "freekv exited with {exit} after {wall:.0} s; last stderr lines: {:?}",
            tail.into_iter().rev().collect::<Vec<_>>()
        );
    }
    let decoded: usize = timings.iter().map(|t| t.0).sum();
    let decode_s: f64 = timings
        .iter()
        .filter(|t| t.1 > 0.0)
        .map(|t| t.0 as f64 / t.1)
        .sum();
    let tok_s = if decode_s > 0.0 {
        decoded as f64 / decode_s
    } else {
        0.0
    };
    // Warm-up: the first run, which grows the host KV pools to what a run needs.
    let v = judge(&samples, runs).ok_or_else(|| {
        anyhow!(
            "RSS samples in fewer than two runs ({} samples over {wall:.0} s): more --tokens or \
             a shorter --interval-ms",
            samples.len()
        )
    })?;
    let per_1k = v.slope_mib_per_run.map(|s| s / o.per_run as f64 * 1000.0);
    let passed = v.growth_mib <= o.max_growth_mib;
    let summary = json!({
        "kv": o.kv,
        "budget": o.budget,
        "model": o.model.as_ref().map(|m| m.display().to_string()),
        "tokens": o.tokens,
        "per_run": o.per_run,
        "runs": runs,
        "decoded_tokens": decoded,
        "decode_tok_s": tok_s,
        "wall_s": wall,
        "samples": samples.len(),
        "run_ends_s": run_ends,
        "run_peaks_mib": v.run_peaks_mib,
        "run_starts_mib": v.run_starts_mib,
        "warmup_peak_mib": v.warm_peak_mib,
        "last_peak_mib": v.last_peak_mib,
        "growth_after_warmup_mib": v.growth_mib,
        "slope_mib_per_run": v.slope_mib_per_run,
        "slope_mib_per_1k_tokens": per_1k,
        "max_growth_mib": o.max_growth_mib,
        "passed": passed,
        "csv": csv_path.display().to_string(),
    });
    let json_path = out_dir.join(format!("soak-{stamp}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&summary)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    let mib = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "soak: {decoded} tokens in {runs} runs at {tok_s:.1} tok/s; RSS peak per run [{}] MiB \
         (warm-up {:.1}, last {:.1}, growth after warm-up {:+.2} MiB), at run starts [{}] MiB; \
         slope {} MiB per 1K tokens -> {}",
        mib(&v.run_peaks_mib),
        v.warm_peak_mib,
        v.last_peak_mib,
        v.growth_mib,
        mib(&v.run_starts_mib),
        per_1k.map_or("n/a".to_string(), |s| format!("{s:+.3}")),
        if passed { "PASS" } else { "FAIL" }
    );
    if !passed {
        bail!(
            "the per-run RSS peak grew by {:.1} MiB after warm-up (allowed {} MiB): see {}",
            v.growth_mib,
            o.max_growth_mib,
            csv_path.display()
        );
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
    fn options_parse_and_validate() {
        let o = SoakOptions::parse(&args(&["--tokens", "1000", "--per-run", "300"])).unwrap();
        assert_eq!((o.tokens, o.per_run, o.runs()), (1000, 300, 4));
        let o = SoakOptions::parse(&args(&["--tokens", "200", "--per-run", "100", "--", "-x"]))
            .unwrap();
        assert_eq!((o.per_run, o.runs()), (100, 2));
        assert_eq!(o.extra, args(&["-x"]));
        assert!(SoakOptions::parse(&args(&["--tokens", "100", "--per-run", "100"])).is_err());
        assert!(SoakOptions::parse(&args(&["--tokens", "0"])).is_err());
        assert!(SoakOptions::parse(&args(&["--max-growth-mib", "-1"])).is_err());
        assert!(SoakOptions::parse(&args(&["--what"])).is_err());
    }

    #[test]
    fn proc_status_and_timing_lines() {
        let st = "Name:\tfreekv\nVmHWM:\t  400000 kB\nVmRSS:\t  204800 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss_mib(st), Some(200.0));
        assert_eq!(parse_vm_rss_mib("Name: x\n"), None);
        let l = "freekv: run 2/4: prompt 40 tokens, prefill 310.2 tok/s (0.13 s); decode 4095 tokens, 61.5 tok/s; stop: length";
        assert_eq!(parse_timing_line(l), Some((4095, 61.5)));
        assert_eq!(parse_timing_line("freekv: kv freekv: sparse ..."), None);
    }

    /// Runs whose RSS ramps up with the sequence and drops at each new one.
    fn sawtooth(runs: usize, leak_per_run: f64) -> Vec<Sample> {
        let mut v = Vec::new();
        for r in 0..runs {
            for i in 0..10 {
                v.push(Sample {
                    t: (r * 10 + i) as f64,
                    rss_mib: 300.0 + 20.0 * i as f64 + leak_per_run * r as f64,
                    runs_done: r,
                });
            }
        }
        v
    }

    #[test]
    fn slope_and_judgement() {
        let v = judge(&sawtooth(4, 0.0), 4).unwrap();
        assert_eq!(v.run_peaks_mib, vec![480.0; 4]);
        assert_eq!(v.run_starts_mib, vec![300.0; 4]);
        assert_eq!((v.growth_mib, v.slope_mib_per_run), (0.0, Some(0.0)));
        let v = judge(&sawtooth(4, 5.0), 4).unwrap();
        assert_eq!((v.warm_peak_mib, v.last_peak_mib), (480.0, 495.0));
        assert_eq!(v.growth_mib, 15.0);
        let s = v.slope_mib_per_run.unwrap();
        assert!((s - 5.0).abs() < 1e-9, "{s}");
        assert!(judge(&sawtooth(1, 0.0), 1).is_none());
        assert_eq!(slope(&[(1.0, 2.0)]), None);
    }
}
