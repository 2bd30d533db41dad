//! FreeKV selection timings on the GPU with CUDA events (`iter_custom`): `freekv_select` (score →
//! group → top-k → slot diff, both launches) at Llama-3.1-8B per-layer shapes (8 KV heads,
//! G = 4, d = 128, pages of 32, the paper's budget B = 2048 tokens with 512 sink and 512 window
//! tokens: ns = 16, k = 32, nw = 16) for N = 1024 and 4096 pages and 1, 4, 16 sequences, plus the
//! correction kernel. Prints "skipped: no CUDA device" and exits 0 where there is no GPU.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use freekv_kernels::{FreeKvShape, Gpu, HeadFilter, Strided};
use freekv_layout::Budget;
use freekv_select::{CorrectionAggregate, GroupPolicy, SummaryKind};

const HKV: usize = 8;
const G: usize = 4;
const D: usize = 128;
const PAGE: usize = 32;

/// [`freekv_kernels::testing::gpu_time`], panicking on a driver error (benchmarks only).
fn gpu_time(s: &Arc<CudaStream>, iters: u64, mut f: impl FnMut()) -> Duration {
    freekv_kernels::testing::gpu_time(s, iters, |_| f()).unwrap()
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i.wrapping_mul(2_654_435_761).wrapping_add(salt * 40_503)) % 65_521;
            x as f32 / 32_760.5 - 1.0
        })
        .collect()
}

fn shape(seqs: usize, pages: usize) -> FreeKvShape {
    let budget = Budget::from_tokens(2048, 512, 512, PAGE).unwrap();
    FreeKvShape::from_budget(seqs, HKV, G, D, &budget, pages)
}

fn up<T: freekv_kernels::cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    s.clone_htod(v).unwrap()
}

fn bench_select(c: &mut Criterion, g: &Gpu) {
    let s = g.stream();
    let k = g.kernels();
    let mut grp = c.benchmark_group("freekv_select_llama8b_layer");
    for policy in [GroupPolicy::MeanSoftmax, GroupPolicy::MeanScore] {
        for &pages in &[1024usize, 4096] {
            for &seqs in &[1usize, 4, 16] {
                let sh = shape(seqs, pages);
                let rows = sh.rows();
                let sums = up(s, &values(rows * pages * 2 * D, 1));
                let q = up(s, &values(seqs * sh.q_heads() * D, 2));
                let info: Vec<i32> = (0..seqs).flat_map(|_| [pages as i32, 2, -1, 0]).collect();
                let info = up(s, &info);
                let flags = up(s, &vec![0i32; rows]);
                let mut mid = up(s, &vec![-1i32; rows * sh.top_k]);
                let mut pm = up(s, &vec![-1i32; rows * pages]);
                let mut rc = s.alloc_zeros::<i32>(rows).unwrap();
                let mut rl = s.alloc_zeros::<i32>(rows * sh.top_k * 2).unwrap();
                let mut sel = s.alloc_zeros::<i32>(rows * sh.top_k).unwrap();
                let mut scratch = s.alloc_zeros::<f32>(sh.select_scratch_len()).unwrap();
                let candidates = pages - sh.sink_pages - sh.window_pages;
                grp.throughput(Throughput::Bytes((rows * candidates * 2 * D * 4) as u64));
                let id = BenchmarkId::new(format!("{policy}/bs{seqs}"), pages);
                grp.bench_function(id, |b| {
                    b.iter_custom(|iters| {
                        gpu_time(s, iters, || {
                            k.freekv_select(
                                s,
                                &sh,
                                policy,
                                SummaryKind::MinMax,
                                &q,
                                &sums,
                                &info,
                                &flags,
                                HeadFilter::All,
                                &mut mid,
                                &mut pm,
                                &mut rc,
                                &mut rl,
                                Some(&mut sel),
                                &mut scratch,
                                None,
                            )
                            .unwrap()
                        })
                    })
                });
            }
        }
    }
    grp.finish();
}

fn bench_correction(c: &mut Criterion, g: &Gpu) {
    let s = g.stream();
    let k = g.kernels();
    let mut grp = c.benchmark_group("freekv_correction_llama8b_layer");
    for &seqs in &[1usize, 4, 16] {
        let sh = shape(seqs, 1024);
        let n = seqs * sh.q_heads() * D;
        let q: Vec<bf16> = values(n, 3).into_iter().map(bf16::from_f32).collect();
        let q = up(s, &q);
        let mut prev = up(s, &values(n, 4));
        let info: Vec<i32> = (0..seqs).flat_map(|_| [1024, 2, -1, 0]).collect();
        let info = up(s, &info);
        let mut flags = s.alloc_zeros::<i32>(sh.rows()).unwrap();
        let rows_q = Strided::contiguous(sh.q_heads() * D);
        grp.bench_function(BenchmarkId::new("bs", seqs), |b| {
            b.iter_custom(|iters| {
                gpu_time(s, iters, || {
                    k.freekv_correction(
                        s,
                        &sh,
                        &q,
                        rows_q,
                        &mut prev,
                        &info,
                        Some(0.9),
                        CorrectionAggregate::Mean,
                        &mut flags,
                        None,
                    )
                    .unwrap()
                })
            })
        });
    }
    grp.finish();
}

fn main() {
    let Some(g) = freekv_kernels::testing::gpu() else {
        return;
    };
    println!("device: {}", g.info());
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20)
        .configure_from_args();
    bench_select(&mut c, &g);
    bench_correction(&mut c, &g);
    c.final_summary();
}
