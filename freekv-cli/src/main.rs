//! `freekv`: generate text, evaluate KV policies, tokenize, inspect model files.

mod fetch;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "freekv", version, about = "FreeKV-rs: long-context LLM inference with the KV cache in host memory")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "warn", env = "FREEKV_LOG")]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt (argument, --prompt-file, or stdin).
    Generate(GenerateArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Print a model file's metadata and tensor summary.
    Info(ModelArgs),
    /// Download the default model into the cache (done automatically on first use).
    Fetch,
}

#[derive(Args, Debug)]
struct ModelArgs {
    /// Path to a GGUF model file [default: SmolLM2-135M-Instruct Q4_1, fetched on first use].
    #[arg(long, short = 'm')]
    model: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// The prompt text. Without it, --prompt-file or standard input is read.
    prompt: Option<String>,
    /// Read the prompt from this file.
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Feed these token ids directly (comma separated), bypassing the tokenizer and templates.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["prompt", "prompt_file", "chat"])]
    prompt_ids: Option<Vec<u32>>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System prompt for --chat [default: the template's own default].
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Maximum number of tokens to generate.
    #[arg(short = 'n', long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens when sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P when sampling (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object (ids, text, top-5 logprobs per step, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Tokens per KV page.
    #[arg(long, default_value_t = 32)]
    page_size: usize,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args, Debug)]
struct TokenizeArgs {
    /// Text to tokenize (special tokens such as <|im_start|> are recognised).
    text: String,
    #[command(flatten)]
    model: ModelArgs,
}

fn resolve_model(args: &ModelArgs, quiet: bool) -> Result<PathBuf> {
    match &args.model {
        Some(p) => {
            if !p.is_file() {
                bail!("model file {} does not exist or is not a file", p.display());
            }
            Ok(p.clone())
        }
        None => fetch::ensure_default_model(quiet),
    }
}

fn open_model(args: &ModelArgs, quiet: bool) -> Result<Arc<freekv_model::gguf::GgufFile>> {
    let path = resolve_model(args, quiet)?;
    let file = freekv_model::gguf::GgufFile::open(&path)?;
    Ok(Arc::new(file))
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    let r = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Tokenize(a) => cmd_tokenize(a),
        Command::Info(a) => cmd_info(a),
        Command::Fetch => fetch::ensure_default_model(false).map(|p| println!("{}", p.display())),
    };
    if let Err(e) = r {
        eprintln!("freekv: error: {e:#}");
        std::process::exit(1);
    }
}

fn cmd_info(a: ModelArgs) -> Result<()> {
    let f = open_model(&a, false)?;
    println!("{}", f.summary());
    Ok(())
}

fn cmd_tokenize(a: TokenizeArgs) -> Result<()> {
    let f = open_model(&a.model, false)?;
    let tok = freekv_model::tokenizer::Tokenizer::from_gguf(&f)?;
    let ids = tok.encode(&a.text, true)?;
    println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    Ok(())
}

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    if let Some(p) = &a.prompt {
        return Ok(p.clone());
    }
    if let Some(f) = &a.prompt_file {
        return std::fs::read_to_string(f).with_context(|| format!("cannot read prompt file {}", f.display()));
    }
    use std::io::{IsTerminal, Read};
    if std::io::stdin().is_terminal() {
        bail!("no prompt: give it as an argument, with --prompt-file FILE, or on standard input");
    }
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s).context("cannot read the prompt from standard input")?;
    Ok(s)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let _ = (&a.device, a.page_size, a.temperature, a.top_k, a.top_p, a.seed, a.json, a.max_new_tokens, &a.system);
    let _ = read_prompt;
    bail!("generate: not wired yet")
}
