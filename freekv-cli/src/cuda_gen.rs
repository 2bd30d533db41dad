//! `--device auto|cpu|cuda` for `generate`: picking the device, and generation on the CUDA
//! decoder (GGUF models and `synthetic:NAME` models).

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result, bail};
use freekv_model::cuda::{CudaLlama, Gpu, GpuKvOptions};
use freekv_model::generate::GenerateOptions;
use freekv_model::tokenizer::{StreamDecoder, Tokenizer};

/// The GPU to use, or `None` for the CPU. `cuda`: the GPU or an error naming what is missing;
/// `auto`: the GPU when one is usable, else the CPU with one line on stderr; `cpu`: the CPU.
/// `cpu_only` names a reason the run needs the CPU (e.g. a KV policy the CUDA decoder lacks).
pub fn select(cuda: bool, auto: bool, cpu_only: Option<&str>) -> Result<Option<Arc<Gpu>>> {
    if !cuda && !auto {
        return Ok(None);
    }
    if let Some(why) = cpu_only {
        if cuda {
            bail!("--device cuda: {why} runs on the CPU only for now; use --device cpu");
        }
        // A light probe (no kernel compilation): only the message depends on it.
        if freekv_model::cuda::cuda_available() {
            eprintln!("freekv: {why} runs on the CPU only for now; using the CPU");
        } else {
            eprintln!("freekv: no CUDA device; using the CPU");
        }
        return Ok(None);
    }
    match freekv_model::cuda::gpu() {
        Ok(g) => Ok(Some(g)),
        Err(e) if e.is_unavailable() && auto => {
            eprintln!("freekv: no CUDA device ({e}); using the CPU");
            Ok(None)
        }
        Err(e) => Err(e).context("--device cuda: the CUDA backend is unavailable"),
    }
}

/// What `generate` prints, shared by both model kinds.
pub struct Output<'a> {
    pub json: bool,
    pub tokenizer: Option<&'a Tokenizer>,
}

/// Runs a generation on `model` and prints it like the CPU path (streamed text, or one JSON
/// object with `--json`), then the timing line on stderr. Returns whether it was cancelled.
pub fn run(
    model: &CudaLlama,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    kv: Option<GpuKvOptions>,
    cancel: &AtomicBool,
    out: Output<'_>,
) -> Result<bool> {
    let policy = kv.as_ref().map_or("full", |k| k.policy_name());
    let describe = kv.as_ref().map(|k| {
        format!(
            "{} (GPU {} recall)",
            k.kv.describe().replacen("quest", "oracle", 1),
            k.recall.name()
        )
    });
    let mut stream = StreamDecoder::new();
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let synthetic = model.source().is_synthetic();
    let (result, stats) =
        model.generate_with_kv(out.tokenizer, prompt_ids, opts, kv, cancel, &mut |id| {
            if out.json || write_err.is_some() {
                return;
            }
            let piece = match out.tokenizer {
                Some(tok) if !synthetic => match stream.push(tok, id) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("cannot decode token {id}: {e}");
                        return;
                    }
                },
                _ => format!("{id} "),
            };
            if let Err(e) = stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
            {
                write_err = Some(e);
            }
        })?;
    if let Some(e) = write_err {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("cannot write to standard output");
        }
        return Ok(result.cancelled());
    }
    let t = &result.timings;
    if out.json {
        let obj = serde_json::json!({
            "prompt_ids": result.prompt_ids,
            "generated_ids": result.generated_ids,
            "text": result.text,
            "top_logprobs": result.top_logprobs,
            "stop": result.stop.as_str(),
            "timings": t,
            "kv_policy": policy,
            "kv_config": describe,
            "kv_stats": stats.as_ref().map(|s| s.to_json()),
            "device": "cuda",
            "model": model.source().label(),
            "synthetic": synthetic,
        });
        writeln!(stdout, "{obj}")?;
    } else {
        if out.tokenizer.is_some() && !synthetic {
            write!(stdout, "{}", stream.finish())?;
        }
        writeln!(stdout)?;
    }
    drop(stdout);
    if let (Some(d), Some(st)) = (&describe, &stats) {
        eprintln!(
            "freekv: KV {d}: {} sparse (layer, sequence) steps, {} first, KV heads corrected {}/{} ({:.1}%)",
            st.sparse_seq_layer_steps,
            st.first_sparse,
            st.heads_flagged,
            st.heads_checked,
            100.0 * st.head_correction_rate()
        );
    }
    eprintln!(
        "freekv: {} on {}: prompt {} tokens, prefill {:.1} tok/s ({:.2} s); decode {} tokens, {:.1} tok/s; stop: {}",
        model.source().label(),
        model.gpu().info().name,
        t.prompt_tokens,
        t.prefill_tok_s,
        t.prefill_s,
        t.decode_tokens,
        t.decode_tok_s,
        result.stop.as_str()
    );
    Ok(result.cancelled())
}

/// The GPU KV flags of `generate`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuKvArgs {
    /// freekv's spare slots per KV head (`None`: the default).
    pub spare_pages: Option<usize>,
    /// SMs the step's products leave to freekv's speculative recall (0: none).
    pub reserve_sms: usize,
    /// Upper bound on the pinned host pool, GiB.
    pub max_host_kv_gib: Option<f64>,
}

/// The GPU KV options of a run: `None` for `full` (everything on the device), otherwise the
/// policy (`quest` runs as `oracle`) with the recall mode, freekv's spare slots and reserved
/// SMs, and the host pool bound.
pub fn kv_options(
    kv: freekv_model::kv::KvConfig,
    recall: freekv_model::cuda::GpuRecall,
    args: GpuKvArgs,
) -> Result<Option<GpuKvOptions>> {
    if kv.kind == freekv_model::kv::KvKind::Full {
        return Ok(None);
    }
    if args.reserve_sms > 0 && kv.kind != freekv_model::kv::KvKind::FreeKv {
        bail!(
            "--reserve-sms applies to --kv freekv (its speculative recall), not to {}",
            kv.kind
        );
    }
    let mut o = GpuKvOptions::new(kv);
    o.recall = recall;
    o.reserve_sms = args.reserve_sms;
    if args.spare_pages.is_some() {
        o.spare_pages = args.spare_pages;
    }
    if let Some(g) = args.max_host_kv_gib {
        if !(g.is_finite() && g > 0.0) {
            bail!("--max-host-kv-gib must be a positive number of GiB, got {g}");
        }
        o.host_max_bytes = Some((g * (1u64 << 30) as f64) as usize);
    }
    Ok(Some(o))
}

/// Generation options of `generate` on the CUDA decoder (greedy unless a temperature is given;
/// no top log-probabilities: logits stay on the device).
pub fn options(
    max_new_tokens: usize,
    sampling: freekv_model::sampling::SamplingParams,
) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling,
        stop_at_eog: true,
        top_logprobs: 0,
    }
}

/// A cancel flag raised by Ctrl-C (a second Ctrl-C exits at once).
pub fn cancel_flag() -> &'static AtomicBool {
    use std::sync::atomic::Ordering;
    static CANCEL: AtomicBool = AtomicBool::new(false);
    let _ = ctrlc::set_handler(|| {
        if CANCEL.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });
    &CANCEL
}

#[cfg(test)]
mod tests {
    use super::*;
    use freekv_model::cuda::GpuRecall;
    use freekv_model::kv::{KvConfig, KvKind};

    fn kv(kind: KvKind) -> KvConfig {
        KvConfig {
            kind,
            ..KvConfig::default()
        }
    }

    #[test]
    fn gpu_kv_flags_reach_the_options() {
        let args = GpuKvArgs {
            spare_pages: Some(3),
            reserve_sms: 8,
            max_host_kv_gib: Some(0.5),
        };
        let o = kv_options(kv(KvKind::FreeKv), GpuRecall::Gather, args)
            .unwrap()
            .unwrap();
        assert_eq!(
            (o.spare_pages, o.reserve_sms, o.host_max_bytes),
            (Some(3), 8, Some(1 << 29))
        );
        // The defaults leave the library's defaults alone; full needs no GPU KV options.
        let d = kv_options(kv(KvKind::FreeKv), GpuRecall::Gather, GpuKvArgs::default())
            .unwrap()
            .unwrap();
        let lib = GpuKvOptions::new(kv(KvKind::FreeKv));
        assert_eq!((d.spare_pages, d.reserve_sms), (lib.spare_pages, 0));
        assert!(
            kv_options(kv(KvKind::Full), GpuRecall::Gather, args)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_gpu_kv_flags_are_refused() {
        let reserve = GpuKvArgs {
            reserve_sms: 4,
            ..GpuKvArgs::default()
        };
        let e = kv_options(kv(KvKind::ArkVale), GpuRecall::Gather, reserve)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--reserve-sms") && e.contains("arkvale"), "{e}");
        for g in [0.0, -1.0, f64::NAN] {
            let a = GpuKvArgs {
                max_host_kv_gib: Some(g),
                ..GpuKvArgs::default()
            };
            let e = kv_options(kv(KvKind::FreeKv), GpuRecall::Gather, a)
                .unwrap_err()
                .to_string();
            assert!(e.contains("--max-host-kv-gib"), "{e}");
        }
    }
}
