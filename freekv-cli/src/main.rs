//! `freekv`: generate text, evaluate KV policies, tokenize, inspect model files.

mod cuda_gen;
mod eval;
mod fetch;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "freekv",
    version,
    about = "FreeKV-rs: long-context LLM inference with the KV cache in host memory"
)]
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
    /// Evaluate KV policies: accuracy on JSONL cases, teacher-forced fidelity against full
    /// attention, or generate passkey cases.
    Eval(eval::EvalArgs),
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
    #[command(flatten)]
    kv: eval::KvArgs,
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
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let r = match cli.command {
        Command::Generate(a) => cmd_generate(a),
        Command::Eval(a) => eval::cmd_eval(a),
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
    println!(
        "{}",
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}

fn read_prompt(a: &GenerateArgs) -> Result<String> {
    if let Some(p) = &a.prompt {
        return Ok(p.clone());
    }
    if let Some(f) = &a.prompt_file {
        return std::fs::read_to_string(f)
            .with_context(|| format!("cannot read prompt file {}", f.display()));
    }
    use std::io::{IsTerminal, Read};
    if std::io::stdin().is_terminal() {
        bail!("no prompt: give it as an argument, with --prompt-file FILE, or on standard input");
    }
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("cannot read the prompt from standard input")?;
    Ok(s)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    use freekv_model::chat::ChatTemplate;
    use freekv_model::generate::{GenerateOptions, Generator};
    use freekv_model::llama::LlamaModel;
    use freekv_model::sampling::SamplingParams;
    use freekv_model::tokenizer::{StreamDecoder, Tokenizer};
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    if a.kv.page_size == 0 {
        bail!("--page-size must be at least 1");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!(
            "--temperature must be a finite number >= 0 (got {})",
            a.temperature
        );
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1] (got {})", a.top_p);
    }
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let non_full = (a.kv.kv.len() != 1 || a.kv.kv.first().is_none_or(|k| k != "full"))
        .then_some("a KV policy other than full");
    let synthetic = a
        .model
        .model
        .as_deref()
        .and_then(|p| p.to_str())
        .and_then(freekv_model::cuda::synthetic_name);
    if let Some(name) = synthetic {
        // Synthetic models (random weights, no tokenizer) exist on the CUDA decoder only.
        if a.device == DeviceArg::Cpu {
            bail!("synthetic models run on the CUDA decoder only; use --device cuda");
        }
        let Some(gpu) = cuda_gen::select(true, false, non_full)? else {
            bail!("synthetic models need a CUDA device");
        };
        let Some(ids) = &a.prompt_ids else {
            bail!("synthetic models have no tokenizer: give the prompt with --prompt-ids");
        };
        let model = freekv_model::cuda::CudaLlama::synthetic(gpu, name, a.seed)?;
        let opts = cuda_gen::options(a.max_new_tokens, sampling);
        let out = cuda_gen::Output {
            json: a.json,
            tokenizer: None,
        };
        if cuda_gen::run(&model, ids, &opts, cuda_gen::cancel_flag(), out)? {
            std::process::exit(130);
        }
        return Ok(());
    }
    let gpu = cuda_gen::select(
        a.device == DeviceArg::Cuda,
        a.device == DeviceArg::Auto,
        non_full,
    )?;
    // Read the prompt before loading anything, so a missing prompt fails fast.
    let text = if a.prompt_ids.is_some() {
        None
    } else {
        Some(read_prompt(&a)?)
    };
    let gguf = open_model(&a.model, a.json)?;
    let tok = Tokenizer::from_gguf(&gguf)?;
    let prompt_ids = match (&a.prompt_ids, text) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            if text.is_empty() {
                bail!("the prompt is empty");
            }
            if a.chat {
                let tpl = ChatTemplate::from_gguf(&gguf)?
                    .context("--chat: the model file has no chat template")?;
                let rendered = tpl.prompt(a.system.as_deref(), &text)?;
                tok.encode_prompt(&rendered)?
            } else {
                tok.encode_prompt(&text)?
            }
        }
        (None, None) => bail!("no prompt"),
    };
    if let Some(gpu) = gpu {
        let model = freekv_model::cuda::CudaLlama::from_gguf(gpu, &gguf)?;
        let opts = cuda_gen::options(a.max_new_tokens, sampling);
        let out = cuda_gen::Output {
            json: a.json,
            tokenizer: Some(&tok),
        };
        if cuda_gen::run(&model, &prompt_ids, &opts, cuda_gen::cancel_flag(), out)? {
            std::process::exit(130);
        }
        return Ok(());
    }
    let model = LlamaModel::new(gguf.clone())?;
    let kv_cfg = a.kv.single(model.config().n_layers)?;
    let policy = freekv_model::kv::build_policy(&kv_cfg, model.config().n_layers)?;
    let mut generator = Generator::with_policy(&model, &tok, kv_cfg.page_size, policy)?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
        stop_at_eog: true,
        top_logprobs: if a.json { 5 } else { 0 },
    };

    static CANCEL: AtomicBool = AtomicBool::new(false);
    // A second Ctrl-C while we are already stopping kills the process the usual way.
    let _ = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });

    let mut stream = StreamDecoder::new();
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let json = a.json;
    let result = generator.generate(&prompt_ids, &opts, &CANCEL, &mut |id| {
        if json || write_err.is_some() {
            return;
        }
        match stream.push(&tok, id) {
            Ok(piece) => {
                if let Err(e) = stdout
                    .write_all(piece.as_bytes())
                    .and_then(|_| stdout.flush())
                {
                    write_err = Some(e);
                }
            }
            Err(e) => tracing::warn!("cannot decode token {id}: {e}"),
        }
    })?;
    if let Some(e) = write_err {
        // A closed pipe (e.g. `| head`) is not an error of ours.
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to standard output");
        }
        return Ok(());
    }
    let t = &result.timings;
    if json {
        let obj = serde_json::json!({
            "prompt_ids": result.prompt_ids,
            "generated_ids": result.generated_ids,
            "text": result.text,
            "top_logprobs": result.top_logprobs,
            "stop": result.stop.as_str(),
            "timings": t,
            "kv_policy": generator.session().policy().name(),
            "kv_stats": generator.session().policy().stats(),
        });
        writeln!(stdout, "{obj}")?;
    } else {
        let rest = stream.finish();
        write!(stdout, "{rest}")?;
        writeln!(stdout)?;
    }
    drop(stdout);
    eprintln!(
        "freekv: prompt {} tokens, prefill {:.1} tok/s ({:.2} s); decode {} tokens, {:.1} tok/s; stop: {}",
        t.prompt_tokens,
        t.prefill_tok_s,
        t.prefill_s,
        t.decode_tokens,
        t.decode_tok_s,
        result.stop.as_str()
    );
    if let Some(line) = generator
        .session()
        .policy()
        .stats()
        .as_ref()
        .and_then(freekv_model::kv::summary_line)
    {
        eprintln!("freekv: {line}");
    }
    if result.cancelled() {
        std::process::exit(130);
    }
    Ok(())
}
