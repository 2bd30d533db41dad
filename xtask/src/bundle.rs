//! `cargo xtask bench-bundle`: the GPU half of `cargo xtask bench` for a machine without a Rust
//! toolchain. Builds every criterion bench binary that has GPU groups, the xtask binary itself
//! and the `freekv` CLI here, and copies them (stripped) with the peer scripts and a manifest
//! into one folder that travels to the GPU machine, where
//! `xtask bench --prebuilt DIR --gpu-only --out ...` runs them without cargo.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Schema tag of `manifest.json`.
pub const MANIFEST_SCHEMA: &str = "freekv-bench-bundle/1";

/// Default bundle folder (git-ignored), relative to the repository root.
pub const DEFAULT_DIR: &str = ".device/bench";

/// The size the bundle should stay under: the device tool carries at most 64 MiB together with
/// the working tree.
pub const DEFAULT_MAX_MIB: f64 = 50.0;

/// One criterion bench executable reported by `cargo bench --no-run --message-format=json`.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchArtifact {
    /// The bench target's name (`[[bench]] name`).
    pub name: String,
    /// Its package.
    pub package: String,
    /// The built executable.
    pub exe: PathBuf,
    /// The bench's main source file.
    pub src: PathBuf,
    /// The package folder (cargo runs benches there).
    pub package_dir: Option<PathBuf>,
}

/// The package name from a cargo package id: `path+file:///x/freekv-model#0.1.0` →
/// `freekv-model`; `path+file:///x/dir#name@0.1.0` → `name`; `name 0.1.0 (path+...)` → `name`.
pub fn package_name(id: &str) -> String {
    if let Some((url, frag)) = id.split_once('#') {
        if let Some((name, _)) = frag.split_once('@') {
            return name.to_string();
        }
        return url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(url)
            .to_string();
    }
    id.split_whitespace().next().unwrap_or(id).to_string()
}

/// The bench executables in the JSON messages of `cargo bench --no-run --message-format=json`
/// (one message per line; other lines and other artifacts are ignored).
pub fn parse_artifacts(text: &str) -> Vec<BenchArtifact> {
    let mut out: Vec<BenchArtifact> = Vec::new();
    for line in text.lines() {
        let Ok(m) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if m["reason"] != "compiler-artifact" {
            continue;
        }
        let t = &m["target"];
        let is_bench = t["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|x| x == "bench"));
        let (Some(exe), Some(name), true) =
            (m["executable"].as_str(), t["name"].as_str(), is_bench)
        else {
            continue;
        };
        let a = BenchArtifact {
            name: name.to_string(),
            package: package_name(m["package_id"].as_str().unwrap_or_default()),
            exe: PathBuf::from(exe),
            src: PathBuf::from(t["src_path"].as_str().unwrap_or_default()),
            package_dir: m["manifest_path"]
                .as_str()
                .and_then(|p| Path::new(p).parent().map(Path::to_path_buf)),
        };
        if !out
            .iter()
            .any(|x| x.name == a.name && x.package == a.package)
        {
            out.push(a);
        }
    }
    out
}

/// Whether a bench source has GPU groups: it names CUDA or the GPU (the CPU benches of this
/// workspace never do; a bench that gains GPU groups does, through `freekv_kernels::Gpu`,
/// `cuda::` or its "no CUDA device" skip line).
pub fn has_gpu_groups(src_text: &str) -> bool {
    let t = src_text.to_ascii_lowercase();
    t.contains("cuda") || t.contains("gpu")
}

fn workspace_bench_packages() -> Result<Vec<String>> {
    let mut c = crate::bench::cargo();
    c.args(["metadata", "--no-deps", "--format-version", "1"]);
    let v: Value = serde_json::from_str(&crate::bench::output(c)?)?;
    Ok(v["packages"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter(|p| {
                    p["targets"].as_array().is_some_and(|ts| {
                        ts.iter().any(|t| {
                            t["kind"]
                                .as_array()
                                .is_some_and(|k| k.iter().any(|x| x == "bench"))
                        })
                    })
                })
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

pub(crate) fn cargo_bench_no_run(packages: &[String]) -> (Vec<BenchArtifact>, Result<()>) {
    let mut c = crate::bench::cargo();
    c.args(["bench", "--no-run", "--message-format=json"]);
    if packages.is_empty() {
        c.arg("--workspace");
    }
    for p in packages {
        c.args(["-p", p]);
    }
    c.stdout(Stdio::piped()).stderr(Stdio::inherit());
    match c.output() {
        Ok(o) => {
            let arts = parse_artifacts(&String::from_utf8_lossy(&o.stdout));
            let res = if o.status.success() {
                Ok(())
            } else {
                Err(anyhow!(
                    "`{}` failed: {}",
                    crate::runner::show(&c),
                    o.status
                ))
            };
            (arts, res)
        }
        Err(e) => (
            Vec::new(),
            Err(anyhow!("cannot run `{}`: {e}", crate::runner::show(&c))),
        ),
    }
}

/// Builds every bench of the workspace (`cargo bench --no-run`, the release-based bench
/// profile) and returns the executables with notes on what failed. When the workspace build
/// fails (another crate mid-edit), each package with benches is built on its own, so that the
/// benches that build are still there.
pub fn build_benches() -> (Vec<BenchArtifact>, Vec<String>) {
    let mut notes = Vec::new();
    let (mut arts, res) = cargo_bench_no_run(&[]);
    if let Err(e) = res {
        notes.push(format!(
            "building all the benches failed ({e}); packages built one by one"
        ));
        match workspace_bench_packages() {
            Ok(pkgs) => {
                for p in pkgs {
                    let (more, r) = cargo_bench_no_run(std::slice::from_ref(&p));
                    if let Err(e) = r {
                        notes.push(format!("benches of {p} did not build: {e}"));
                    }
                    for a in more {
                        if !arts
                            .iter()
                            .any(|x| x.name == a.name && x.package == a.package)
                        {
                            arts.push(a);
                        }
                    }
                }
            }
            Err(e) => notes.push(format!("cargo metadata: {e}")),
        }
    }
    arts.retain(|a| a.exe.is_file());
    (arts, notes)
}

/// One bench binary in a bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct BundledBench {
    /// The bench target's name.
    pub name: String,
    /// Its package.
    pub package: String,
    /// File name in the bundle folder.
    pub file: String,
    /// Size, bytes.
    pub bytes: u64,
}

/// `manifest.json` of a bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// Commit the binaries were built from (`git rev-parse --short HEAD`, marked when dirty).
    pub git: String,
    /// When the bundle was made (UTC).
    pub created: String,
    /// The bench binaries.
    pub benches: Vec<BundledBench>,
    /// The xtask binary's file name.
    pub xtask: Option<String>,
    /// The `freekv` CLI's file name.
    pub freekv: Option<String>,
    /// Peer scripts, relative to the bundle folder.
    pub peers: Vec<String>,
}

impl Manifest {
    /// JSON form.
    pub fn to_json(&self) -> Value {
        let benches: Vec<Value> = self
            .benches
            .iter()
            .map(
                |b| json!({"name": b.name, "package": b.package, "file": b.file, "bytes": b.bytes}),
            )
            .collect();
        json!({
            "schema": MANIFEST_SCHEMA, "git": self.git, "created": self.created,
            "benches": benches, "xtask": self.xtask, "freekv": self.freekv, "peers": self.peers,
            "total_bytes": self.benches.iter().map(|b| b.bytes).sum::<u64>(),
        })
    }

    /// Back from [`Manifest::to_json`]; checks the schema and that file names stay inside the
    /// bundle folder.
    pub fn from_json(v: &Value) -> Result<Self> {
        if v["schema"] != MANIFEST_SCHEMA {
            bail!(
                "not a bench bundle manifest (schema {}, want {MANIFEST_SCHEMA})",
                v["schema"]
            );
        }
        let plain = |f: &str| -> Result<String> {
            let p = Path::new(f);
            if f.is_empty()
                || p.is_absolute()
                || p.components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                bail!("manifest: bad file name `{f}`");
            }
            Ok(f.to_string())
        };
        let mut benches = Vec::new();
        for b in v["benches"]
            .as_array()
            .ok_or_else(|| anyhow!("manifest: no benches list"))?
        {
            benches.push(BundledBench {
                name: b["name"]
                    .as_str()
                    .ok_or_else(|| anyhow!("manifest: bench without a name"))?
                    .to_string(),
                package: b["package"].as_str().unwrap_or_default().to_string(),
                file: plain(
                    b["file"]
                        .as_str()
                        .ok_or_else(|| anyhow!("manifest: bench without a file"))?,
                )?,
                bytes: b["bytes"].as_u64().unwrap_or(0),
            });
        }
        let opt_file = |k: &str| -> Result<Option<String>> { v[k].as_str().map(plain).transpose() };
        Ok(Self {
            git: v["git"].as_str().unwrap_or("unknown").to_string(),
            created: v["created"].as_str().unwrap_or_default().to_string(),
            benches,
            xtask: opt_file("xtask")?,
            freekv: opt_file("freekv")?,
            peers: v["peers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(plain)
                        .collect::<Result<Vec<_>>>()
                })
                .transpose()?
                .unwrap_or_default(),
        })
    }

    /// Reads `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("manifest.json");
        let t = std::fs::read_to_string(&p).with_context(|| {
            format!(
                "reading {} (make the bundle with `cargo xtask bench-bundle`)",
                p.display()
            )
        })?;
        Self::from_json(
            &serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))?,
        )
    }

    /// Total bytes of the bench binaries.
    pub fn bench_bytes(&self) -> u64 {
        self.benches.iter().map(|b| b.bytes).sum()
    }
}

/// File names of the bundled benches: `bench-NAME`, or `bench-PACKAGE-NAME` for a name that
/// two packages share.
pub fn bench_file_names(arts: &[(String, String)]) -> Vec<String> {
    arts.iter()
        .map(|(pkg, name)| {
            if arts.iter().filter(|(_, n)| n == name).count() > 1 {
                format!("bench-{pkg}-{name}")
            } else {
                format!("bench-{name}")
            }
        })
        .collect()
}

/// Options of `bench-bundle`.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleOptions {
    /// Bundle folder.
    pub out: PathBuf,
    /// Bench names to bundle besides those with GPU groups (or, with `only`, instead of them).
    pub benches: Vec<String>,
    /// Bundle exactly `benches`.
    pub only: bool,
    /// Size guide, MiB.
    pub max_mib: f64,
}

impl BundleOptions {
    /// Parses the arguments after `bench-bundle`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Self {
            out: crate::bench::root().join(DEFAULT_DIR),
            benches: Vec::new(),
            only: false,
            max_mib: DEFAULT_MAX_MIB,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = |what: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| anyhow!("{a} needs {what}"))
            };
            match a.as_str() {
                "--out" => o.out = PathBuf::from(val("a folder")?),
                "--add" => o.benches.extend(
                    val("a comma list")?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                ),
                "--only" => {
                    o.only = true;
                    o.benches.extend(
                        val("a comma list")?
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string),
                    );
                }
                "--max-mib" => {
                    o.max_mib = val("a number")?
                        .parse()
                        .map_err(|_| anyhow!("--max-mib needs a number"))?;
                }
                other => bail!("unknown bench-bundle option `{other}` (see cargo xtask help)"),
            }
        }
        Ok(o)
    }
}

/// Which artifacts go into the bundle: those whose source has GPU groups plus the named ones
/// (`only`: exactly the named ones). Errors on a named bench that was not built.
pub fn select<'a>(
    arts: &'a [BenchArtifact],
    srcs: &[String],
    names: &[String],
    only: bool,
) -> Result<Vec<&'a BenchArtifact>> {
    for n in names {
        if !arts.iter().any(|a| &a.name == n) {
            let known: Vec<&str> = arts.iter().map(|a| a.name.as_str()).collect();
            bail!("no bench `{n}` was built (built: {})", known.join(", "));
        }
    }
    Ok(arts
        .iter()
        .zip(srcs)
        .filter(|(a, src)| names.contains(&a.name) || (!only && has_gpu_groups(src)))
        .map(|(a, _)| a)
        .collect())
}

/// Copies `src` to `dst` without debug information (`strip`); falls back to a plain copy when
/// `strip` is missing or fails, returning a note.
pub(crate) fn copy_stripped(src: &Path, dst: &Path) -> Result<Option<String>> {
    let ok = Command::new("strip")
        .arg("-o")
        .arg(dst)
        .arg(src)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return Ok(None);
    }
    std::fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(Some(format!(
        "{}: not stripped (strip failed)",
        dst.file_name().unwrap_or_default().to_string_lossy()
    )))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Runs `cargo xtask bench-bundle`.
pub fn run(o: &BundleOptions) -> Result<()> {
    let root = crate::bench::root();
    let out = if o.out.is_absolute() {
        o.out.clone()
    } else {
        std::env::current_dir()?.join(&o.out)
    };
    // Start from an empty folder; only a folder that is one of ours (or empty) is cleared.
    if out.exists() {
        let ours = out.join("manifest.json").is_file();
        let empty = std::fs::read_dir(&out)?.next().is_none();
        if !ours && !empty {
            bail!(
                "{} exists and is not a bench bundle (no manifest.json): choose another --out",
                out.display()
            );
        }
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("peers"))?;

    println!("building the benches (cargo bench --workspace --no-run) ...");
    let (arts, mut notes) = build_benches();
    let srcs: Vec<String> = arts
        .iter()
        .map(|a| std::fs::read_to_string(&a.src).unwrap_or_default())
        .collect();
    let chosen = select(&arts, &srcs, &o.benches, o.only)?;
    if chosen.is_empty() {
        bail!("no bench with GPU groups was built");
    }
    println!("building the freekv CLI (cargo build --release -p freekv-cli) ...");
    let mut c = crate::bench::cargo();
    c.args(["build", "--release", "-p", "freekv-cli", "--bin", "freekv"]);
    let cli = match crate::bench::run_status(c) {
        Ok(()) => Some(root.join("target/release/freekv")),
        Err(e) => {
            notes.push(format!("the freekv CLI did not build ({e}); not bundled"));
            None
        }
    };

    let pairs: Vec<(String, String)> = chosen
        .iter()
        .map(|a| (a.package.clone(), a.name.clone()))
        .collect();
    let files = bench_file_names(&pairs);
    let mut benches = Vec::new();
    for (a, f) in chosen.iter().zip(&files) {
        let dst = out.join(f);
        notes.extend(copy_stripped(&a.exe, &dst)?);
        let bytes = std::fs::metadata(&dst)?.len();
        println!(
            "  {:<28} {:>6.1} MiB  ({} {})",
            f,
            mib(bytes),
            a.package,
            a.name
        );
        benches.push(BundledBench {
            name: a.name.clone(),
            package: a.package.clone(),
            file: f.clone(),
            bytes,
        });
    }
    // This very binary: `cargo xtask` built it in release mode just now.
    let me = std::env::current_exe()?;
    notes.extend(copy_stripped(&me, &out.join("xtask"))?);
    let mut extra = std::fs::metadata(out.join("xtask"))?.len();
    let freekv = match cli {
        Some(p) => {
            notes.extend(copy_stripped(&p, &out.join("freekv"))?);
            extra += std::fs::metadata(out.join("freekv"))?.len();
            Some("freekv".to_string())
        }
        None => None,
    };
    let mut peers = Vec::new();
    let mut rd: Vec<PathBuf> = std::fs::read_dir(root.join("xtask/peers"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "py"))
        .collect();
    rd.sort();
    for p in rd {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let rel = format!("peers/{name}");
        std::fs::copy(&p, out.join(&rel))?;
        extra += std::fs::metadata(out.join(&rel))?.len();
        peers.push(rel);
    }
    let m = Manifest {
        git: crate::bench::git_rev(),
        created: crate::bench::now_utc(),
        benches,
        xtask: Some("xtask".into()),
        freekv,
        peers,
    };
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&m.to_json())? + "\n",
    )?;
    for n in &notes {
        println!("note: {n}");
    }
    let total = m.bench_bytes() + extra;
    println!(
        "bundle {}: {} benches ({}), xtask, {}{} peer scripts; {:.1} MiB in all",
        out.display(),
        m.benches.len(),
        m.benches
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if m.freekv.is_some() { "freekv, " } else { "" },
        m.peers.len(),
        mib(total)
    );
    if mib(total) > o.max_mib {
        println!(
            "WARNING: the bundle is {:.1} MiB, over the {:.0} MiB guide: the device tool carries at \
             most 64 MiB together with the working tree. Bundle fewer benches (--only a,b).",
            mib(total),
            o.max_mib
        );
    } else {
        println!("size check: under the {:.0} MiB guide", o.max_mib);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: &str, name: &str, pkg: &str, exe: Option<&str>) -> String {
        json!({"reason": "compiler-artifact", "package_id": pkg,
               "manifest_path": "/r/freekv-model/Cargo.toml",
               "target": {"kind": [kind], "name": name, "src_path": format!("/r/benches/{name}.rs")},
               "profile": {"test": false}, "executable": exe})
        .to_string()
    }

    #[test]
    fn package_names_from_ids() {
        assert_eq!(
            package_name("path+file:///r/freekv-model#0.1.0"),
            "freekv-model"
        );
        assert_eq!(
            package_name("path+file:///r/dir#freekv-cli@0.1.0"),
            "freekv-cli"
        );
        assert_eq!(
            package_name("freekv-model 0.1.0 (path+file:///r/freekv-model)"),
            "freekv-model"
        );
    }

    #[test]
    fn artifacts_keep_bench_executables_only() {
        let text = [
            msg(
                "bench",
                "cuda_decode",
                "path+file:///r/freekv-model#0.1.0",
                Some("/t/cuda_decode-1"),
            ),
            msg(
                "lib",
                "freekv_model",
                "path+file:///r/freekv-model#0.1.0",
                None,
            ),
            msg(
                "bin",
                "freekv",
                "path+file:///r/freekv-cli#0.1.0",
                Some("/t/freekv-2"),
            ),
            "Compiling something (not json)".to_string(),
            json!({"reason": "build-finished", "success": true}).to_string(),
            msg(
                "bench",
                "cuda_decode",
                "path+file:///r/freekv-model#0.1.0",
                Some("/t/cuda_decode-1"),
            ),
            msg(
                "bench",
                "select",
                "path+file:///r/freekv-select#0.1.0",
                Some("/t/select-3"),
            ),
        ]
        .join("\n");
        let a = parse_artifacts(&text);
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].name, "cuda_decode");
        assert_eq!(a[0].package, "freekv-model");
        assert_eq!(a[0].exe, PathBuf::from("/t/cuda_decode-1"));
        assert_eq!(a[0].src, PathBuf::from("/r/benches/cuda_decode.rs"));
        assert_eq!(a[0].package_dir, Some(PathBuf::from("/r/freekv-model")));
        assert_eq!(a[1].package, "freekv-select");
    }

    #[test]
    fn gpu_benches_selected_by_source_and_name() {
        let art = |n: &str| BenchArtifact {
            name: n.into(),
            package: "p".into(),
            exe: PathBuf::from(n),
            src: PathBuf::new(),
            package_dir: None,
        };
        let arts = [art("kernels"), art("select"), art("cuda_recall")];
        let srcs = [
            "//! timed with CUDA events".to_string(),
            "fn main() {}".to_string(),
            "use freekv_kernels::Gpu;".to_string(),
        ];
        let names = |v: Vec<&BenchArtifact>| v.iter().map(|a| a.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(select(&arts, &srcs, &[], false).unwrap()),
            ["kernels", "cuda_recall"]
        );
        assert_eq!(
            names(select(&arts, &srcs, &["select".into()], false).unwrap()),
            ["kernels", "select", "cuda_recall"]
        );
        assert_eq!(
            names(select(&arts, &srcs, &["select".into()], true).unwrap()),
            ["select"]
        );
        assert!(select(&arts, &srcs, &["nope".into()], false).is_err());
        assert!(!has_gpu_groups("recall executor on the CPU"));
    }

    #[test]
    fn file_names_disambiguate_shared_names() {
        let f = bench_file_names(&[
            ("freekv-kernels".into(), "select".into()),
            ("freekv-select".into(), "select".into()),
            ("freekv-model".into(), "cuda_decode".into()),
        ]);
        assert_eq!(
            f,
            [
                "bench-freekv-kernels-select",
                "bench-freekv-select-select",
                "bench-cuda_decode"
            ]
        );
    }

    #[test]
    fn manifest_round_trip_and_checks() {
        let m = Manifest {
            git: "abc1234".into(),
            created: "2026-11-28 14:00 UTC".into(),
            benches: vec![BundledBench {
                name: "cuda_decode".into(),
                package: "freekv-model".into(),
                file: "bench-cuda_decode".into(),
                bytes: 4 << 20,
            }],
            xtask: Some("xtask".into()),
            freekv: None,
            peers: vec!["peers/hf_decode.py".into()],
        };
        let v = m.to_json();
        assert_eq!(v["total_bytes"], 4 << 20);
        assert_eq!(Manifest::from_json(&v).unwrap(), m);
        assert_eq!(m.bench_bytes(), 4 << 20);
        let mut bad = v.clone();
        bad["schema"] = json!("other/1");
        assert!(Manifest::from_json(&bad).is_err());
        let mut bad = v.clone();
        bad["benches"][0]["file"] = json!("../../etc/passwd");
        assert!(Manifest::from_json(&bad).is_err());
        let mut bad = v;
        bad["xtask"] = json!("/abs/xtask");
        assert!(Manifest::from_json(&bad).is_err());
        // From a folder.
        let dir = std::env::temp_dir().join(format!("xtask-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Manifest::load(&dir).is_err());
        std::fs::write(dir.join("manifest.json"), m.to_json().to_string()).unwrap();
        assert_eq!(Manifest::load(&dir).unwrap(), m);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bundle_options() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = BundleOptions::parse(&a(&["--out", "x", "--add", "select,recall"])).unwrap();
        assert_eq!(o.out, PathBuf::from("x"));
        assert_eq!(o.benches, ["select", "recall"]);
        assert!(!o.only);
        let o = BundleOptions::parse(&a(&["--only", "kernels", "--max-mib", "40"])).unwrap();
        assert!(o.only && o.max_mib == 40.0);
        assert!(o.out.ends_with(DEFAULT_DIR));
        assert!(BundleOptions::parse(&a(&["--max-mib", "x"])).is_err());
        assert!(BundleOptions::parse(&a(&["--out"])).is_err());
        assert!(BundleOptions::parse(&a(&["--bogus"])).is_err());
    }
}
