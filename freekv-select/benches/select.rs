//! Selection cost per layer and step: scoring every summarised page against every query head,
//! group aggregation and the top-k, for the shapes of the default model (Hkv 3, d 64, G 3) and of
//! Llama-3.1-8B (Hkv 8, d 128, G 4), at 256, 1024 and 4096 pages.
//!
//! Run: `cargo bench -p freekv-select --bench select`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use freekv_layout::PageGeometry;
use freekv_select::{
    GroupPolicy, PageSummaries, Selector, SelectorConfig, SummaryKind, score_pages,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SHAPES: [(&str, usize, usize, usize); 2] =
    [("hkv3_d64_g3", 3, 64, 3), ("hkv8_d128_g4", 8, 128, 4)];
const PAGES: [usize; 3] = [256, 1024, 4096];

fn summaries(rng: &mut StdRng, hkv: usize, d: usize, pages: usize) -> PageSummaries {
    let geom = PageGeometry::new(32, hkv, d).unwrap_or_else(|e| panic!("{e}"));
    let mut upper = Vec::with_capacity(hkv);
    let mut lower = Vec::with_capacity(hkv);
    for _ in 0..hkv {
        let u: Vec<f32> = (0..pages * d)
            .map(|_| rng.random_range(-1.0f32..2.0))
            .collect();
        let l: Vec<f32> = u
            .iter()
            .map(|x| x - rng.random_range(0.0f32..2.0))
            .collect();
        upper.push(u);
        lower.push(l);
    }
    PageSummaries::from_parts(SummaryKind::MinMax, geom, upper, lower)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn bench_select(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(42);
    let mut group = c.benchmark_group("select_layer");
    for (name, hkv, d, g) in SHAPES {
        for pages in PAGES {
            let s = summaries(&mut rng, hkv, d, pages);
            let q: Vec<f32> = (0..hkv * g * d)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            // summary bytes streamed per call (upper + lower, all KV heads)
            group.throughput(Throughput::Bytes(s.bytes() as u64));
            for policy in [GroupPolicy::MeanSoftmax, GroupPolicy::MeanScore] {
                let sel = Selector::new(SelectorConfig {
                    top_k: 32,
                    sink_pages: 16,
                    window_pages: 16,
                    policy,
                    summary: SummaryKind::MinMax,
                })
                .unwrap_or_else(|e| panic!("{e}"));
                // n_pages = summarised pages + 1 partial page
                group.bench_with_input(
                    BenchmarkId::new(format!("{name}/{policy}"), pages),
                    &pages,
                    |b, &pages| {
                        b.iter(|| sel.select_layer(black_box(&q), black_box(&s), pages + 1))
                    },
                );
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("score_pages");
    for (name, hkv, d, g) in SHAPES {
        for pages in PAGES {
            let s = summaries(&mut rng, hkv, d, pages);
            let q: Vec<f32> = (0..hkv * g * d)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let mut out = vec![0.0f32; g * pages];
            group.throughput(Throughput::Bytes(s.bytes() as u64));
            group.bench_with_input(BenchmarkId::new(name, pages), &pages, |b, &pages| {
                b.iter(|| {
                    for h in 0..hkv {
                        let head = s.head(h).unwrap_or_else(|e| panic!("{e}"));
                        score_pages(
                            black_box(&q[h * g * d..(h + 1) * g * d]),
                            head,
                            0..pages,
                            &mut out,
                        )
                        .unwrap_or_else(|e| panic!("{e}"));
                    }
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_select);
criterion_main!(benches);
