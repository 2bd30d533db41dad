//! Kernel timings on the GPU with CUDA events (`iter_custom`): decode attention at Llama-3.1-8B
//! per-layer shapes (32 query heads, 8 KV heads, d = 128, pages of 16 and of 32; d = 64 and other
//! group sizes; a device copy as the bandwidth ceiling), prefill attention,
//! the element-wise kernels, sampling and GEMMs (the `FREEKV_GEMM` backend, cuBLAS by default;
//! benches/gemm.rs sets the native GEMM against cuBLAS). Prints "skipped: no CUDA device" and
//! exits 0 where there is no GPU.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use freekv_kernels::{
    AttentionShape, Gpu, KvSource, LinearDims, PageTableLayout, PrefillPlan, RopeConfig,
    RopeLayout, RopeStyle, SamplingInputs, Strided,
};
use freekv_layout::PageGeometry;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const PAGE: usize = 16;

/// [`freekv_kernels::testing::gpu_time`], panicking on a driver error (benchmarks only).
fn gpu_time(s: &Arc<CudaStream>, iters: u64, mut f: impl FnMut()) -> Duration {
    freekv_kernels::testing::gpu_time(s, iters, |_| f()).unwrap()
}

fn zeros_bf16(s: &Arc<CudaStream>, n: usize) -> CudaSlice<bf16> {
    s.alloc_zeros::<bf16>(n).unwrap()
}

fn small_bf16(s: &Arc<CudaStream>, n: usize) -> CudaSlice<bf16> {
    let v: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32(((i * 7919) % 97) as f32 / 97.0 - 0.5))
        .collect();
    s.clone_htod(&v).unwrap()
}

fn identity_table(s: &Arc<CudaStream>, batch: usize, pages_per_seq: usize) -> CudaSlice<i32> {
    let t: Vec<i32> = (0..(batch * pages_per_seq) as i32).collect();
    s.clone_htod(&t).unwrap()
}

/// One decode-attention timing: `batch` sequences of `ctx` tokens, `hkv` KV heads of `d` dims,
/// `group` query heads per KV head, pages of `page` tokens; throughput = KV bytes read.
#[allow(clippy::too_many_arguments)]
fn decode_case(
    grp: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    g: &Gpu,
    id: BenchmarkId,
    (batch, ctx): (usize, usize),
    (hkv, group, d, page): (usize, usize, usize, usize),
) {
    let s = g.stream();
    let hq = hkv * group;
    let geom = PageGeometry::new(page, hkv, d).unwrap();
    let pps = ctx / page;
    let pages = small_bf16(s, batch * pps * geom.page_elems());
    let table = identity_table(s, batch, pps);
    let lens = s.clone_htod(&vec![ctx as i32; batch]).unwrap();
    let q = small_bf16(s, batch * hq * d);
    let mut out = zeros_bf16(s, batch * hq * d);
    let shape = AttentionShape {
        q_heads: hq,
        geom,
        table_stride: pps,
        q_rows: Strided::contiguous(hq * d),
        scale: None,
    };
    let plan = g.kernels().plan_decode(shape, batch, ctx).unwrap();
    let mut ws = s.alloc_zeros::<f32>(plan.workspace_len().max(1)).unwrap();
    let kv_bytes = (batch * ctx * hkv * d * 2 * 2) as u64;
    grp.throughput(Throughput::Bytes(kv_bytes));
    grp.bench_function(id, |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                g.kernels()
                    .decode_attention(s, &plan, &q, &pages, &table, &lens, &mut out, &mut ws)
                    .unwrap()
            })
        })
    });
}

fn bench_decode(c: &mut Criterion, g: &Gpu) {
    let mut grp = c.benchmark_group("decode_attention_llama8b_layer");
    for &(batch, ctx) in &[
        (1usize, 4096usize),
        (8, 4096),
        (32, 4096),
        (1, 32768),
        (8, 32768),
        (32, 32768),
    ] {
        let id = BenchmarkId::new(format!("b{batch}"), ctx);
        decode_case(&mut grp, g, id, (batch, ctx), (HKV, HQ / HKV, D, PAGE));
    }
    grp.finish();
    // The decoder's page size (32), other head dims and group sizes, and short contexts.
    let mut grp = c.benchmark_group("decode_attention_p32");
    for &(batch, ctx) in &[
        (1usize, 512usize),
        (1, 4096),
        (8, 4096),
        (1, 32768),
        (8, 32768),
    ] {
        let id = BenchmarkId::new(format!("d128_g4_b{batch}"), ctx);
        decode_case(&mut grp, g, id, (batch, ctx), (HKV, 4, 128, 32));
    }
    for &(hkv, group, d, batch, ctx) in &[
        (8usize, 4usize, 64usize, 1usize, 32768usize),
        (8, 4, 64, 8, 32768),
        (8, 8, 128, 1, 32768),
        (32, 1, 128, 1, 32768),
    ] {
        let id = BenchmarkId::new(format!("d{d}_g{group}_h{hkv}_b{batch}"), ctx);
        decode_case(&mut grp, g, id, (batch, ctx), (hkv, group, d, 32));
    }
    grp.finish();
    // The ceiling: a device-to-device copy of 1 GiB (throughput counts bytes read + written).
    let mut grp = c.benchmark_group("decode_attention_ceiling");
    let s = g.stream();
    let n = 1usize << 29;
    let src = zeros_bf16(s, n);
    let mut dst = zeros_bf16(s, n);
    grp.throughput(Throughput::Bytes((4 * n) as u64));
    grp.bench_function("dtod_copy_1GiB", |b| {
        b.iter_custom(|iters| gpu_time(s, iters, || s.memcpy_dtod(&src, &mut dst).unwrap()))
    });
    grp.finish();
}

fn bench_prefill(c: &mut Criterion, g: &Gpu) {
    let s = g.stream();
    let geom = PageGeometry::new(PAGE, HKV, D).unwrap();
    let mut grp = c.benchmark_group("prefill_attention_llama8b_layer");
    for &n in &[1024usize, 4096] {
        let pps = n / PAGE;
        let pages = small_bf16(s, pps * geom.page_elems());
        let table = identity_table(s, 1, pps);
        let lens = s.clone_htod(&[n as i32]).unwrap();
        let q_start = s.clone_htod(&[0i32, n as i32]).unwrap();
        let q = small_bf16(s, n * HQ * D);
        let mut out = zeros_bf16(s, n * HQ * D);
        let plan = PrefillPlan {
            shape: AttentionShape {
                q_heads: HQ,
                geom,
                table_stride: pps,
                q_rows: Strided::contiguous(HQ * D),
                scale: None,
            },
            batch: 1,
            total_q: n,
            max_q: n,
        };
        // Causal: QKᵀ and PV over half the square, 2 flops per multiply-add.
        let flops = (4 * HQ * D * n * (n + 1) / 2) as u64;
        grp.throughput(Throughput::Elements(flops));
        grp.bench_function(BenchmarkId::new("flops", n), |b| {
            b.iter_custom(|iters| {
                gpu_time(s, iters, || {
                    g.kernels()
                        .prefill_attention(s, &plan, &q, &q_start, &pages, &table, &lens, &mut out)
                        .unwrap()
                })
            })
        });
    }
    grp.finish();
}

fn bench_elementwise(c: &mut Criterion, g: &Gpu) {
    let s = g.stream();
    let k = g.kernels();
    let (rows, dim, ffn) = (32usize, 4096usize, 14336usize);
    let mut grp = c.benchmark_group("elementwise_b32_llama8b");
    let mut x = small_bf16(s, rows * dim);
    let res = small_bf16(s, rows * dim);
    let w = small_bf16(s, dim);
    let mut y = zeros_bf16(s, rows * dim);
    grp.bench_function("add_rmsnorm", |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                k.add_rmsnorm(s, &mut x, &res, &w, &mut y, rows, dim, 1e-5)
                    .unwrap()
            })
        })
    });
    let mut qkv = small_bf16(s, rows * (HQ + 2 * HKV) * D);
    let pos = s
        .clone_htod(&(0..rows as i32).map(|i| i * 100).collect::<Vec<_>>())
        .unwrap();
    let layout = RopeLayout {
        tokens: rows,
        heads: HQ,
        head_dim: D,
        rows: Strided {
            offset: 0,
            stride: (HQ + 2 * HKV) * D,
        },
    };
    let cfg = RopeConfig {
        theta: 500_000.0,
        style: RopeStyle::Neox,
        freq_factors: None,
    };
    grp.bench_function("rope_q", |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                k.rope(s, &mut qkv, &layout, &pos, &cfg).unwrap()
            })
        })
    });
    let gu = small_bf16(s, rows * 2 * ffn);
    let mut act = zeros_bf16(s, rows * ffn);
    grp.bench_function("swiglu_fused", |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                k.swiglu_fused(s, &gu, &mut act, rows, ffn).unwrap()
            })
        })
    });
    let geom = PageGeometry::new(PAGE, HKV, D).unwrap();
    let mut pages = zeros_bf16(s, rows * 4 * geom.page_elems());
    let table = identity_table(s, rows, 4);
    let seqs = s.clone_htod(&(0..rows as i32).collect::<Vec<_>>()).unwrap();
    let kpos = s.clone_htod(&vec![17i32; rows]).unwrap();
    let src = KvSource {
        tokens: rows,
        k: Strided {
            offset: HQ * D,
            stride: (HQ + 2 * HKV) * D,
        },
        v: Strided {
            offset: (HQ + HKV) * D,
            stride: (HQ + 2 * HKV) * D,
        },
    };
    let tl = PageTableLayout {
        num_seqs: rows,
        stride: 4,
    };
    grp.bench_function("kv_append", |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                k.kv_append(
                    s, &mut pages, &geom, &qkv, &qkv, &src, &table, &tl, &seqs, &kpos,
                )
                .unwrap()
            })
        })
    });
    grp.finish();
}

fn bench_sampling(c: &mut Criterion, g: &Gpu) {
    let s = g.stream();
    let k = g.kernels();
    let vocab = 128_256usize;
    let mut grp = c.benchmark_group("sampling_vocab128k");
    for &rows in &[1usize, 32] {
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 2_654_435_761) % 10_007) as f32 / 1000.0)
            .collect();
        let dl = s.clone_htod(&logits).unwrap();
        let mut out = s.alloc_zeros::<i32>(rows).unwrap();
        grp.bench_function(BenchmarkId::new("argmax", rows), |b| {
            b.iter_custom(|iters| {
                gpu_time(s, iters, || {
                    k.argmax(s, &dl, rows, vocab, &mut out).unwrap()
                })
            })
        });
        for &(topk, topp, name) in &[(40i32, 0.9f32, "top_k40_p0.9"), (0, 0.9, "top_p0.9")] {
            let (t, kk, p, u) = (
                s.clone_htod(&vec![0.8f32; rows]).unwrap(),
                s.clone_htod(&vec![topk; rows]).unwrap(),
                s.clone_htod(&vec![topp; rows]).unwrap(),
                s.clone_htod(&vec![0.37f32; rows]).unwrap(),
            );
            let inputs = SamplingInputs {
                temperature: &t,
                top_k: &kk,
                top_p: &p,
                uniform: &u,
            };
            grp.bench_function(BenchmarkId::new(name, rows), |b| {
                b.iter_custom(|iters| {
                    gpu_time(s, iters, || {
                        k.sample(s, &dl, rows, vocab, &inputs, &mut out).unwrap()
                    })
                })
            });
        }
    }
    grp.finish();
}

fn bench_gemm(c: &mut Criterion, g: &Gpu) {
    let s = g.stream();
    let (i, o) = (4096usize, 14336usize);
    let w = small_bf16(s, o * i);
    let mut grp = c.benchmark_group("gemm_bf16_4096x14336");
    for &t in &[1usize, 32, 512] {
        let x = small_bf16(s, t * i);
        let mut y = zeros_bf16(s, t * o);
        let dims = LinearDims {
            tokens: t,
            in_features: i,
            out_features: o,
        };
        grp.throughput(Throughput::Bytes((o * i * 2) as u64));
        grp.bench_function(BenchmarkId::new("tokens", t), |b| {
            b.iter_custom(|iters| {
                gpu_time(s, iters, || {
                    g.matmul().linear(&x, &w, &mut y, dims, false).unwrap()
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
    bench_decode(&mut c, &g);
    bench_prefill(&mut c, &g);
    bench_elementwise(&mut c, &g);
    bench_sampling(&mut c, &g);
    bench_gemm(&mut c, &g);
    c.final_summary();
}
