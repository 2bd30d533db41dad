//! The KV-policy flags shared by `generate` and `eval`, and the `eval` subcommand.

use anyhow::{Context, Result, bail};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

use freekv_model::kv::{self, KvConfig, KvKind, SpecRecall};

/// KV policy flags. Defaults are chosen for the default model (SmolLM2-135M: 8K context,
/// 30 layers, 3 KV heads, head dim 64); docs/freekv-policies.md explains each.
#[derive(Args, Debug, Clone)]
pub struct KvArgs {
    /// KV policy: full (exact attention over every cached token); quest (page selection with the
    /// current query, everything readable, no recall); arkvale (selection with the current query
    /// and a synchronous recall of the missing pages before attention); freekv (selection with
    /// the previous step's query, recalled off the critical path, corrected for the KV heads
    /// whose query moved). `eval` accepts a comma list.
    #[arg(long, default_value = "full", value_delimiter = ',')]
    pub kv: Vec<String>,
    /// Resident tokens per sparse layer, sink and window included (the paper's B). Default 2048:
    /// the paper's budget, a quarter of the default model's 8K context. `eval` accepts a comma
    /// list.
    #[arg(long, default_value = "2048", value_delimiter = ',')]
    pub budget: Vec<usize>,
    /// Attention-sink tokens at the start of the sequence, always attended (rounded up to whole
    /// pages). Default 16: 2 pages; small, so that a 128-token budget still retrieves 10 pages.
    #[arg(long, default_value_t = kv::DEFAULT_SINK)]
    pub sink: usize,
    /// Recent-window tokens, always attended, the page being written included (rounded up to
    /// whole pages). Default 32: 4 pages of local context; recent pages that matter more are
    /// retrieved by selection.
    #[arg(long, default_value_t = kv::DEFAULT_WINDOW)]
    pub window: usize,
    /// Tokens per KV page. Default 8: small pages make selection precise on the default model
    /// (pages of 16 lost passkeys that pages of 8 found; docs/accuracy.md).
    #[arg(long, default_value_t = kv::DEFAULT_PAGE_SIZE)]
    pub page_size: usize,
    /// freekv correction threshold: a KV head whose mean query cosine (step t vs t-1) is below
    /// tau re-selects with the current query before attention; a number in [-1, 1] or `always`
    /// (= 1: every head, every step, i.e. arkvale). Default 0.8: the paper's long-input value.
    #[arg(long, default_value = "0.8", allow_hyphen_values = true)]
    pub tau: String,
    /// Layers that always use full attention (comma list, or `none`). Default 0: layer 0's
    /// queries change fastest and attend broadly; the paper's accuracy runs keep it dense.
    #[arg(long, default_value = "0")]
    pub dense_layers: String,
    /// How the query heads of a KV group agree on pages: mean-softmax (the paper's MeanS,
    /// default), max-score, mean-score, max-softmax.
    #[arg(long, default_value = "mean-softmax")]
    pub group_policy: String,
    /// Page summaries: arkvale (centre ± mean absolute deviation of the post-RoPE keys; default:
    /// it ranked the passkey page higher on the default model) or minmax (exact element-wise
    /// min/max, an upper bound of every score).
    #[arg(long, default_value = "arkvale")]
    pub summary: String,
    /// Where freekv's speculative recall runs: threads (the executor's worker threads,
    /// overlapping the rest of the step; default) or inline (right after attention).
    #[arg(long, default_value = "threads")]
    pub recall: String,
}

impl KvArgs {
    /// The policy kinds named by `--kv`.
    pub fn kinds(&self) -> Result<Vec<KvKind>> {
        let mut v = Vec::new();
        for k in &self.kv {
            let k: KvKind = k.parse().map_err(|e| anyhow::anyhow!("--kv: {e}"))?;
            if !v.contains(&k) {
                v.push(k);
            }
        }
        if v.is_empty() {
            bail!("--kv: no policy given");
        }
        Ok(v)
    }

    /// The configuration shared by every policy (budget from the first `--budget`).
    pub fn base_config(&self, n_layers: usize) -> Result<KvConfig> {
        let mut c = KvConfig {
            budget: *self.budget.first().context("--budget: no value")?,
            sink: self.sink,
            window: self.window,
            page_size: self.page_size,
            dense_layers: kv::parse_layer_list(&self.dense_layers)?,
            group_policy: self
                .group_policy
                .parse()
                .map_err(|e| anyhow::anyhow!("--group-policy: {e}"))?,
            summary: self
                .summary
                .parse()
                .map_err(|e| anyhow::anyhow!("--summary: {e}"))?,
            spec_recall: self.recall.parse::<SpecRecall>()?,
            ..KvConfig::default()
        };
        c.set_tau(&self.tau)?;
        if self.page_size == 0 {
            bail!("--page-size must be at least 1");
        }
        // Validate every budget now (even for `full`: a bad flag never passes silently).
        for &b in &self.budget {
            KvConfig {
                budget: b,
                ..c.clone()
            }
            .validate(n_layers)?;
        }
        Ok(c)
    }

    /// The single policy configuration of `generate`.
    pub fn single(&self, n_layers: usize) -> Result<KvConfig> {
        let kinds = self.kinds()?;
        if kinds.len() != 1 || self.budget.len() != 1 {
            bail!("generate takes one --kv policy and one --budget (lists are for `eval`)");
        }
        let mut c = self.base_config(n_layers)?;
        c.kind = kinds[0];
        Ok(c)
    }

    /// Every (policy, budget) configuration of `eval`.
    pub fn all(&self, n_layers: usize) -> Result<Vec<KvConfig>> {
        let base = self.base_config(n_layers)?;
        Ok(freekv_model::eval::expand_policies(
            &base,
            &self.kinds()?,
            &self.budget,
        ))
    }
}

/// `freekv eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// JSON-lines cases: {"prompt" or "prompt_ids", "answer", optional "max_new_tokens", "id"};
    /// a case is correct when the greedy generation contains the answer.
    #[arg(long, conflicts_with_all = ["fidelity", "make_passkey"])]
    pub cases: Option<PathBuf>,
    /// Write per-case (and per-policy) results as JSON lines here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Teacher-forced fidelity against full attention over --text: top-1 agreement and mean
    /// KL(full || policy) per position.
    #[arg(long, requires = "text")]
    pub fidelity: bool,
    /// The text for --fidelity.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// --fidelity: tokens of the text prefilled densely before decoding [default: all but
    /// --positions + 1].
    #[arg(long)]
    pub prefix: Option<usize>,
    /// --fidelity: positions decoded and compared after the prefix.
    #[arg(long, default_value_t = 256)]
    pub positions: usize,
    /// --fidelity: repeat the text until it has at least this many tokens (0: as is).
    #[arg(long, default_value_t = 0)]
    pub min_tokens: usize,
    /// Print passkey cases as JSON lines on stdout instead of evaluating.
    #[arg(long)]
    pub make_passkey: bool,
    /// --make-passkey: target prompt length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub length: usize,
    /// --make-passkey: relative depth of the key, 0 (start) to 1 (end); `random` per case.
    #[arg(long, default_value = "random")]
    pub depth: String,
    /// --make-passkey: number of cases.
    #[arg(long, default_value_t = 10)]
    pub n: usize,
    /// --make-passkey: seed of the keys and depths.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// --make-passkey: tokens to generate per case (written into each case).
    #[arg(long, default_value_t = 12)]
    pub case_tokens: usize,
    /// --make-passkey: do not use the model's chat template.
    #[arg(long)]
    pub no_chat: bool,
    #[command(flatten)]
    pub kv: KvArgs,
    #[command(flatten)]
    pub model: crate::ModelArgs,
}

fn write_line(out: &mut Option<std::fs::File>, v: &impl serde::Serialize) -> Result<()> {
    if let Some(f) = out {
        serde_json::to_writer(&mut *f, v)?;
        writeln!(f)?;
        f.flush()?;
    }
    Ok(())
}

/// Run `freekv eval`.
pub fn cmd_eval(a: EvalArgs) -> Result<()> {
    use freekv_model::chat::ChatTemplate;
    use freekv_model::eval;
    use freekv_model::llama::LlamaModel;
    use freekv_model::tokenizer::Tokenizer;

    if !a.make_passkey && !a.fidelity && a.cases.is_none() {
        bail!("eval needs --cases FILE, --fidelity --text FILE, or --make-passkey");
    }
    if a.fidelity && a.positions == 0 {
        bail!("--positions must be at least 1");
    }
    if a.make_passkey && (a.n == 0 || a.length == 0 || a.case_tokens == 0) {
        bail!("--n, --length and --case-tokens must be at least 1");
    }
    if !a.make_passkey {
        // Every policy flag is checked before the model is loaded (dense layers again after).
        a.kv.all(usize::MAX)?;
    }
    // Input files are read before the model is loaded, so that a bad one fails fast.
    let cases_text = match (&a.cases, a.fidelity || a.make_passkey) {
        (Some(path), false) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --cases file {}", path.display()))?,
        ),
        _ => None,
    };
    let fidelity_text = match (&a.text, a.fidelity) {
        (Some(path), true) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --text file {}", path.display()))?;
            if text.trim().is_empty() {
                bail!("--text file {} is empty", path.display());
            }
            Some(text)
        }
        _ => None,
    };
    let cases = match (&cases_text, &a.cases) {
        (Some(text), Some(path)) => Some(
            eval::parse_cases(text)
                .with_context(|| format!("in --cases file {}", path.display()))?,
        ),
        _ => None,
    };
    let gguf = crate::open_model(&a.model, true)?;
    let tok = Tokenizer::from_gguf(&gguf)?;
    if a.make_passkey {
        let depth = if a.depth.eq_ignore_ascii_case("random") {
            None
        } else {
            Some(
                a.depth
                    .parse::<f64>()
                    .ok()
                    .filter(|d| (0.0..=1.0).contains(d))
                    .with_context(|| {
                        format!(
                            "--depth must be a number in [0, 1] or `random` (got {})",
                            a.depth
                        )
                    })?,
            )
        };
        let tpl = if a.no_chat {
            None
        } else {
            ChatTemplate::from_gguf(&gguf)?
        };
        let spec = eval::PasskeySpec {
            length: a.length,
            depth,
            n: a.n,
            seed: a.seed,
            max_new_tokens: a.case_tokens,
        };
        let cases = eval::make_passkey_cases(&tok, tpl.as_ref(), &spec)?;
        let mut stdout = std::io::stdout().lock();
        for c in cases {
            writeln!(stdout, "{}", c.to_json_line())?;
        }
        return Ok(());
    }
    let model = LlamaModel::new(gguf.clone())?;
    let n_layers = model.config().n_layers;
    let policies = a.kv.all(n_layers)?;
    let mut out = match &a.out {
        Some(p) => Some(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create --out file {}", p.display()))?,
        ),
        None => None,
    };
    for p in &policies {
        eprintln!(
            "freekv eval: policy {}: {}",
            eval::policy_label(p),
            p.describe()
        );
    }
    if a.fidelity {
        let text = fidelity_text.context("--fidelity needs --text FILE")?;
        let mut ids = tok.encode_prompt(&text)?;
        let unit = tok.encode(&text, false)?;
        while a.min_tokens > 0 && ids.len() < a.min_tokens && !unit.is_empty() {
            ids.extend_from_slice(&unit);
        }
        let ctx = model.config().context_length;
        let prefix = match a.prefix {
            Some(p) => p,
            None => ids.len().min(ctx).saturating_sub(a.positions + 1),
        };
        let end = (prefix + a.positions + 1).min(ids.len());
        if end > ctx {
            bail!(
                "--prefix {prefix} + --positions {} exceed the model's context of {ctx} tokens",
                a.positions
            );
        }
        eprintln!(
            "freekv eval: fidelity over {} tokens: prefix {prefix}, {} positions",
            end,
            end.saturating_sub(prefix + 1)
        );
        let res = eval::fidelity(&model, &ids[..end], prefix, &policies, &mut |f| {
            eprintln!(
                "freekv eval: {:<16} top-1 agreement {:.4}  mean KL {:.5} (max {:.3})  NLL {:.4} (full {:.4})  [{:.1}s]",
                f.policy, f.top1_agreement, f.mean_kl, f.max_kl, f.nll, f.nll_full, f.decode_s
            );
            write_line(&mut out, f).map_err(|e| freekv_model::ModelError::Config(e.to_string()))
        })?;
        let summary = serde_json::json!({ "fidelity": res });
        println!("{summary}");
        return Ok(());
    }
    let cases = cases.context("--cases FILE")?;
    let results = eval::run_cases(&model, &tok, &cases, &policies, &mut |r| {
        eprintln!(
            "freekv eval: case {} {:<16} {} ({} tokens, answer {}, got {:?}) [prefill {:.1}s, decode {:.1}s]",
            r.id,
            r.policy,
            if r.correct { "correct" } else { "WRONG  " },
            r.prompt_tokens,
            r.answer,
            r.text.trim(),
            r.prefill_s,
            r.decode_s
        );
        write_line(&mut out, r).map_err(|e| freekv_model::ModelError::Config(e.to_string()))
    })?;
    let acc = eval::accuracy(&results);
    let mut rows = Vec::new();
    for (label, ok, n) in &acc {
        println!("{label:<20} {ok}/{n} = {:.3}", *ok as f64 / *n as f64);
        rows.push(serde_json::json!({"policy": label, "correct": ok, "total": n}));
    }
    write_line(&mut out, &serde_json::json!({ "accuracy": rows }))?;
    Ok(())
}
