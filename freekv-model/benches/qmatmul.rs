//! Quantized mat-vec / mat-mul throughput for the SmolLM2-135M shapes, and the thread-pool handoff.
//!
//! Groups (filter with a substring, e.g. `cargo bench -p freekv-model --bench qmatmul -- matvec/`):
//! * `pool`: one `for_each_chunk` over 2 ranges with a trivial body, this crate's pool vs rayon.
//! * `matvec`, `matmul`: one matrix, `{type}-{rows}x{cols}/{kernels}-{threads}t[-n{tokens}]`;
//!   throughput is weight bytes per second (GFLOP/s = 2·rows·cols·n / time).
//! * `model`: every projection of SmolLM2-135M (30 layers, distinct random weights, Q4_1) plus the
//!   Q8_0 output head: one decode step with one call per matrix (`decode-step`) or with Q/K/V and
//!   gate/up fused into one call each through `matmul_many` (`decode-step-fused`), and a 64-token
//!   prefill without the head (`prefill-64`; divide by 64 for per-token time).
//!
//! Weights are random bytes with valid f16 scales: speed does not depend on the values.
//!
//! With `FREEKV_BENCH_CPU_TIME=1` (Linux), the single-thread (`-1t`) benchmarks report the calling
//! thread's CPU time instead of wall time: on a machine shared with other work this removes the time
//! the thread spent descheduled (multi-thread benchmarks always report wall time).

use std::hint::black_box;
use std::ops::Range;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use freekv_model::GgmlType;
use freekv_model::qmatmul::parallel::ThreadPool;
use freekv_model::qmatmul::{Isa, QMatrix, matmul_many_with};
use rayon::prelude::*;

#[cfg(target_os = "linux")]
mod cpu_clock {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;

    /// CPU time consumed by the calling thread.
    pub fn now() -> Option<std::time::Duration> {
        let mut ts = Timespec { sec: 0, nsec: 0 };
        // SAFETY: `ts` is a valid out-pointer; the call has no other effects.
        let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| std::time::Duration::new(ts.sec as u64, ts.nsec as u32))
    }
}

#[cfg(not(target_os = "linux"))]
mod cpu_clock {
    pub fn now() -> Option<std::time::Duration> {
        None
    }
}

/// Times `iters` runs of `f`: thread CPU time when `cpu` and available, else wall time.
fn run_timed(iters: u64, cpu: bool, mut f: impl FnMut()) -> Duration {
    if cpu && let Some(t0) = cpu_clock::now() {
        for _ in 0..iters {
            f();
        }
        return cpu_clock::now().map_or(Duration::ZERO, |t1| t1.saturating_sub(t0));
    }
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    t0.elapsed()
}

/// Whether single-thread benchmarks should report CPU time (`FREEKV_BENCH_CPU_TIME=1`).
fn cpu_time_wanted() -> bool {
    std::env::var("FREEKV_BENCH_CPU_TIME").is_ok_and(|v| v == "1")
}

/// Random encoded weights with finite f16 scales (xorshift; values do not matter for speed).
fn random_weights(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let bytes = ty.bytes_for((rows * cols) as u64).expect("shape") as usize;
    let mut s = seed | 1;
    let mut data: Vec<u8> = (0..bytes.div_ceil(8))
        .flat_map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s.to_le_bytes()
        })
        .take(bytes)
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 => &[0, 2],
        _ => &[],
    };
    for blk in data.chunks_exact_mut(ty.block_bytes()) {
        for &f in fields {
            blk[f..f + 2].copy_from_slice(&scale);
        }
    }
    data
}

fn random_x(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// (name, kernels, pool threads)
fn configs() -> Vec<(String, Isa, usize)> {
    let best = Isa::best();
    let tag = if best == Isa::Avx2 { "avx2" } else { "scalar" };
    let mut v = vec![
        (format!("{tag}-2t"), best, 2),
        (format!("{tag}-1t"), best, 1),
    ];
    if best != Isa::Scalar {
        v.push(("scalar-1t".into(), Isa::Scalar, 1));
    }
    v
}

const SHAPES: [(usize, usize); 4] = [(576, 576), (192, 576), (1536, 576), (576, 1536)];

fn bench_pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    let ours = ThreadPool::new(2);
    let body = |r: Range<usize>| {
        black_box(r);
    };
    g.bench_function("freekv-2t", |b| {
        b.iter(|| ours.for_each_chunk(black_box(2), &body))
    });
    let rp = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("rayon pool");
    g.bench_function("rayon-2t", |b| {
        b.iter(|| {
            rp.install(|| {
                (0..black_box(2usize))
                    .into_par_iter()
                    .for_each(|i| body(i..i + 1))
            })
        })
    });
    // a real workload through each: Q4_1 576x576 matvec, rows split in 2
    let data = random_weights(GgmlType::Q4_1, 576, 576, 1);
    let m = QMatrix::new(GgmlType::Q4_1, 576, 576, &data).expect("matrix");
    let x = random_x(576);
    let mut y = vec![0.0f32; 576];
    g.bench_function("matvec-q4_1-576x576-freekv-2t", |b| {
        b.iter(|| {
            m.matvec_with(&ours, Isa::best(), black_box(&x), &mut y)
                .expect("matvec")
        })
    });
    let one = ThreadPool::new(1);
    let halves: Vec<QMatrix<'_>> = data
        .chunks_exact(288 * m.row_bytes())
        .map(|d| QMatrix::new(GgmlType::Q4_1, 288, 576, d).expect("half"))
        .collect();
    g.bench_function("matvec-q4_1-576x576-rayon-2t", |b| {
        b.iter(|| {
            rp.install(|| {
                halves
                    .par_iter()
                    .zip(y.par_chunks_mut(288))
                    .for_each(|(h, yc)| {
                        h.matvec_with(&one, Isa::best(), black_box(&x), yc)
                            .expect("matvec");
                    })
            })
        })
    });
    g.finish();
}

fn bench_matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    let mut cases: Vec<(GgmlType, usize, usize)> = Vec::new();
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        for (r, k) in SHAPES {
            cases.push((ty, r, k));
        }
    }
    cases.push((GgmlType::Q8_0, 49152, 576));
    for (ty, rows, cols) in cases {
        let data = random_weights(ty, rows, cols, 2);
        let m = QMatrix::new(ty, rows, cols, &data).expect("matrix");
        let x = random_x(cols);
        let mut y = vec![0.0f32; rows];
        g.throughput(Throughput::Bytes(data.len() as u64));
        for (name, isa, threads) in configs() {
            let pool = ThreadPool::new(threads);
            let id = BenchmarkId::new(format!("{ty}-{rows}x{cols}"), name);
            let cpu = threads == 1 && cpu_time_wanted();
            g.bench_function(id, |b| {
                b.iter_custom(|it| {
                    run_timed(it, cpu, || {
                        m.matvec_with(&pool, isa, black_box(&x), &mut y)
                            .expect("matvec")
                    })
                })
            });
        }
    }
    g.finish();
}

fn bench_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("matmul");
    g.sample_size(20);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
        for (rows, cols) in SHAPES {
            let data = random_weights(ty, rows, cols, 3);
            let m = QMatrix::new(ty, rows, cols, &data).expect("matrix");
            for n in [1usize, 8, 64] {
                let x = random_x(n * cols);
                let mut y = vec![0.0f32; n * rows];
                g.throughput(Throughput::Bytes(data.len() as u64));
                for (name, isa, threads) in configs() {
                    if isa == Isa::Scalar && n == 64 && Isa::best() != Isa::Scalar {
                        continue;
                    }
                    let pool = ThreadPool::new(threads);
                    let id =
                        BenchmarkId::new(format!("{ty}-{rows}x{cols}"), format!("{name}-n{n}"));
                    let cpu = threads == 1 && cpu_time_wanted();
                    g.bench_function(id, |b| {
                        b.iter_custom(|it| {
                            run_timed(it, cpu, || {
                                m.matmul_with(&pool, isa, black_box(&x), n, &mut y)
                                    .expect("matmul")
                            })
                        })
                    });
                }
            }
        }
    }
    g.finish();
}

/// The SmolLM2-135M projections (rows, cols) of one layer, in call order.
const LAYER: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];

fn bench_model(c: &mut Criterion) {
    let mut g = c.benchmark_group("model");
    g.sample_size(10);
    let layers: Vec<Vec<Vec<u8>>> = (0..30)
        .map(|l| {
            LAYER
                .iter()
                .enumerate()
                .map(|(i, &(r, k))| random_weights(GgmlType::Q4_1, r, k, 100 + 7 * l + i as u64))
                .collect()
        })
        .collect();
    let head = random_weights(GgmlType::Q8_0, 49152, 576, 5);
    let mats: Vec<Vec<QMatrix<'_>>> = layers
        .iter()
        .map(|ws| {
            ws.iter()
                .zip(LAYER)
                .map(|(d, (r, k))| QMatrix::new(GgmlType::Q4_1, r, k, d).expect("matrix"))
                .collect()
        })
        .collect();
    let head_m = QMatrix::new(GgmlType::Q8_0, 49152, 576, &head).expect("head");
    let total: usize = layers.iter().flatten().map(Vec::len).sum::<usize>() + head.len();
    let x576 = random_x(576);
    let x1536 = random_x(1536);
    let mut y = vec![0.0f32; 49152];
    let best = Isa::best();
    g.throughput(Throughput::Bytes(total as u64));
    for threads in [2usize, 1] {
        let pool = ThreadPool::new(threads);
        let cpu = threads == 1 && cpu_time_wanted();
        g.bench_function(format!("decode-step/{threads}t"), |b| {
            b.iter_custom(|it| {
                run_timed(it, cpu, || {
                    for layer in &mats {
                        for m in layer {
                            let x = if m.cols() == 576 { &x576 } else { &x1536 };
                            m.matvec_with(&pool, best, black_box(x), &mut y[..m.rows()])
                                .expect("matvec");
                        }
                    }
                    head_m
                        .matvec_with(&pool, best, black_box(&x576), &mut y)
                        .expect("head");
                })
            })
        });
    }
    let (mut q, mut k, mut v) = (vec![0.0f32; 576], vec![0.0f32; 192], vec![0.0f32; 192]);
    let (mut gate, mut up) = (vec![0.0f32; 1536], vec![0.0f32; 1536]);
    let mut o = vec![0.0f32; 576];
    let pool = ThreadPool::new(2);
    g.bench_function("decode-step-fused/2t", |b| {
        b.iter(|| {
            for l in &mats {
                let x = black_box(&x576);
                matmul_many_with(
                    &pool,
                    best,
                    &l[0..3],
                    x,
                    1,
                    &mut [&mut q[..], &mut k[..], &mut v[..]],
                )
                .expect("qkv");
                l[3].matvec_with(&pool, best, x, &mut o).expect("o");
                matmul_many_with(
                    &pool,
                    best,
                    &l[4..6],
                    x,
                    1,
                    &mut [&mut gate[..], &mut up[..]],
                )
                .expect("gate/up");
                l[6].matvec_with(&pool, best, black_box(&x1536), &mut o)
                    .expect("down");
            }
            head_m
                .matvec_with(&pool, best, black_box(&x576), &mut y)
                .expect("head");
        })
    });
    let n = 64;
    let x576n = random_x(n * 576);
    let x1536n = random_x(n * 1536);
    let mut yn = vec![0.0f32; n * 1536];
    g.throughput(Throughput::Bytes((total - head.len()) as u64));
    for threads in [2usize, 1] {
        let pool = ThreadPool::new(threads);
        let cpu = threads == 1 && cpu_time_wanted();
        g.bench_function(format!("prefill-64/{threads}t"), |b| {
            b.iter_custom(|it| {
                run_timed(it, cpu, || {
                    for layer in &mats {
                        for m in layer {
                            let x = if m.cols() == 576 { &x576n } else { &x1536n };
                            m.matmul_with(&pool, best, black_box(x), n, &mut yn[..n * m.rows()])
                                .expect("matmul");
                        }
                    }
                })
            })
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_pool, bench_matvec, bench_matmul, bench_model
}
criterion_main!(benches);
