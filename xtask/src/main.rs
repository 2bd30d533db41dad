//! Project tasks. `cargo xtask bench`: every benchmark figure of the project in one command —
//! criterion micro-benchmarks, the end-to-end matrix (backend × KV policy × batch × context),
//! hardware ceilings measured in the same run, optional peers — written as raw JSON, a markdown
//! report and SVG plots under `docs/bench/` (see `docs/bench/README.md`).

mod bench;
mod bundle;
mod criterion;
mod gpu_e2e;
mod probe;
mod report;
mod runner;
mod sanitize;
mod soak;
mod svg;

use anyhow::{Result, anyhow, bail};

/// The value after `flag` on a task's command line, or an error saying what the flag needs.
pub(crate) fn flag_value<'a>(
    it: &mut impl Iterator<Item = &'a String>,
    flag: &str,
    what: &str,
) -> Result<&'a String> {
    it.next().ok_or_else(|| anyhow!("{flag} needs {what}"))
}

fn usage() -> &'static str {
    "usage: cargo xtask <task>\n\
     tasks:\n  \
       bench [options]   criterion micro-benchmarks, the end-to-end matrix, ceilings, peers;\n                    \
                         writes results-<host>.json, README.md and SVG plots\n  \
       bench-report [DIR]  re-render README.md and the plots from DIR/results-*.json (default docs/bench)\n  \
       bench-report --merge FILE [DIR]  take a results JSON from the GPU machine into DIR, re-render\n  \
       bench-bundle [--out DIR] [--add a,b | --only a,b] [--max-mib N]\n                    \
                         build the GPU bench binaries, xtask and freekv into DIR (default .device/bench)\n                    \
                         for `xtask bench --prebuilt DIR` on a machine without cargo\n\
     bench options:\n  \
       --quick           short criterion times and a subset of the matrix (about two minutes on 2 cores)\n  \
       --cpu-only        skip everything that needs a GPU\n  \
       --gpu-only        only the GPU parts (error without a GPU)\n  \
       --peer hf         also run Hugging Face transformers (GPU, python3 with torch + transformers)\n  \
       --peer llamacpp   also run llama-cpp-python on the CPU with the same GGUF and prompts\n  \
       --out DIR         output folder (default docs/bench)\n  \
       --no-criterion    skip the criterion micro-benchmarks\n  \
       --no-e2e          skip the end-to-end matrix\n  \
       --targets a,b     only these criterion bench targets (transpose, select, recall, dequant,\n                    \
                         tokenizer, qmatmul, decode, kv, kernels, cuda_decode, or any bench built); with\n                    \
                         --quick, each its quick subset (kv: all)\n  \
       --prebuilt DIR    run the bench binaries of a bench-bundle folder (no cargo; GPU parts only; needs --out)\n  \
       --max-minutes N   time budget: what does not fit is skipped, a bench running at the end is stopped\n"
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo xtask <task> --help` prints the usage instead of failing on an unknown option.
    if args.iter().skip(1).any(|a| a == "-h" || a == "--help") {
        print!("{}", usage());
        println!("  {}\n  {}", soak::usage(), sanitize::usage());
        return Ok(());
    }
    match args.first().map(String::as_str) {
        Some("bench") => {
            let opts = bench::Options::parse(&args[1..])?;
            bench::run(&opts)
        }
        Some("bench-report") => bench::report_cmd(&args[1..]),
        Some("bench-bundle") => bundle::run(&bundle::BundleOptions::parse(&args[1..])?),
        Some("soak") => soak::run(&soak::SoakOptions::parse(&args[1..])?),
        Some("sanitize") => sanitize::run(&sanitize::SanitizeOptions::parse(&args[1..])?),
        Some("-h" | "--help" | "help") | None => {
            print!("{}", usage());
            println!("  {}\n  {}", soak::usage(), sanitize::usage());
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n{}", usage()),
    }
}
