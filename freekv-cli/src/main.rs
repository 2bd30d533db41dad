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
    /// Maximum number of tokens to generate (at least 1).
    #[arg(short = 'n', long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Keep generating past the model's end-of-generation tokens, up to -n or the context
    /// (benchmarks and soak runs).
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep only the K most likely tokens when sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P when sampling (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object (ids, text, top-5 logprobs per step, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Run the generation this many times in one process, each time as a new sequence (memory
    /// soak runs: `cargo xtask soak`). CPU backend.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Upper bound on the host memory of the KV cache, in GiB. CPU backend: the session's cache
    /// plus the host mirror of arkvale/freekv; a run whose prompt + -n tokens need more is
    /// refused before it starts [default: the context's size, checked against the memory
    /// available]. CUDA backend (policies other than full): the pinned host pool of the KV
    /// history.
    #[arg(long, value_name = "GIB", allow_negative_numbers = true)]
    max_host_kv_gib: Option<f64>,
    /// How freekv recalls pages on the GPU: `gather` (one zero-copy kernel per layer, the
    /// default) or `streamed` (the paper's double-buffered copy).
    #[arg(long, value_name = "MODE", default_value = "gather")]
    gpu_recall: String,
    /// CUDA backend, `--kv freekv`: spare device slots per KV head that keep pages which left
    /// the top-k (never attended; fewer pages recalled when the selection changes back). 0 turns
    /// them off [default: as many as the retrieved pages].
    #[arg(long, value_name = "PAGES", allow_negative_numbers = true)]
    spare_pages: Option<usize>,
    /// CUDA backend, `--kv freekv`: size the step's matrix products for the device's SMs minus
    /// this many, leaving them to the speculative recall that runs beside the products. 0 (the
    /// default) sizes them for every SM.
    #[arg(
        long,
        value_name = "SMS",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    reserve_sms: usize,
    #[command(flatten)]
    kv: eval::KvArgs,
    #[command(flatten)]
    model: ModelArgs,
}

impl GenerateArgs {
    fn gpu_kv_args(&self) -> cuda_gen::GpuKvArgs {
        cuda_gen::GpuKvArgs {
            spare_pages: self.spare_pages,
            reserve_sms: self.reserve_sms,
            max_host_kv_gib: self.max_host_kv_gib,
        }
    }
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

/// Parses the command line. A usage error is one line on stderr (clap's message and its tip,
/// without the usage block) and exit code 2; `--help` and `--version` print as usual.
fn parse_cli() -> Cli {
    use clap::error::ErrorKind;
    match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!(
                "freekv: error: {}",
                one_line_usage_error(&e.render().to_string())
            );
            std::process::exit(2);
        }
    }
}

/// A rendered clap error on one line: the message without its `error: ` prefix, the lines that
/// continue it (e.g. the missing arguments) and its `tip:` lines in parentheses, without the
/// usage block.
fn one_line_usage_error(rendered: &str) -> String {
    let mut out = String::new();
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if out.is_empty() {
            out.push_str(line.strip_prefix("error: ").unwrap_or(line));
        } else if let Some(tip) = line.strip_prefix("tip: ") {
            out.push_str(" (");
            out.push_str(tip);
            out.push(')');
        } else {
            out.push(' ');
            out.push_str(line);
        }
    }
    if out.is_empty() {
        out.push_str("invalid command line");
    }
    out.push_str(" (see --help)");
    out
}

fn main() {
    let cli = parse_cli();
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

/// Checks every flag of `generate` that needs no model, so that a bad flag fails before anything
/// is loaded or probed.
fn validate_generate_flags(a: &GenerateArgs) -> Result<()> {
    if a.max_new_tokens == 0 {
        bail!("-n/--max-new-tokens must be at least 1");
    }
    if a.repeat == 0 {
        bail!("--repeat must be at least 1");
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
    if let Some(g) = a.max_host_kv_gib
        && !(g > 0.0 && g.is_finite())
    {
        bail!("--max-host-kv-gib must be a positive number of GiB (got {g})");
    }
    if a.prompt_ids.as_ref().is_some_and(Vec::is_empty) {
        bail!("--prompt-ids: no token id given");
    }
    // Policy names, budget against sink + window + one page, page size, τ, summary, group
    // policy, recall mode; dense layers are checked against the model once it is loaded.
    a.kv.single(usize::MAX)?;
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

/// Memory the kernel reports as available for new allocations (`MemAvailable`, Linux only).
fn mem_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The host KV memory plan of one CPU run: the bound of the session's cache, checked up front
/// against `--max-host-kv-gib` or the memory available.
struct HostKvPlan {
    /// Bound of the session's cache (`None`: the context's size).
    cache_limit: Option<usize>,
    /// `--max-host-kv-gib`, for messages.
    flag_gib: Option<f64>,
}

fn plan_host_kv(
    a: &GenerateArgs,
    model: &freekv_model::llama::LlamaModel,
    kv_cfg: &freekv_model::kv::KvConfig,
    prompt_tokens: usize,
) -> Result<HostKvPlan> {
    use freekv_model::kv::KvKind;
    let c = model.config();
    let tokens = prompt_tokens
        .saturating_add(a.max_new_tokens)
        .min(c.context_length);
    let cache = model.kv_cache_bytes(kv_cfg.page_size, tokens)?;
    // arkvale and freekv mirror every sparse-capable layer into a host pool of their own.
    let mirrored_layers = match kv_cfg.kind {
        KvKind::ArkVale | KvKind::FreeKv => c.n_layers.saturating_sub(kv_cfg.dense_layers.len()),
        KvKind::Full | KvKind::Quest => 0,
    };
    let copies =
        |bytes: usize| bytes as f64 * (c.n_layers + mirrored_layers) as f64 / c.n_layers as f64;
    let need = copies(cache);
    let what = format!(
        "the KV cache of {tokens} tokens (prompt {prompt_tokens} + -n {}, at most the context of {}) \
         over {} layers needs {:.3} GiB of host memory",
        a.max_new_tokens,
        c.context_length,
        c.n_layers,
        need / GIB
    );
    match a.max_host_kv_gib {
        Some(gib) => {
            let limit = gib * GIB;
            if need > limit {
                bail!(
                    "{what}, above --max-host-kv-gib {gib}: raise --max-host-kv-gib or lower -n or \
                     the prompt length"
                );
            }
            // The session's cache gets its share; the mirror never holds more than the cache.
            let share = limit * c.n_layers as f64 / (c.n_layers + mirrored_layers) as f64;
            Ok(HostKvPlan {
                cache_limit: Some(share as usize),
                flag_gib: Some(gib),
            })
        }
        None => {
            if let Some(avail) = mem_available_bytes()
                && need > avail as f64
            {
                bail!(
                    "{what}, but only {:.3} GiB of memory is available: lower -n or the prompt \
                     length",
                    avail as f64 / GIB
                );
            }
            Ok(HostKvPlan {
                cache_limit: None,
                flag_gib: None,
            })
        }
    }
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    use freekv_model::chat::ChatTemplate;
    use freekv_model::generate::{GenerateOptions, Generator};
    use freekv_model::llama::LlamaModel;
    use freekv_model::sampling::SamplingParams;
    use freekv_model::tokenizer::{StreamDecoder, Tokenizer};
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};

    validate_generate_flags(&a)?;
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    let gpu_recall: freekv_model::cuda::GpuRecall = a
        .gpu_recall
        .parse()
        .map_err(|e| anyhow::anyhow!("--gpu-recall: {e}"))?;
    let non_full = if a.kv.kv.len() != 1 {
        Some("a list of KV policies")
    } else if a.repeat > 1 {
        Some("--repeat")
    } else {
        None
    };
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
        let Some(ids) = &a.prompt_ids else {
            bail!("synthetic models have no tokenizer: give the prompt with --prompt-ids");
        };
        let Some(gpu) = cuda_gen::select(true, false, non_full)? else {
            bail!("synthetic models need a CUDA device");
        };
        let model = freekv_model::cuda::CudaLlama::synthetic(gpu, name, a.seed)?;
        let kv = cuda_gen::kv_options(
            a.kv.single(model.config().n_layers)?,
            gpu_recall,
            a.gpu_kv_args(),
        )?;
        let mut opts = cuda_gen::options(a.max_new_tokens, sampling);
        opts.stop_at_eog = !a.ignore_eos;
        let out = cuda_gen::Output {
            json: a.json,
            tokenizer: None,
        };
        if cuda_gen::run(&model, ids, &opts, kv, cuda_gen::cancel_flag(), out)? {
            std::process::exit(130);
        }
        return Ok(());
    }
    // Everything that can be checked without a device comes first: the prompt, the model file,
    // the tokenization, the context and the KV flags against the model.
    let text = if a.prompt_ids.is_some() {
        None
    } else {
        Some(read_prompt(&a)?)
    };
    if text.as_deref().is_some_and(str::is_empty) {
        bail!("the prompt is empty");
    }
    let gguf = open_model(&a.model, a.json)?;
    let cfg = freekv_model::config::LlamaConfig::from_gguf(&gguf)?;
    let tok = Tokenizer::from_gguf(&gguf)?;
    let prompt_ids = match (&a.prompt_ids, text) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
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
    if prompt_ids.is_empty() {
        bail!("the prompt is empty");
    }
    if let Some((i, &id)) = prompt_ids
        .iter()
        .enumerate()
        .find(|&(_, &id)| id as usize >= cfg.vocab_size)
    {
        bail!(
            "--prompt-ids: token id {id} (at index {i}) is outside the model's vocabulary of {} tokens",
            cfg.vocab_size
        );
    }
    if prompt_ids.len() > cfg.context_length {
        bail!(
            "the prompt has {} tokens, more than the model's context of {} tokens: shorten it",
            prompt_ids.len(),
            cfg.context_length
        );
    }
    let kv_cfg = a.kv.single(cfg.n_layers)?;

    let gpu = cuda_gen::select(
        a.device == DeviceArg::Cuda,
        a.device == DeviceArg::Auto,
        non_full,
    )?;
    if let Some(gpu) = gpu {
        let model = freekv_model::cuda::CudaLlama::from_gguf(gpu, &gguf)?;
        let kv = cuda_gen::kv_options(kv_cfg.clone(), gpu_recall, a.gpu_kv_args())?;
        let mut opts = cuda_gen::options(a.max_new_tokens, sampling);
        opts.stop_at_eog = !a.ignore_eos;
        let out = cuda_gen::Output {
            json: a.json,
            tokenizer: Some(&tok),
        };
        if cuda_gen::run(&model, &prompt_ids, &opts, kv, cuda_gen::cancel_flag(), out)? {
            std::process::exit(130);
        }
        return Ok(());
    }
    let model = LlamaModel::new(gguf.clone())?;
    let plan = plan_host_kv(&a, &model, &kv_cfg, prompt_ids.len())?;
    let policy = freekv_model::kv::build_policy(&kv_cfg, model.config().n_layers)?;
    let session = model.session_bounded(kv_cfg.page_size, policy, plan.cache_limit)?;
    let mut generator = Generator::with_session(&model, &tok, session);
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_at_eog: !a.ignore_eos,
        top_logprobs: if a.json { 5 } else { 0 },
    };

    static CANCEL: AtomicBool = AtomicBool::new(false);
    // A second Ctrl-C while we are already stopping kills the process the usual way.
    let _ = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });

    let json = a.json;
    for run in 1..=a.repeat {
        let mut stream = StreamDecoder::new();
        let mut stdout = std::io::stdout().lock();
        let mut write_err = None;
        let mut streamed = false;
        let result = generator.generate(&prompt_ids, &opts, &CANCEL, &mut |id| {
            if json || write_err.is_some() {
                return;
            }
            match stream.push(&tok, id) {
                Ok(piece) => {
                    streamed |= !piece.is_empty();
                    if let Err(e) = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|_| stdout.flush())
                    {
                        write_err = Some(e);
                    }
                }
                Err(e) => tracing::warn!("cannot decode token {id}: {e}"),
            }
        });
        let result = match result {
            Ok(r) => r,
            Err(e) => {
                // Keep the streamed text on a line of its own, then say what went wrong.
                if streamed && write_err.is_none() {
                    let _ = writeln!(stdout, "{}", stream.finish());
                }
                return Err(explain_run_error(e, &plan));
            }
        };
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
        let which = if a.repeat > 1 {
            format!("run {run}/{}: ", a.repeat)
        } else {
            String::new()
        };
        eprintln!(
            "freekv: {which}prompt {} tokens, prefill {:.1} tok/s ({:.2} s); decode {} tokens, {:.1} tok/s; stop: {}",
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
            eprintln!("freekv: {which}{line}");
        }
        if result.cancelled() {
            std::process::exit(130);
        }
    }
    Ok(())
}

/// A generation error, with the flag to change when the host KV bound was reached.
fn explain_run_error(e: freekv_model::ModelError, plan: &HostKvPlan) -> anyhow::Error {
    use freekv_model::ModelError;
    if let ModelError::Layout(freekv_layout::LayoutError::PoolExhausted {
        max_pages,
        page_bytes,
    }) = &e
    {
        let used = (*max_pages as f64) * (*page_bytes as f64) / GIB;
        return match plan.flag_gib {
            Some(gib) => anyhow::anyhow!(
                "the host KV cache reached --max-host-kv-gib {gib} ({max_pages} pages, {used:.3} GiB): \
                 raise --max-host-kv-gib or lower -n or the prompt length"
            ),
            None => anyhow::anyhow!(
                "host memory for the KV cache ran out after {max_pages} pages ({used:.3} GiB): \
                 lower -n or the prompt length"
            ),
        };
    }
    e.into()
}
