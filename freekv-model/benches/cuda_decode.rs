//! End-to-end decode step time of the CUDA decoder on synthetic models (seeded random bf16
//! weights; results are labelled synthetic), full KV on the GPU, against the HBM floor:
//! (weight bytes + KV bytes read) ÷ the device-copy bandwidth measured in the same run.
//!
//! One step = upload of the step's token ids and positions, the decode forward (a CUDA graph
//! replay), argmax on the device and the read-back of the token ids: what generation pays per
//! token. Long contexts are set up by filling the KV pages with random values (a step reads the
//! same bytes whatever they hold) instead of a minutes-long prefill.
//!
//! Configurations: `FREEKV_BENCH_CONFIGS="model:batch:context,..."` (default: synthetic
//! llama-3.1-8b at batch 1, 8, 32 × context 4096, 32768, plus qwen-2.5-7b 1×4096 and the
//! default model's shape smollm2-135m 1×512). A summary table is printed at the end and, with
//! `FREEKV_BENCH_JSON=path`, written as JSON. Prints "skipped: no CUDA device" and exits 0 where
//! there is no GPU.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use freekv_kernels::Gpu;
use freekv_kernels::cudarc::driver::sys::CUevent_flags;
use freekv_model::cuda::{
    BatchOptions, CudaLlama, decode_weight_bytes, kv_bytes_per_token, synthetic_config,
};

/// Tokens of headroom past the context (the lengths are rewound when they run out).
const SLACK: usize = 256;

/// Device-to-device copy bandwidth, bytes read + written per second (median of 10 copies of
/// 2 GiB).
fn copy_bandwidth(gpu: &Gpu) -> f64 {
    let s = gpu.stream();
    let n = 2usize << 30;
    let src = s.alloc_zeros::<u8>(n).unwrap();
    let mut dst = s.alloc_zeros::<u8>(n).unwrap();
    let mut times = Vec::new();
    for i in 0..12 {
        let t0 = s
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        s.memcpy_dtod(&src, &mut dst).unwrap();
        let t1 = s
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .unwrap();
        t1.synchronize().unwrap();
        if i >= 2 {
            times.push(t0.elapsed_ms(&t1).unwrap() as f64 * 1e-3);
        }
    }
    times.sort_by(f64::total_cmp);
    2.0 * n as f64 / times[times.len() / 2]
}

#[derive(Debug, Clone)]
struct Row {
    model: String,
    batch: usize,
    context: usize,
    ms_per_step: Option<f64>,
    floor_ms: f64,
    weight_gb: f64,
    kv_gb: f64,
    graph: bool,
    matmul_ms: Option<f64>,
    note: String,
}

fn parse_configs() -> Vec<(String, usize, usize)> {
    let default = "llama-3.1-8b:1:4096,llama-3.1-8b:8:4096,llama-3.1-8b:32:4096,\
                   llama-3.1-8b:1:32768,llama-3.1-8b:8:32768,llama-3.1-8b:32:32768,\
                   qwen-2.5-7b:1:4096,smollm2-135m:1:512";
    let spec = std::env::var("FREEKV_BENCH_CONFIGS").unwrap_or_else(|_| default.to_string());
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|c| {
            let p: Vec<&str> = c.trim().split(':').collect();
            assert_eq!(p.len(), 3, "config {c:?}: want model:batch:context");
            (
                p[0].to_string(),
                p[1].parse().unwrap(),
                p[2].parse().unwrap(),
            )
        })
        .collect()
}

fn main() {
    let gpu = match freekv_model::cuda::gpu() {
        Ok(g) => g,
        Err(e) if e.is_unavailable() => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
        Err(e) => panic!("CUDA present but unusable: {e}"),
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let bw = copy_bandwidth(&gpu);
    println!(
        "device: {}; device-copy bandwidth {:.0} GB/s (read + write)",
        gpu.info(),
        bw / 1e9
    );
    let mut rows = Vec::new();
    let configs = parse_configs();
    let mut loaded: Option<(String, CudaLlama)> = None;
    for (name, bs, ctx) in configs {
        let cfg = synthetic_config(&name).unwrap();
        let wbytes = decode_weight_bytes(&cfg) as f64;
        let kvb = (bs * ctx) as f64 * kv_bytes_per_token(&cfg) as f64;
        let mut row = Row {
            model: format!("synthetic:{name}"),
            batch: bs,
            context: ctx,
            ms_per_step: None,
            floor_ms: (wbytes + kvb) / bw * 1e3,
            weight_gb: wbytes / 1e9,
            kv_gb: kvb / 1e9,
            graph: false,
            matmul_ms: None,
            note: String::new(),
        };
        if loaded.as_ref().is_none_or(|(n, _)| *n != name) {
            drop(loaded.take()); // free the previous model first
            loaded = Some((
                name.clone(),
                CudaLlama::synthetic(gpu.clone(), &name, 1).unwrap(),
            ));
        }
        let Some((_, model)) = loaded.as_ref() else {
            unreachable!()
        };
        let (free, _) = gpu.ctx().mem_get_info().unwrap();
        let need = (bs * (ctx + SLACK)) as f64 * kv_bytes_per_token(&cfg) as f64;
        if need > free as f64 * 0.97 {
            row.note = format!(
                "does not fit: KV needs {:.1} GB, {:.1} GB free after the weights",
                need / 1e9,
                free as f64 / 1e9
            );
            println!("{}/b{bs}/ctx{ctx}: {}", row.model, row.note);
            rows.push(row);
            continue;
        }
        let opts = BatchOptions {
            max_seqs: bs,
            max_seq_len: ctx + SLACK,
            page_size: 32,
            prefill_chunk: 256,
            use_graph: true,
        };
        let mut b = model.new_batch(opts).unwrap();
        model
            .fill_random_context(&mut b, &vec![ctx; bs], 3)
            .unwrap();
        let mut tokens = vec![1u32; bs];
        let step = |b: &mut freekv_model::cuda::CudaBatch, tokens: &mut Vec<u32>| {
            if b.lens()[0] + 1 >= ctx + SLACK {
                for i in 0..bs {
                    b.truncate(i, ctx).unwrap();
                }
            }
            model.decode_step(b, tokens).unwrap();
            *tokens = model.argmax(b).unwrap();
        };
        for _ in 0..3 {
            step(&mut b, &mut tokens);
        }
        row.graph = b.has_graph();
        if let Some(e) = b.graph_error() {
            row.note = format!("eager (graph capture failed: {e})");
        }
        let samples = Arc::new(Mutex::new(Vec::<f64>::new()));
        let id = format!("cuda_decode/{name}/b{bs}/ctx{ctx}");
        c.bench_function(&id, |bench| {
            bench.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    step(&mut b, &mut tokens);
                }
                let el = t.elapsed();
                samples
                    .lock()
                    .unwrap()
                    .push(el.as_secs_f64() / iters.max(1) as f64);
                el
            })
        });
        // The last 10 samples are criterion's measurement (the earlier ones its warm-up).
        let all = samples.lock().unwrap().clone();
        let mut v = all[all.len().saturating_sub(10)..].to_vec();
        v.sort_by(f64::total_cmp);
        row.ms_per_step = v.get(v.len() / 2).map(|s| s * 1e3);
        // Diagnostics: the step's matrix products alone (same shapes), timed with CUDA events.
        row.matmul_ms = model.matmul_time_ms(&mut b, 20).ok();
        rows.push(row);
    }
    drop(loaded);
    c.final_summary();
    println!();
    println!(
        "| model | batch | context | ms/step | tokens/s | HBM floor ms | ratio to floor | weights GB | KV GB | graph | GEMMs alone ms | note |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        match r.ms_per_step {
            Some(ms) => println!(
                "| {} | {} | {} | {:.3} | {:.0} | {:.3} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                r.model,
                r.batch,
                r.context,
                ms,
                r.batch as f64 * 1e3 / ms,
                r.floor_ms,
                ms / r.floor_ms,
                r.weight_gb,
                r.kv_gb,
                r.graph,
                r.matmul_ms.map_or("-".to_string(), |m| format!("{m:.3}")),
                r.note
            ),
            None => println!(
                "| {} | {} | {} | - | - | {:.3} | - | {:.2} | {:.2} | - | - | {} |",
                r.model, r.batch, r.context, r.floor_ms, r.weight_gb, r.kv_gb, r.note
            ),
        }
    }
    if let Ok(path) = std::env::var("FREEKV_BENCH_JSON") {
        let json = serde_json::json!({
            "device": gpu.info().to_string(),
            "copy_bandwidth_gbs": bw / 1e9,
            "synthetic": true,
            "rows": rows.iter().map(|r| serde_json::json!({
                "model": r.model, "batch": r.batch, "context": r.context,
                "ms_per_step": r.ms_per_step, "floor_ms": r.floor_ms,
                "weight_gb": r.weight_gb, "kv_gb": r.kv_gb, "graph": r.graph,
                "matmul_ms": r.matmul_ms, "note": r.note,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    }
}
