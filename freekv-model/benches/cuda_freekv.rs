//! FreeKV on the GPU, end to end: decode step time of `full`, `oracle`, `arkvale` and `freekv`
//! (gather and streamed recall) on a synthetic model (seeded random bf16 weights — results are
//! labelled synthetic), in the two scenarios of the paper:
//!
//! * long input: a `prompt`-token context, then `gen` decode steps (default 32768 + 512);
//! * long generation: a 1024-token context, then `gen` decode steps (default 2048: a 16K
//!   generation does not fit the GPU time of one benchmark run at three batch sizes and five
//!   policies; the step time is reported per quarter of the generation so its growth is
//!   visible).
//!
//! Contexts are set up by filling the KV (device pages for `full`, the pinned host history and
//! the resident slots for the sparse policies, with their summaries) with random values instead
//! of a prefill; every step then runs the real decode path: append, offload when a page fills,
//! correction, selection, recall, attention. One step = upload of the step's metadata, the
//! decode forward (a CUDA graph replay where the policy allows it), argmax on the device and
//! the read-back of the token ids.
//!
//! The tokens fed to each step are a seeded pseudo-random stream (the argmax is still computed
//! and read back every step, so the step costs the same): a model with a persistent residual
//! component would otherwise repeat one token, which real text does not.
//!
//! Environment: `FREEKV_BENCH_MODEL` (default `llama-3.1-8b`; a comma-separated list runs each
//! model in turn, e.g. a sweep `llama-3.1-8b,llama-3.1-8b+persistent=0.9` of the query coherence
//! of [`freekv_model::cuda::SyntheticSpec`]), `FREEKV_BENCH_SCENARIOS`
//! (`name:context:gen[:model],…`; a scenario naming a model runs on that model only; default
//! [`DEFAULT_SCENARIOS`]: long input (32768 + 512) and long generation (1024 + 2048) on plain
//! random weights and on the coherent models calibrated to the published correction rates),
//! `FREEKV_BENCH_BATCHES` (default `1,4,16`), `FREEKV_BENCH_POLICIES` (default
//! `full,oracle,arkvale,freekv,freekv-spec,freekv-streamed`; `freekv-spec` is `freekv` with
//! τ = −1, i.e. no correction: the speculation-only ablation), `FREEKV_BENCH_RUN_SECONDS`
//! (stop measuring a configuration after this many seconds of steps, default 15; the steps
//! measured are reported, with the median of every whole window of `FREEKV_BENCH_WINDOW_STEPS`
//! steps (default 256) in `ms_windows`, so that a configuration stopped early still compares
//! at equal positions), `FREEKV_BENCH_BUDGET` / `_SINK` / `_WINDOW` /
//! `_PAGE` (tokens; default 2048 / 512 / 512 / 32, the paper's), `FREEKV_BENCH_TAU` (default
//! 0.8 for long input and 0.9 for long generation, the paper's), `FREEKV_BENCH_MAX_SECONDS`
//! (skip what would start after this budget), `FREEKV_BENCH_JSON` (write the results there),
//! `FREEKV_BENCH_PROFILE_STEPS` (profile that many steps after the warm-up of each
//! configuration under `ncu --profile-from-start off`), `FREEKV_BENCH_WINDOW_COUNTERS=1`
//! (also the recalled and corrective MiB per step and the correction rate of every window:
//! `recall_mib_windows`, `corrective_mib_windows`, `correction_rate_windows`).
//! A policy `freekv@T` is `freekv` with τ = T (a sweep maps the correction rate to the step
//! time); modifiers `~serial` (the corrective path not overlapping the unflagged heads'
//! attention), `~cbN` (blocks of the corrective gather) and `~gbN` (blocks of the speculative
//! gather) give the ablations, e.g. `freekv@0.9~serial~cb8` is the session-5 path; `~rsN` sets
//! the SMs the decode products leave to the speculative branch (`GpuKvOptions::reserve_sms`),
//! `~overlap` the corrective path beside the unflagged heads' attention, `~spN` the spare slots,
//! `~pf` the prefetch into them, `~specall` the speculative selection of the flagged heads too
//! (`GpuKvOptions::speculate_corrected`, the behaviour before session 13).
//! A scenario whose name starts with `prefill` runs the real prefill of `context` random token
//! ids per sequence (timed; sparse policies stream it to the host layer by layer)
//! instead of filling the context with random KV.
//! Prints "skipped: no CUDA device" and exits 0 without a GPU.

use std::sync::Arc;
use std::time::Instant;

use freekv_kernels::Gpu;
use freekv_model::cuda::{BatchOptions, CudaBatch, CudaLlama, GpuKvOptions, GpuRecall};
use freekv_model::kv::{KvConfig, KvKind};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[path = "support/cuda_freekv_args.rs"]
mod args;
use args::{
    Counters, DEFAULT_SCENARIOS, Scenario, compared_ms, counter_windows, parse_policy,
    parse_scenarios, percentile, window_medians,
};

/// The cumulative recall counters and correction statistics of `b` (zeros for `full`). Joins
/// the pending recalls and synchronises.
fn read_counters(model: &CudaLlama, b: &mut CudaBatch) -> Result<Counters, String> {
    let recall = model.kv_recall_totals(b).map_err(|e| e.to_string())?;
    let corrective = model.kv_corrective_totals(b).map_err(|e| e.to_string())?;
    let (checked, flagged) = b
        .kv_stats()
        .map_err(|e| e.to_string())?
        .map_or((0, 0), |s| (s.heads_checked, s.heads_flagged));
    Ok(Counters {
        recall_bytes: recall.map_or(0, |r| r.1),
        corrective_bytes: corrective.map_or(0, |r| r.1),
        heads_checked: checked,
        heads_flagged: flagged,
    })
}

fn kv_options(policy: &str, scenario: &Scenario) -> Result<Option<GpuKvOptions>, String> {
    // `freekv@T`: freekv with τ = T (a sweep of T maps the correction rate to the step time);
    // `~serial`, `~cbN`, `~gbN`: the ablations of the corrective path (see `parse_policy`).
    let spec = parse_policy(policy)?;
    let policy = spec.base.as_str();
    let tau_given = spec.tau.clone();
    let (kind, recall) = match policy {
        "full" => return Ok(None),
        "oracle" => (KvKind::Quest, GpuRecall::Gather),
        "arkvale" => (KvKind::ArkVale, GpuRecall::Gather),
        "freekv" => (KvKind::FreeKv, GpuRecall::Gather),
        "freekv-streamed" => (KvKind::FreeKv, GpuRecall::Streamed),
        "freekv-spec" => (KvKind::FreeKv, GpuRecall::Gather),
        other => {
            return Err(format!(
                "unknown policy {other:?} (full, oracle, arkvale, freekv, freekv-streamed, freekv-spec, freekv@T)"
            ));
        }
    };
    let mut kv = KvConfig {
        kind,
        budget: env_usize("FREEKV_BENCH_BUDGET", 2048),
        sink: env_usize("FREEKV_BENCH_SINK", 512),
        window: env_usize("FREEKV_BENCH_WINDOW", 512),
        page_size: env_usize("FREEKV_BENCH_PAGE", 32),
        dense_layers: Vec::new(),
        ..KvConfig::default()
    };
    let tau = std::env::var("FREEKV_BENCH_TAU").unwrap_or_else(|_| {
        if scenario.name.contains("generation") {
            "0.9".into()
        } else {
            "0.8".into()
        }
    });
    // `freekv-spec`: speculation only (τ = −1 never flags a finite cosine), the ablation that
    // shows the step without corrections (random weights make adjacent queries unrelated, so
    // `freekv` corrects nearly every head on synthetic models).
    let tau = if policy == "freekv-spec" {
        "-1".into()
    } else {
        tau_given.unwrap_or(tau)
    };
    kv.set_tau(&tau).map_err(|e| format!("τ {tau:?}: {e}"))?;
    let mut o = GpuKvOptions::new(kv);
    o.recall = recall;
    o.max_prompt = Some(scenario.context);
    if let Some(on) = spec.overlap {
        o.overlap_correction = on;
    }
    if let Some(n) = spec.correction_blocks {
        o.correction_gather_blocks = n;
    }
    if let Some(n) = spec.spare_pages {
        o.spare_pages = Some(n);
    }
    o.spare_prefetch = spec.spare_prefetch;
    o.speculate_corrected = spec.speculate_corrected;
    if let Some(n) = spec.reserve_sms {
        o.reserve_sms = n;
    }
    if let Some(n) = spec.gather_blocks {
        o.gather_blocks = n;
    }
    Ok(Some(o))
}

#[allow(clippy::too_many_lines)]
fn main() {
    let gpu = match freekv_kernels::testing::gpu() {
        Some(g) => g,
        None => return,
    };
    let model_names: Vec<String> = env_or("FREEKV_BENCH_MODEL", "llama-3.1-8b")
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let scenarios = match parse_scenarios(&env_or("FREEKV_BENCH_SCENARIOS", DEFAULT_SCENARIOS)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("FREEKV_BENCH_SCENARIOS: {e}");
            std::process::exit(2);
        }
    };
    // Every model once, in order: the `FREEKV_BENCH_MODEL` list, then the scenarios' own.
    let mut run_models: Vec<String> = model_names.clone();
    for m in scenarios.iter().filter_map(|s| s.model.as_ref()) {
        if !run_models.contains(m) {
            run_models.push(m.clone());
        }
    }
    let batches: Vec<usize> = env_or("FREEKV_BENCH_BATCHES", "1,4,16")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let policies: Vec<String> = env_or(
        "FREEKV_BENCH_POLICIES",
        "full,oracle,arkvale,freekv,freekv-spec,freekv-streamed",
    )
    .split(',')
    .map(|s| s.trim().to_string())
    .filter(|s| !s.is_empty())
    .collect();
    let max_s = std::env::var("FREEKV_BENCH_MAX_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok());
    let t_start = Instant::now();
    let json_path = std::env::var("FREEKV_BENCH_JSON").ok();
    let labels: Vec<String> = run_models
        .iter()
        .map(|m| format!("synthetic:{m}"))
        .collect();
    // The side file is rewritten after every configuration, so a run stopped by a time limit
    // keeps what it measured.
    let write_json = |rows: &[serde_json::Value]| {
        if let Some(path) = &json_path {
            let json = serde_json::json!({
                "bench": "cuda_freekv",
                "model": labels.join(", "),
                "synthetic": true,
                "device": gpu.info().name,
                "rows": rows,
            });
            let text = serde_json::to_string_pretty(&json).unwrap_or_default();
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("cannot write {path}: {e}");
            }
        }
    };
    let mut rows = Vec::new();
    for model_name in &run_models {
        let of_model: Vec<&Scenario> = scenarios
            .iter()
            .filter(|s| match &s.model {
                Some(m) => m == model_name,
                None => model_names.contains(model_name),
            })
            .collect();
        if of_model.is_empty() {
            continue;
        }
        let model = match CudaLlama::synthetic(Arc::clone(&gpu), model_name, 1) {
            Ok(m) => m,
            Err(e) => {
                println!("{model_name}: failed: {e}");
                rows.push(serde_json::json!({"model": model_name, "error": e.to_string()}));
                continue;
            }
        };
        println!(
            "model: {} — {} — all figures synthetic (random weights)",
            model.source().label(),
            gpu.info().name,
        );
        for &sc in &of_model {
            for &bs in &batches {
                for policy in &policies {
                    if let Some(m) = max_s
                        && t_start.elapsed().as_secs_f64() > m
                    {
                        println!(
                            "{} bs {bs} {policy}: skipped (time budget {m} s spent)",
                            sc.name
                        );
                        rows.push(serde_json::json!({
                            "model": model_name, "scenario": sc.name, "batch": bs, "policy": policy,
                            "skipped": "time budget",
                        }));
                        continue;
                    }
                    write_json(&rows);
                    match run_one(&gpu, &model, sc, bs, policy) {
                        Ok(mut r) => {
                            r["model"] = model_name.as_str().into();
                            println!(
                                "{model_name} {} bs {bs} {policy}: {:.3} ms/step median over {} steps ({:.1} tok/s), quarters {}, GPU {:.2} GiB, host KV {:.2} GiB, recall {:.2} MiB/step, prefill {} tok/s (again {}), stats {}",
                                sc.name,
                                r["ms_median"].as_f64().unwrap_or(f64::NAN),
                                r["steps_measured"],
                                r["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                                r["ms_quarters"],
                                r["gpu_used_gib"].as_f64().unwrap_or(f64::NAN),
                                r["host_kv_gib"].as_f64().unwrap_or(f64::NAN),
                                r["recall_mib_per_step"].as_f64().unwrap_or(0.0),
                                r["prefill_tok_s"]
                                    .as_f64()
                                    .map_or("-".into(), |t| format!("{t:.0}")),
                                r["prefill_warm_tok_s"]
                                    .as_f64()
                                    .map_or("-".into(), |t| format!("{t:.0}")),
                                r["stats"],
                            );
                            rows.push(r);
                        }
                        Err(e) => {
                            println!("{} bs {bs} {policy}: failed: {e}", sc.name);
                            rows.push(serde_json::json!({
                                "model": model_name, "scenario": sc.name, "batch": bs,
                                "policy": policy, "error": e,
                            }));
                        }
                    }
                }
            }
        }
    }
    // Ratios against oracle and arkvale, per (scenario, batch).
    println!();
    println!(
        "| model | scenario | batch | policy | ms/step | tok/s | × oracle | speedup vs arkvale | recall MiB/step | corrective MiB/step | units/head/step | GPU GiB | host GiB | correction |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let find = |m: &str, sc: &str, bs: u64, p: &str| -> Option<&serde_json::Value> {
        rows.iter().find(|r| {
            r["model"] == m
                && r["scenario"] == sc
                && r["batch"] == bs
                && r["policy"] == p
                && r["ms_median"].is_f64()
        })
    };
    for r in &rows {
        let (Some(ms), Some(m), Some(sc), Some(bs), Some(p)) = (
            r["ms_median"].as_f64(),
            r["model"].as_str(),
            r["scenario"].as_str(),
            r["batch"].as_u64(),
            r["policy"].as_str(),
        ) else {
            continue;
        };
        let vs_oracle = find(m, sc, bs, "oracle")
            .and_then(|o| compared_ms(r, o))
            .map_or("".into(), |(x, o)| format!("{:.2}", x / o));
        let vs_ark = find(m, sc, bs, "arkvale")
            .and_then(|a| compared_ms(r, a))
            .map_or("".into(), |(x, a)| format!("{:.1}×", a / x));
        println!(
            "| {m} | {sc} | {bs} | {p} | {ms:.3} | {:.1} | {vs_oracle} | {vs_ark} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            r["tokens_per_s"].as_f64().unwrap_or(0.0),
            r["recall_mib_per_step"].as_f64().unwrap_or(0.0),
            r["corrective_mib_per_step"].as_f64().unwrap_or(0.0),
            r["recall_units_per_head_step"].as_f64().unwrap_or(0.0),
            r["gpu_used_gib"].as_f64().unwrap_or(0.0),
            r["host_kv_gib"].as_f64().unwrap_or(0.0),
            match (
                r["stats"]["heads_checked"].as_u64(),
                r["stats"]["head_correction_rate"].as_f64()
            ) {
                (Some(n), Some(c)) if n > 0 => format!("{:.1}%", 100.0 * c),
                _ => String::new(),
            },
        );
    }
    println!(
        "(× oracle and vs arkvale compare the last window of {} steps both measured: equal positions, the longest context both reached; medians when there is no common window)",
        env_usize("FREEKV_BENCH_WINDOW_STEPS", 256)
    );
    write_json(&rows);
}

fn run_one(
    gpu: &Arc<Gpu>,
    model: &CudaLlama,
    sc: &Scenario,
    bs: usize,
    policy: &str,
) -> Result<serde_json::Value, String> {
    let kvo = kv_options(policy, sc)?;
    let page = kvo.as_ref().map_or(32, |k| k.kv.page_size);
    let opts = BatchOptions {
        max_seqs: bs,
        max_seq_len: sc.context + sc.generate + 8,
        page_size: page,
        prefill_chunk: 256,
        use_graph: true,
    };
    let ctx = gpu.ctx();
    let t_setup = Instant::now();
    let mut b = match kvo {
        Some(k) => model.new_batch_with_kv(opts, k),
        None => model.new_batch(opts),
    }
    .map_err(|e| e.to_string())?;
    let (free_alloc, _) = ctx.mem_get_info().map_err(|e| e.to_string())?;
    // `prefill*` scenarios run the real prefill of random token ids (sparse policies: layer by
    // layer, streamed to the host); the others fill the context with random KV.
    let mut prefill_s = None;
    let mut prefill_warm_s = None;
    if sc.name.starts_with("prefill") {
        let vocab = model.config().vocab_size as u32;
        // Seconds of one prefill of `ids` into `seq`, synchronised.
        let timed_prefill = |b: &mut _, seq: usize, ids: &[u32]| -> Result<f64, String> {
            let t0 = Instant::now();
            model.prefill(b, seq, ids).map_err(|e| e.to_string())?;
            gpu.synchronize().map_err(|e| e.to_string())?;
            Ok(t0.elapsed().as_secs_f64())
        };
        for seq in 0..bs {
            let ids: Vec<u32> = (0..sc.context)
                .map(|i| 1 + ((i as u64 * 7919 + seq as u64 * 104_729) % (vocab as u64 - 1)) as u32)
                .collect();
            *prefill_s.get_or_insert(0.0) += timed_prefill(&mut b, seq, &ids)?;
            // Again from empty: the host pool keeps its pinned pages (the first prefill of a
            // sparse policy also pins the host memory of the history). Up to 64K tokens: a
            // 128K prefill takes a minute.
            if sc.context > 65536 {
                continue;
            }
            b.truncate(seq, 0).map_err(|e| e.to_string())?;
            *prefill_warm_s.get_or_insert(0.0) += timed_prefill(&mut b, seq, &ids)?;
        }
    } else {
        model
            .fill_random_context(&mut b, &vec![sc.context; bs], 7)
            .map_err(|e| e.to_string())?;
    }
    let setup_s = t_setup.elapsed().as_secs_f64();
    let (free, total) = ctx.mem_get_info().map_err(|e| e.to_string())?;
    let mut tokens = vec![1u32; bs];
    let vocab = model.config().vocab_size as u64;
    let warm = 8;
    let cap_s = std::env::var("FREEKV_BENCH_RUN_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(15.0);
    // `FREEKV_BENCH_PROFILE_STEPS=N`: the N steps after the warm-up run between
    // cuProfilerStart and cuProfilerStop, so that `ncu --profile-from-start off` sees the decode
    // steps only (not the weight init or the context fill).
    let profile_steps = env_usize("FREEKV_BENCH_PROFILE_STEPS", 0);
    let window_steps = env_usize("FREEKV_BENCH_WINDOW_STEPS", 256);
    // `FREEKV_BENCH_WINDOW_COUNTERS=1`: the recall volumes and the correction rate of every
    // window, read between two steps (each read joins the pending recalls and synchronises:
    // one step per window starts without its speculative recall in flight).
    let window_counters =
        std::env::var("FREEKV_BENCH_WINDOW_COUNTERS").is_ok_and(|v| v == "1") && window_steps > 0;
    let mut counters_base = Counters::default();
    let mut counters_ends = Vec::new();
    let t_run = Instant::now();
    let mut times = Vec::with_capacity(sc.generate);
    for step in 0..sc.generate + warm {
        if step > warm && t_run.elapsed().as_secs_f64() > cap_s {
            break;
        }
        if window_counters && step == warm {
            counters_base = read_counters(model, &mut b)?;
        }
        if profile_steps > 0 && step == warm {
            gpu.synchronize().map_err(|e| e.to_string())?;
            cudarc::driver::profiler_start().map_err(|e| format!("cuProfilerStart: {e}"))?;
        }
        if profile_steps > 0 && step == warm + profile_steps {
            gpu.synchronize().map_err(|e| e.to_string())?;
            cudarc::driver::profiler_stop().map_err(|e| format!("cuProfilerStop: {e}"))?;
        }
        let t0 = Instant::now();
        model
            .decode_step(&mut b, &tokens)
            .map_err(|e| e.to_string())?;
        let _greedy = model.argmax(&mut b).map_err(|e| e.to_string())?;
        // A seeded pseudo-random stream of distinct-looking tokens (see the module comment).
        for (i, t) in tokens.iter_mut().enumerate() {
            let h = (step as u64 * 0x9E37_79B9 + i as u64 * 0x85EB_CA6B)
                .wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
            *t = 1 + ((h >> 17) % (vocab - 1)) as u32;
        }
        if step >= warm {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            if window_counters && times.len() % window_steps == 0 {
                counters_ends.push(read_counters(model, &mut b)?);
            }
        }
    }
    let (free_end, _) = ctx.mem_get_info().map_err(|e| e.to_string())?;
    let (recall_windows, corrective_windows, rate_windows) =
        counter_windows(counters_base, &counters_ends, window_steps);
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let q = times.len() / 4;
    let quarters: Vec<f64> = (0..4)
        .map(|i| {
            let part = &times[i * q..((i + 1) * q).min(times.len())];
            (percentile(part, 0.5) * 1000.0).round() / 1000.0
        })
        .collect();
    let stats = b
        .kv_stats()
        .map_err(|e| e.to_string())?
        .map(|s| s.to_json());
    let recall = model.kv_recall_totals(&mut b).map_err(|e| e.to_string())?;
    let corrective = model
        .kv_corrective_totals(&mut b)
        .map_err(|e| e.to_string())?;
    let steps = (times.len() + warm) as f64;
    Ok(serde_json::json!({
        "scenario": sc.name,
        "context": sc.context,
        "gen": sc.generate,
        "batch": bs,
        "policy": policy,
        "ms_median": percentile(&times, 0.5),
        "ms_p90": percentile(&times, 0.9),
        "ms_mean": mean,
        "ms_quarters": quarters,
        "window_steps": window_steps,
        "ms_windows": window_medians(&times, window_steps),
        // With FREEKV_BENCH_WINDOW_COUNTERS=1 (else empty): per window, recalled and corrective
        // MiB per step and the share of checked KV heads flagged.
        "recall_mib_windows": recall_windows,
        "corrective_mib_windows": corrective_windows,
        "correction_rate_windows": rate_windows,
        "steps_measured": times.len(),
        "tokens_per_s": bs as f64 * 1e3 / mean,
        "graph": b.has_graph(),
        // The compute stream above the side streams (FREEKV_STREAM_PRIORITY).
        "stream_priority": gpu.prioritized(),
        "gpu_used_gib": (total - free) as f64 / (1u64 << 30) as f64,
        "gpu_used_end_gib": (total - free_end) as f64 / (1u64 << 30) as f64,
        "gpu_sparse_state_gib": b.sparse_device_bytes() as f64 / (1u64 << 30) as f64,
        "gpu_kv_pool_gib": b.kv_bytes() as f64 / (1u64 << 30) as f64,
        "host_kv_gib": b.host_kv_bytes() as f64 / (1u64 << 30) as f64,
        "setup_s": setup_s,
        "gpu_used_after_alloc_gib": (total - free_alloc) as f64 / (1u64 << 30) as f64,
        "prefill_s": prefill_s,
        "prefill_tok_s": prefill_s.map(|t| (bs * sc.context) as f64 / t),
        "prefill_warm_s": prefill_warm_s,
        "prefill_warm_tok_s": prefill_warm_s.map(|t| (bs * sc.context) as f64 / t),
        "stats": stats,
        "recall_units": recall.map(|r| r.0),
        "recall_mib_per_step": recall.map(|r| r.1 as f64 / steps / (1u64 << 20) as f64),
        // Of that, what the corrective recalls moved on the critical path.
        "corrective_mib_per_step": corrective.map(|r| r.1 as f64 / steps / (1u64 << 20) as f64),
        // Units (one page of one KV head) recalled per KV head, layer and step: how much of a
        // selection changes per step.
        "recall_units_per_head_step": recall.map(|r| {
            let c = model.config();
            r.0 as f64 / steps / (bs * c.n_kv_heads * c.n_layers) as f64
        }),
        "synthetic": true,
    }))
}
