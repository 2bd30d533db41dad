//! Prefill and decode speed of the default model on the CPU at 37-, 1K- and 4K-token prompts.
//!
//! `cargo bench -p freekv-model --bench decode` (skipped with one line when the default model is
//! not cached). `prefill/N` times a whole N-token prompt (throughput = prompt tokens/s);
//! `decode/N` times single decode steps with N tokens already in the cache (throughput =
//! tokens/s): after every 8 steps the cache is truncated back to N, so the context stays at N..N+8.
//! `attention_decode/N` times the dense decode attention of one token (all 30 layers) over a
//! synthetic N-token cache, without the model. `FREEKV_BENCH_SIZES=37,1024` restricts the sizes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use freekv_model::gguf::GgufFile;
use freekv_model::llama::LlamaModel;
use freekv_model::testing::default_model_path;
use freekv_model::tokenizer::Tokenizer;

const TEXT: &str = "The history of the lighthouse is a long one. Sailors have always needed a way \
to find the coast at night, and fires lit on hills were the first answer. Later, towers of stone \
carried lamps of oil, then of gas, and finally electric lights whose beams reached far out to sea. \
Each tower had its keeper, who trimmed the wicks, wound the clockwork that turned the lens, and \
wrote the weather into a logbook twice a day. ";

/// `n` prompt tokens: the chat template's opening, then English text repeated.
fn prompt(tok: &Tokenizer, n: usize) -> Vec<u32> {
    let mut ids = tok.encode("<|im_start|>user\n", true).unwrap_or_default();
    let para = tok.encode(TEXT, false).unwrap_or_default();
    while ids.len() < n {
        ids.extend_from_slice(&para);
    }
    ids.truncate(n);
    ids
}

fn sizes() -> Vec<usize> {
    std::env::var("FREEKV_BENCH_SIZES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| vec![37, 1024, 4096])
}

/// Dense decode attention alone, on a synthetic cache of the default model's shape (30 layers,
/// 9 query heads, 3 KV heads of 64, pages of 32): one "token" is one call per layer, layers in
/// turn, so the KV comes from memory as in a real decode step. Runs without the model file.
fn attention(c: &mut Criterion) {
    use freekv_layout::{PageGeometry, PagedKvCache};
    use freekv_model::attention::{AttnScratch, AttnShape, CacheLayer, decode_attention};
    let layers = 30;
    let shape = AttnShape::new(9, 3, 64).expect("shape");
    let mut rng = freekv_model::sampling::Rng::new(1);
    let mut group = c.benchmark_group("attention_decode");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for &n in &sizes() {
        let geom = PageGeometry::new(32, 3, 64).expect("geometry");
        let mut cache = PagedKvCache::new(geom, layers, None).expect("cache");
        for _ in 0..n {
            for l in 0..layers {
                let k: Vec<f32> = (0..192).map(|_| rng.uniform(-1.0, 1.0)).collect();
                let v: Vec<f32> = (0..192).map(|_| rng.uniform(-1.0, 1.0)).collect();
                cache.append(l, &k, &v).expect("append");
            }
        }
        let q: Vec<f32> = (0..shape.q_len()).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut out = vec![0.0; shape.q_len()];
        let mut scratch = AttnScratch::new();
        group.throughput(Throughput::Elements(1));
        group.bench_function(n.to_string(), |b| {
            b.iter(|| {
                for l in 0..layers {
                    decode_attention(
                        &CacheLayer::new(&cache, l),
                        &q,
                        &shape,
                        &mut out,
                        &mut scratch,
                    )
                    .expect("attention");
                }
            })
        });
    }
    group.finish();
}

fn bench(c: &mut Criterion) {
    let Some(path) = default_model_path() else {
        println!("skipped: default model not cached");
        return;
    };
    let g = Arc::new(GgufFile::open(&path).expect("model file"));
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer");
    let model = LlamaModel::new(g).expect("model");
    let sizes = sizes();

    let mut group = c.benchmark_group("prefill");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for &n in &sizes {
        let ids = prompt(&tok, n);
        let mut s = model.session(32).expect("session");
        group.throughput(Throughput::Elements(n as u64));
        group.measurement_time(Duration::from_secs(if n > 2048 { 60 } else { 10 }));
        group.warm_up_time(Duration::from_millis(if n > 2048 { 100 } else { 1000 }));
        group.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    s.reset();
                    let t = Instant::now();
                    model.prefill(&mut s, &ids).expect("prefill");
                    total += t.elapsed();
                }
                total
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("decode");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    for &n in &sizes {
        let ids = prompt(&tok, n);
        let mut s = model.session(32).expect("session");
        model.prefill(&mut s, &ids).expect("prefill");
        group.throughput(Throughput::Elements(1));
        let mut next = ids[n - 1];
        group.bench_function(n.to_string(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if s.position() >= n + 8 {
                        s.truncate(n);
                    }
                    let t = Instant::now();
                    let logits = model.decode(&mut s, next).expect("decode");
                    total += t.elapsed();
                    next = freekv_model::sampling::argmax(logits).unwrap_or(0) as u32;
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, attention, bench);
criterion_main!(benches);
