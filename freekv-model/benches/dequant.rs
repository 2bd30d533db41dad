//! Dequantization throughput per ggml type, and GGUF parsing time of the default model.
//!
//! Benchmarks (filter with a substring, e.g. `cargo bench -p freekv-model --bench dequant -- q4_1`):
//! * `dequant/TYPE/16K`: 16,384 elements (64 KiB of f32 output, fits in L2; the serial path);
//! * `dequant/TYPE/4M`: 4,194,304 elements (16 MiB of output; split over the rayon pool);
//! * `gguf_open`: `GgufFile::open` of the default model (mmap + header, 33 metadata pairs incl.
//!   the 49,152-token vocabulary and 48,900 merges, 272 tensor infos); skipped with one line when
//!   the model is not cached.
//!
//! Throughput is output elements per second. Inputs are random blocks with finite scales, seeded.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use freekv_model::GgmlType;
use freekv_model::gguf::GgufFile;
use freekv_model::quant::dequantize;
use half::f16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use freekv_model::testing::default_model_path;

/// Random bytes of `n` elements of `ty`, with every f16 scale field set to a finite value.
fn random_tensor(ty: GgmlType, n: usize, rng: &mut StdRng) -> Vec<u8> {
    let len = ty.bytes_for(n as u64).unwrap() as usize;
    let mut b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
    let set = |blk: &mut [u8], at: usize, rng: &mut StdRng| {
        blk[at..at + 2].copy_from_slice(&f16::from_f32(rng.random_range(-0.1..0.1)).to_le_bytes());
    };
    let bb = ty.block_bytes();
    match ty {
        GgmlType::F16 | GgmlType::BF16 => {
            for e in b.chunks_mut(2) {
                set(e, 0, rng);
            }
        }
        GgmlType::F32 => {
            for e in b.chunks_mut(4) {
                e.copy_from_slice(&rng.random_range(-1.0f32..1.0).to_le_bytes());
            }
        }
        GgmlType::Q4_0 | GgmlType::Q8_0 => b.chunks_mut(bb).for_each(|k| set(k, 0, rng)),
        GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K => b.chunks_mut(bb).for_each(|k| {
            set(k, 0, rng);
            set(k, 2, rng);
        }),
        GgmlType::Q6K => b.chunks_mut(bb).for_each(|k| set(k, 208, rng)),
        _ => unreachable!("unsupported in this bench"),
    }
    b
}

fn bench_dequant(c: &mut Criterion) {
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];
    let mut rng = StdRng::seed_from_u64(1);
    let mut g = c.benchmark_group("dequant");
    for (n, label) in [(1usize << 14, "16K"), (1 << 22, "4M")] {
        g.throughput(Throughput::Elements(n as u64));
        let mut out = vec![0f32; n];
        for ty in types {
            let data = random_tensor(ty, n, &mut rng);
            g.bench_with_input(BenchmarkId::new(ty.name(), label), &data, |b, data| {
                b.iter(|| dequantize(ty, black_box(data), black_box(&mut out)).unwrap())
            });
        }
    }
    g.finish();
}

fn bench_open(c: &mut Criterion) {
    let Some(path) = default_model_path() else {
        println!("gguf_open skipped: default model not cached");
        return;
    };
    c.bench_function("gguf_open", |b| {
        b.iter(|| GgufFile::open(black_box(&path)).unwrap())
    });
}

criterion_group!(benches, bench_dequant, bench_open);
criterion_main!(benches);
