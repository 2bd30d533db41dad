//! Transpose throughput (bytes of one page or unit moved per iteration), f32 and bf16, on the
//! shapes of the default model (P=32, Hkv=3, d=64) and Llama-3.1-8B (P=32, Hkv=8, d=128).
//!
//! Run: `cargo bench -p freekv-layout --bench transpose`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use freekv_layout::{PageGeometry, hnd_to_nhd, hnd_unit_to_nhd_slice, nhd_to_hnd};
use half::bf16;
use std::hint::black_box;
use std::time::Duration;

const SHAPES: [(usize, usize, usize); 2] = [(32, 3, 64), (32, 8, 128)];

fn label(g: PageGeometry, ty: &str) -> String {
    format!("{ty}/P{}_H{}_d{}", g.page_size, g.kv_heads, g.head_dim)
}

fn bench_type<T: Copy + Default>(c: &mut Criterion, ty: &str, one: T) {
    for (p, h, d) in SHAPES {
        let g = PageGeometry::new(p, h, d).unwrap();
        let n = g.page_elems();
        let bytes = (n * std::mem::size_of::<T>()) as u64;
        let src = vec![one; n];
        let mut dst = vec![T::default(); n];

        let mut grp = c.benchmark_group("transpose_page");
        grp.throughput(Throughput::Bytes(bytes));
        grp.bench_function(BenchmarkId::new("nhd_to_hnd", label(g, ty)), |b| {
            b.iter(|| nhd_to_hnd(g, black_box(&src), black_box(&mut dst)).unwrap())
        });
        grp.bench_function(BenchmarkId::new("hnd_to_nhd", label(g, ty)), |b| {
            b.iter(|| hnd_to_nhd(g, black_box(&src), black_box(&mut dst)).unwrap())
        });
        grp.finish();

        let mut grp = c.benchmark_group("transpose_unit");
        let u = g.head_unit_elems();
        grp.throughput(Throughput::Bytes((u * std::mem::size_of::<T>()) as u64));
        grp.bench_function(
            BenchmarkId::new("hnd_unit_to_nhd_slice", label(g, ty)),
            |b| {
                b.iter(|| {
                    hnd_unit_to_nhd_slice(g, h - 1, black_box(&src[..u]), black_box(&mut dst))
                        .unwrap()
                })
            },
        );
        grp.finish();
    }
}

fn transposes(c: &mut Criterion) {
    bench_type::<f32>(c, "f32", 1.0);
    bench_type::<bf16>(c, "bf16", bf16::ONE);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = transposes
}
criterion_main!(benches);
