//! Decode-step time of the KV policies on the CPU: `full`, `quest`, `arkvale` and `freekv`
//! (speculative recall on the executor's threads, and inline) on the default model with a
//! 2K-token prompt (or a tiny random model when the default model is not cached), page 8,
//! budget 512 (a quarter of the context), sink 16, window 32.
//!
//! `cargo bench -p freekv-model --bench kv`. One sample is one decode step; every 8 steps the
//! cache is truncated back to the prompt and the policy is replaced (untimed), and one untimed
//! step lets the policy rebuild its summaries and slots, so the context stays at N+1..N+9.
//! `FREEKV_BENCH_CONTEXT=4096` changes N.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use freekv_model::kv::{KvConfig, KvKind, SharedKv, SpecRecall, build_policy};
use freekv_model::testing::{TinyConfig, default_model_path, tiny_random_model};
use freekv_model::{DenseKv, GgufFile, LlamaModel};

const STEPS_PER_RESET: u64 = 8;

fn context() -> usize {
    std::env::var("FREEKV_BENCH_CONTEXT")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(2048)
}

fn model() -> (LlamaModel, &'static str) {
    if let Some(p) = default_model_path()
        && let Ok(g) = GgufFile::open(&p)
        && let Ok(m) = LlamaModel::new(Arc::new(g))
    {
        return (m, "smollm2-135m");
    }
    println!("default model not cached: benchmarking a tiny random model");
    let cfg = TinyConfig {
        n_layers: 4,
        context_length: 8192,
        ..TinyConfig::default()
    };
    let g = tiny_random_model(1, &cfg).expect("tiny model");
    (LlamaModel::new(Arc::new(g)).expect("model"), "tiny")
}

fn bench(c: &mut Criterion) {
    let (m, name) = model();
    let n = context().min(m.config().context_length.saturating_sub(64));
    let vocab = m.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..n as u32)
        .map(|i| 100 + (i * 7919) % (vocab - 200))
        .collect();
    let shared = SharedKv::new(Box::new(DenseKv::new()));
    let mut s = m.session_with_policy(8, shared.boxed()).expect("session");
    m.prefill(&mut s, &prompt).expect("prefill");
    let mut group = c.benchmark_group(format!("kv_decode_{name}_{n}"));
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(8));
    let variants = [
        (KvKind::Full, SpecRecall::Threads),
        (KvKind::Quest, SpecRecall::Threads),
        (KvKind::ArkVale, SpecRecall::Threads),
        (KvKind::FreeKv, SpecRecall::Threads),
        (KvKind::FreeKv, SpecRecall::Inline),
    ];
    for (kind, spec_recall) in variants {
        let cfg = KvConfig {
            kind,
            spec_recall,
            budget: n / 4,
            sink: 16,
            window: 32,
            page_size: 8,
            summary: freekv_select::SummaryKind::ArkVale,
            ..KvConfig::default()
        };
        let label = match kind {
            KvKind::Full => "full".to_string(),
            KvKind::FreeKv if spec_recall == SpecRecall::Inline => {
                format!("freekv-inline@{}", cfg.budget)
            }
            k => format!("{k}@{}", cfg.budget),
        };
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut since_reset = STEPS_PER_RESET;
                for i in 0..iters {
                    if since_reset == STEPS_PER_RESET {
                        s.truncate(n);
                        shared.replace(build_policy(&cfg, m.config().n_layers).expect("policy"));
                        m.decode(&mut s, 7).expect("decode");
                        since_reset = 0;
                    }
                    let t = Instant::now();
                    m.decode(&mut s, 100 + (i as u32 % 50)).expect("decode");
                    total += t.elapsed();
                    since_reset += 1;
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
