//! Prefill-sized products: the native tensor-core GEMM (`kernels/gemm.cu`) against cuBLAS, side
//! by side, at Llama-3.1-8B's widths (fused QKV 4096→6144, O 4096→4096, gate/up 4096→14336,
//! down 14336→4096) for 512 and 4096 token rows, bf16 output. Each product is timed with CUDA
//! events (criterion `iter_custom`) for cuBLAS, the native GEMM with its automatic tile and with
//! each tile height; criterion's throughput is in FLOP (2·t·in·out), and a table of TFLOP/s
//! (medians of criterion's samples) and native / cuBLAS ratios follows.
//!
//! Prints "skipped: no CUDA device" and exits 0 without a GPU; without cuBLAS only the native
//! rows are measured.

mod common;

use std::time::Duration;

use common::{measure, random_bf16};

use criterion::{BenchmarkId, Criterion, Throughput};
use freekv_kernels::half::bf16;
use freekv_kernels::ops::gemm_native::{NATIVE_GEMM_BLOCK_M, NativeGemm, NativeGemmConfig};
use freekv_kernels::ops::init::InitKernels;
use freekv_kernels::{Gemm, LinearDims};

/// (name, in_features, out_features).
const SHAPES: [(&str, usize, usize); 4] = [
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("up", 4096, 14336),
    ("down", 14336, 4096),
];
const TOKENS: [usize; 2] = [512, 4096];

fn main() {
    let Some(g) = freekv_kernels::testing::gpu() else {
        return;
    };
    let s = g.stream().clone();
    println!("device: {}", g.info());
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(600))
        .sample_size(10)
        .configure_from_args();
    let init = InitKernels::load(&g).unwrap();
    let native = NativeGemm::for_stream(&s).unwrap();
    let cublas = match Gemm::with_workspace(s.clone(), 32 << 20) {
        Ok(c) => Some(c),
        Err(e) => {
            println!("cuBLAS unavailable ({e}): native rows only");
            None
        }
    };
    let max_t = TOKENS.iter().copied().max().unwrap_or(4096);
    let max_k = SHAPES.iter().map(|s| s.1).max().unwrap_or(14336);
    let max_n = SHAPES.iter().map(|s| s.2).max().unwrap_or(14336);
    let x = random_bf16(&init, &s, max_t * max_k, 1, 1.0, 0.0);
    let mut y = s.alloc_zeros::<bf16>(max_t * max_n).unwrap();
    // (shape, t, auto block_m, cuBLAS s, native auto s, native per tile s)
    let mut rows = Vec::new();
    for (i, &(name, k, n)) in SHAPES.iter().enumerate() {
        let w = random_bf16(&init, &s, n * k, 100 + i as u64, 0.02, 0.0);
        s.synchronize().unwrap();
        for &t in &TOKENS {
            let d = LinearDims {
                tokens: t,
                in_features: k,
                out_features: n,
            };
            let flops = (2 * t * k * n) as u64;
            let group = format!("gemm_prefill_{name}_{k}x{n}");
            let tc = match &cublas {
                Some(cb) => measure(
                    &mut c,
                    &group,
                    BenchmarkId::new("cublas", t),
                    Throughput::Elements(flops),
                    &s,
                    |_| cb.linear(&x, &w, &mut y, d, false).unwrap(),
                ),
                None => f64::NAN,
            };
            let auto = NativeGemmConfig::auto(d, native.sm_count());
            let ta = measure(
                &mut c,
                &group,
                BenchmarkId::new("native", t),
                Throughput::Elements(flops),
                &s,
                |_| native.linear(&s, &x, &w, &mut y, d, false).unwrap(),
            );
            let mut per_tile = Vec::new();
            for bm in NATIVE_GEMM_BLOCK_M {
                let cfg = NativeGemmConfig {
                    block_m: bm,
                    vector_loads: true,
                };
                let tt = measure(
                    &mut c,
                    &group,
                    BenchmarkId::new(format!("native_m{bm}"), t),
                    Throughput::Elements(flops),
                    &s,
                    |_| {
                        native
                            .linear_with(&s, &x, &w, &mut y, d, false, cfg)
                            .unwrap()
                    },
                );
                per_tile.push((bm, tt));
            }
            rows.push((name, k, n, t, auto.block_m, flops, tc, ta, per_tile));
        }
    }
    c.final_summary();

    let tf = |flops: u64, secs: f64| flops as f64 / secs / 1e12;
    println!("\nprefill-sized products, bf16 out, CUDA events (median of criterion's samples):");
    let tiles: Vec<String> = NATIVE_GEMM_BLOCK_M
        .iter()
        .map(|bm| format!("native m{bm} TFLOP/s"))
        .collect();
    println!(
        "| product | tokens | cuBLAS TFLOP/s | native TFLOP/s (auto tile) | {} | native / cuBLAS time |",
        tiles.join(" | ")
    );
    println!("|---|---|---|---|{}---|", "---|".repeat(tiles.len()));
    for (name, k, n, t, bm, flops, tc, ta, per_tile) in &rows {
        let per: Vec<String> = per_tile
            .iter()
            .map(|(_, secs)| format!("{:.0}", tf(*flops, *secs)))
            .collect();
        println!(
            "| {name} {k}x{n} | {t} | {:.0} | {:.0} (m{bm}) | {} | {:.2} |",
            tf(*flops, *tc),
            tf(*flops, *ta),
            per.join(" | "),
            ta / tc
        );
    }
}
