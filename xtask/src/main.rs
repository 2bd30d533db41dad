//! Project tasks: `cargo xtask bench [--quick] [criterion args]`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut c: Command) -> Result<()> {
    let status = c.status().with_context(|| format!("cannot run {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed: {status}");
    }
    Ok(())
}

fn usage() -> &'static str {
    "usage: cargo xtask <task>\n\
     tasks:\n  \
       bench [--quick] [-- criterion args]   run every criterion benchmark of the workspace\n"
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("bench") => {
            let rest = &args[1..];
            let quick = rest.iter().any(|a| a == "--quick");
            let mut c = cargo();
            c.args(["bench", "--workspace", "--bench", "*", "--"]);
            if quick {
                c.args(["--warm-up-time", "0.5", "--measurement-time", "1"]);
            }
            c.args(rest.iter().filter(|a| *a != "--quick" && *a != "--"));
            run(c)
        }
        Some("-h" | "--help" | "help") | None => {
            print!("{}", usage());
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n{}", usage()),
    }
}
