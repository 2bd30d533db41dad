//! Skinny products at decode shapes: the `gemv` kernels against cuBLAS, side by side, at
//! Llama-3.1-8B's matrix shapes (fused QKV 4096→6144, O 4096→4096, fused gate-up 4096→28672,
//! down 14336→4096, head 4096→128256) for 1, 2, 4 and 8 token rows, as weight bytes per second
//! against the device-copy bandwidth measured in the same run; and one decoder layer's
//! non-attention kernels (norms, products, RoPE, KV append, SwiGLU) captured as a CUDA graph, as
//! the decoder runs them today (cuBLAS or `gemv` products) and with the `gemv` fusions, each
//! `gemv` form with and without programmatic dependent launch.
//!
//! Weights rotate over enough copies (≥ 512 MB) that no product finds its weights in L2, as in a
//! decode step. Times are CUDA events around the launches. Before the criterion groups, a quick
//! sweep over every compiled launch shape prints the best per product (a tuning aid; set
//! `FREEKV_GEMV_SWEEP=0` to skip). Prints "skipped: no CUDA device" and exits 0 without a GPU.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{measure, random_bf16};

use criterion::{BenchmarkId, Criterion, Throughput};
use freekv_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use freekv_kernels::ops::gemv::{GemvConfig, QkvRows};
use freekv_kernels::ops::init::InitKernels;
use freekv_kernels::{
    Gemm, Gpu, KvSource, LinearDims, PageTableLayout, RopeConfig, RopeLayout, RopeStyle, Strided,
};
use freekv_layout::PageGeometry;

/// (name, in_features, out_features) of Llama-3.1-8B's products.
const SHAPES: [(&str, usize, usize); 5] = [
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("gate_up", 4096, 28672),
    ("down", 14336, 4096),
    ("head", 4096, 128_256),
];
const TOKENS: [usize; 4] = [1, 2, 4, 8];
/// Bytes of weight copies per shape (rotated so that L2 never holds them).
const ROTATION_BYTES: usize = 512 << 20;

/// [`freekv_kernels::testing::gpu_time`], panicking on a driver error (benchmarks only).
fn event_time(s: &Arc<CudaStream>, iters: u64, f: impl FnMut(u64)) -> Duration {
    freekv_kernels::testing::gpu_time(s, iters, f).unwrap()
}

/// Device-to-device copy bandwidth, bytes read + written per second (median of 8 copies of 1 GiB).
fn copy_bandwidth(s: &Arc<CudaStream>) -> f64 {
    let n = 1usize << 30;
    let src = s.alloc_zeros::<u8>(n).unwrap();
    let mut dst = s.alloc_zeros::<u8>(n).unwrap();
    let mut v: Vec<f64> = (0..10)
        .map(|_| event_time(s, 1, |_| s.memcpy_dtod(&src, &mut dst).unwrap()).as_secs_f64())
        .skip(2)
        .collect();
    v.sort_by(f64::total_cmp);
    2.0 * n as f64 / v[v.len() / 2]
}

/// Median seconds per call over 5 batches (after a warm-up batch), CUDA events.
fn quick_time(s: &Arc<CudaStream>, per_batch: u64, mut f: impl FnMut(u64)) -> f64 {
    event_time(s, per_batch.min(3), &mut f);
    let mut v: Vec<f64> = (0..5)
        .map(|_| event_time(s, per_batch, &mut f).as_secs_f64() / per_batch as f64)
        .collect();
    v.sort_by(f64::total_cmp);
    v[2]
}

struct Shape {
    name: &'static str,
    k: usize,
    n: usize,
    weights: Vec<CudaSlice<bf16>>,
}

fn main() {
    let Some(g) = freekv_kernels::testing::gpu() else {
        return;
    };
    let s = g.stream().clone();
    println!("device: {}", g.info());
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(150))
        .measurement_time(Duration::from_millis(400))
        .sample_size(10)
        .configure_from_args();
    let bw = copy_bandwidth(&s);
    println!("device-copy bandwidth: {:.0} GB/s (read + write)", bw / 1e9);
    let init = InitKernels::load(&g).unwrap();
    let gemm = Gemm::with_workspace(s.clone(), 32 << 20).unwrap();
    let gv = g.kernels().gemv();
    // Per-kernel figures without programmatic launches (back-to-back launches of one kernel
    // would overlap each other's tails); the layer graphs below measure them.
    gv.set_pdl(false);
    let max_t = *TOKENS.iter().max().unwrap_or(&8);
    let xs = random_bf16(&init, &s, max_t * 14336, 1, 1.0, 0.0);
    let mut ys = s.alloc_zeros::<bf16>(max_t * 128_256).unwrap();
    let mut shapes = Vec::new();
    for (i, &(name, k, n)) in SHAPES.iter().enumerate() {
        let bytes = k * n * 2;
        let copies = ROTATION_BYTES.div_ceil(bytes).max(1);
        let weights = (0..copies)
            .map(|j| random_bf16(&init, &s, k * n, 100 + (i * 64 + j) as u64, 0.02, 0.0))
            .collect();
        shapes.push(Shape {
            name,
            k,
            n,
            weights,
        });
    }
    s.synchronize().unwrap();

    if std::env::var("FREEKV_GEMV_SWEEP").map_or(true, |v| v != "0") {
        println!(
            "\nsweep (CUDA events, median of 5 batches; a tuning aid, not a criterion figure): GB/s of weights"
        );
        println!("| product | t | cuBLAS | auto (R, threads) | best (R, threads) |");
        println!("|---|---|---|---|---|");
        for sh in &shapes {
            let bytes = (sh.k * sh.n * 2) as f64;
            let per_batch = ((2e-3 * 4e12 / bytes) as u64).clamp(4, 200);
            for &t in &TOKENS {
                let d = LinearDims {
                    tokens: t,
                    in_features: sh.k,
                    out_features: sh.n,
                };
                let nw = sh.weights.len() as u64;
                let cub = quick_time(&s, per_batch, |i| {
                    gemm.linear(&xs, &sh.weights[(i % nw) as usize], &mut ys, d, false)
                        .unwrap()
                });
                let auto = GemvConfig::auto(d);
                let mut best = (f64::INFINITY, auto);
                let mut auto_t = f64::NAN;
                for cfg in GemvConfig::candidates(t).into_iter().chain([auto]) {
                    let tm = quick_time(&s, per_batch, |i| {
                        gv.linear_with(
                            &s,
                            &xs,
                            &sh.weights[(i % nw) as usize],
                            &mut ys,
                            d,
                            false,
                            cfg,
                        )
                        .unwrap()
                    });
                    if cfg == auto {
                        auto_t = tm;
                    }
                    if tm < best.0 {
                        best = (tm, cfg);
                    }
                }
                println!(
                    "| {} {}x{} | {t} | {:.0} | {:.0} ({}, {}) | {:.0} ({}, {}) |",
                    sh.name,
                    sh.k,
                    sh.n,
                    bytes / cub / 1e9,
                    bytes / auto_t / 1e9,
                    auto.rows_per_block,
                    auto.threads,
                    bytes / best.0 / 1e9,
                    best.1.rows_per_block,
                    best.1.threads
                );
            }
        }
        println!();
        fusion_costs(&s, gv, &shapes, &xs, &init);
    }

    // Criterion: the auto launch shape against cuBLAS.
    let mut rows = Vec::new();
    for sh in &shapes {
        let bytes = (sh.k * sh.n * 2) as u64;
        let nw = sh.weights.len() as u64;
        let group = format!("gemv_{}_{}x{}", sh.name, sh.k, sh.n);
        for &t in &TOKENS {
            let d = LinearDims {
                tokens: t,
                in_features: sh.k,
                out_features: sh.n,
            };
            let tg = measure(
                &mut c,
                &group,
                BenchmarkId::new("gemv", t),
                Throughput::BytesDecimal(bytes),
                &s,
                |i| {
                    gv.linear(&s, &xs, &sh.weights[(i % nw) as usize], &mut ys, d, false)
                        .unwrap()
                },
            );
            let tc = measure(
                &mut c,
                &group,
                BenchmarkId::new("cublas", t),
                Throughput::BytesDecimal(bytes),
                &s,
                |i| {
                    gemm.linear(&xs, &sh.weights[(i % nw) as usize], &mut ys, d, false)
                        .unwrap()
                },
            );
            rows.push((sh.name, sh.k, sh.n, t, bytes as f64 / tg, bytes as f64 / tc));
        }
    }
    drop(shapes);

    let layer = bench_layer(&mut c, &g, &gemm, &init);
    c.final_summary();

    println!(
        "\n| product | t | gemv GB/s | % of copy | cuBLAS GB/s | % of copy | gemv / cuBLAS time |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, k, n, t, a, b) in &rows {
        println!(
            "| {name} {k}x{n} | {t} | {:.0} | {:.0} % | {:.0} | {:.0} % | {:.2} |",
            a / 1e9,
            100.0 * a / bw,
            b / 1e9,
            100.0 * b / bw,
            b / a
        );
    }
    println!("\nLlama-3.1-8B layer without attention (CUDA graph of 4 layers, per layer):");
    println!("| t | variant | µs per layer | × 32 layers ms | weight GB/s |");
    println!("|---|---|---|---|---|");
    for (t, name, secs, bytes) in layer {
        println!(
            "| {t} | {name} | {:.1} | {:.3} | {:.0} |",
            secs * 1e6,
            secs * 32.0 * 1e3,
            bytes / secs / 1e9
        );
    }
}

/// Sweep-style timings of the fused products against the plain ones on the same weights.
fn fusion_costs(
    s: &Arc<CudaStream>,
    gv: &freekv_kernels::ops::gemv::GemvKernels,
    shapes: &[Shape],
    xs: &CudaSlice<bf16>,
    init: &InitKernels,
) {
    let norm = random_bf16(init, s, 14336, 11, 0.5, 1.0);
    let mut out = s.alloc_zeros::<bf16>(8 * 28672).unwrap();
    println!("fused products against plain ones (CUDA events, GB/s of weights; a tuning aid):");
    println!("| product | t | plain | fused | fused variant |");
    println!("|---|---|---|---|---|");
    for sh in shapes.iter().filter(|sh| sh.name != "head") {
        let bytes = (sh.k * sh.n * 2) as f64;
        let per_batch = ((2e-3 * 4e12 / bytes) as u64).clamp(4, 200);
        let nw = sh.weights.len() as u64;
        for t in [1usize, 8] {
            let d = LinearDims {
                tokens: t,
                in_features: sh.k,
                out_features: sh.n,
            };
            let plain = quick_time(s, per_batch, |i| {
                gv.linear(s, xs, &sh.weights[(i % nw) as usize], &mut out, d, false)
                    .unwrap()
            });
            let (name, fused) = match sh.name {
                "qkv" => (
                    "rmsnorm_linear",
                    quick_time(s, per_batch, |i| {
                        gv.rmsnorm_linear(
                            s,
                            xs,
                            &norm,
                            1e-5,
                            &sh.weights[(i % nw) as usize],
                            &mut out,
                            d,
                        )
                        .unwrap()
                    }),
                ),
                "gate_up" => (
                    "rmsnorm_swiglu",
                    quick_time(s, per_batch, |i| {
                        let dh = LinearDims {
                            out_features: sh.n / 2,
                            ..d
                        };
                        gv.rmsnorm_swiglu(
                            s,
                            xs,
                            &norm,
                            1e-5,
                            &sh.weights[(i % nw) as usize],
                            &mut out,
                            dh,
                        )
                        .unwrap()
                    }),
                ),
                _ => (
                    "accumulate",
                    quick_time(s, per_batch, |i| {
                        gv.linear(s, xs, &sh.weights[(i % nw) as usize], &mut out, d, true)
                            .unwrap()
                    }),
                ),
            };
            println!(
                "| {} {}x{} | {t} | {:.0} | {:.0} | {name} |",
                sh.name,
                sh.k,
                sh.n,
                bytes / plain / 1e9,
                bytes / fused / 1e9
            );
        }
    }
    println!();
}

/// One Llama-3.1-8B layer's kernels other than attention, for `LAYERS` distinct layers' weights,
/// captured as one CUDA graph: today's sequence with cuBLAS products, the same with the `gemv`
/// products, and the fused sequence. Returns (tokens, variant, seconds per layer, weight bytes
/// per layer).
fn bench_layer(
    c: &mut Criterion,
    g: &Gpu,
    gemm: &Gemm,
    init: &InitKernels,
) -> Vec<(usize, &'static str, f64, f64)> {
    const LAYERS: usize = 4;
    let (h, nh, nkv, d, ff) = (4096usize, 32usize, 8usize, 128usize, 14336usize);
    let (qd, kvd) = (nh * d, nkv * d);
    let qkv_w = qd + 2 * kvd;
    let eps = 1e-5f32;
    let s = g.stream().clone();
    let k = g.kernels();
    let gv = k.gemv();
    struct Lw {
        an: CudaSlice<bf16>,
        wqkv: CudaSlice<bf16>,
        wo: CudaSlice<bf16>,
        fnw: CudaSlice<bf16>,
        wgu: CudaSlice<bf16>,
        wd: CudaSlice<bf16>,
    }
    let lw: Vec<Lw> = (0..LAYERS as u64)
        .map(|l| Lw {
            an: random_bf16(init, &s, h, 1000 + l, 0.5, 1.0),
            wqkv: random_bf16(init, &s, qkv_w * h, 2000 + l, 0.02, 0.0),
            wo: random_bf16(init, &s, h * qd, 3000 + l, 0.02, 0.0),
            fnw: random_bf16(init, &s, h, 4000 + l, 0.5, 1.0),
            wgu: random_bf16(init, &s, 2 * ff * h, 5000 + l, 0.02, 0.0),
            wd: random_bf16(init, &s, h * ff, 6000 + l, 0.02, 0.0),
        })
        .collect();
    let layer_bytes = (2 * (qkv_w * h + h * qd + 2 * ff * h + h * ff + 2 * h)) as f64;
    let page = 16usize;
    let geom = PageGeometry::new(page, nkv, d).unwrap();
    let pps = 16usize;
    let mut out = Vec::new();
    for t in [1usize, 8] {
        let mut x = random_bf16(init, &s, t * h, 7, 1.0, 0.0);
        let mut o = random_bf16(init, &s, t * h, 8, 0.1, 0.0);
        let mut xn = s.alloc_zeros::<bf16>(t * h).unwrap();
        let mut qkv = s.alloc_zeros::<bf16>(t * qkv_w).unwrap();
        let att = random_bf16(init, &s, t * qd, 9, 1.0, 0.0);
        let mut gu = s.alloc_zeros::<bf16>(t * 2 * ff).unwrap();
        let mut act = s.alloc_zeros::<bf16>(t * ff).unwrap();
        let mut pages = s.alloc_zeros::<bf16>(t * pps * geom.page_elems()).unwrap();
        let table = s
            .clone_htod(&(0..(t * pps) as i32).collect::<Vec<_>>())
            .unwrap();
        let positions = s.clone_htod(&vec![100i32; t]).unwrap();
        let token_seq = s.clone_htod(&(0..t as i32).collect::<Vec<_>>()).unwrap();
        let tl = PageTableLayout {
            num_seqs: t,
            stride: pps,
        };
        let rope = RopeConfig {
            theta: 500_000.0,
            style: RopeStyle::Normal,
            freq_factors: None,
        };
        let dims = |i: usize, o: usize| LinearDims {
            tokens: t,
            in_features: i,
            out_features: o,
        };
        let rope_layout = RopeLayout {
            tokens: t,
            heads: nh + nkv,
            head_dim: d,
            rows: Strided::contiguous(qkv_w),
        };
        let src = KvSource {
            tokens: t,
            k: Strided {
                offset: qd,
                stride: qkv_w,
            },
            v: Strided {
                offset: qd + kvd,
                stride: qkv_w,
            },
        };
        let rows = QkvRows::fused(t, nh, nkv, d);
        for variant in [
            "cublas_unfused",
            "gemv_unfused",
            "gemv_unfused_pdl",
            "gemv_fused",
            "gemv_fused_pdl",
        ] {
            gv.set_pdl(variant.ends_with("_pdl"));
            s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .unwrap();
            for w in &lw {
                if variant.starts_with("gemv_fused") {
                    gv.rmsnorm_linear(&s, &x, &w.an, eps, &w.wqkv, &mut qkv, dims(h, qkv_w))
                        .unwrap();
                    gv.rope_kv_append(
                        &s, &mut qkv, &rows, &positions, &rope, &mut pages, &geom, &table, &tl,
                        &token_seq,
                    )
                    .unwrap();
                    gv.linear(&s, &att, &w.wo, &mut x, dims(qd, h), true)
                        .unwrap();
                    gv.rmsnorm_swiglu(&s, &x, &w.fnw, eps, &w.wgu, &mut act, dims(h, ff))
                        .unwrap();
                    gv.linear(&s, &act, &w.wd, &mut x, dims(ff, h), true)
                        .unwrap();
                    continue;
                }
                let lin = |xx: &CudaSlice<bf16>,
                           ww: &CudaSlice<bf16>,
                           yy: &mut CudaSlice<bf16>,
                           dd: LinearDims| {
                    if variant.starts_with("gemv_unfused") {
                        gv.linear(&s, xx, ww, yy, dd, false).unwrap()
                    } else {
                        gemm.linear(xx, ww, yy, dd, false).unwrap()
                    }
                };
                k.add_rmsnorm(&s, &mut x, &o, &w.an, &mut xn, t, h, eps)
                    .unwrap();
                lin(&xn, &w.wqkv, &mut qkv, dims(h, qkv_w));
                k.rope(&s, &mut qkv, &rope_layout, &positions, &rope)
                    .unwrap();
                k.kv_append(
                    &s, &mut pages, &geom, &qkv, &qkv, &src, &table, &tl, &token_seq, &positions,
                )
                .unwrap();
                lin(&att, &w.wo, &mut o, dims(qd, h));
                k.add_rmsnorm(&s, &mut x, &o, &w.fnw, &mut xn, t, h, eps)
                    .unwrap();
                lin(&xn, &w.wgu, &mut gu, dims(h, 2 * ff));
                k.swiglu_fused(&s, &gu, &mut act, t, ff).unwrap();
                lin(&act, &w.wd, &mut o, dims(ff, h));
            }
            let graph = s
                .end_capture(CUgraphInstantiate_flags(0))
                .unwrap()
                .expect("captured graph");
            graph.upload().unwrap();
            let secs = measure(
                c,
                "decode_layer_llama8b_no_attention",
                BenchmarkId::new(variant, t),
                Throughput::BytesDecimal((layer_bytes * LAYERS as f64) as u64),
                &s,
                |_| graph.launch().unwrap(),
            ) / LAYERS as f64;
            out.push((t, variant, secs, layer_bytes));
        }
    }
    gv.set_pdl(false);
    out
}
