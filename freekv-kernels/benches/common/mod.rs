//! Helpers shared by the GPU product benches (`gemv`, `gemm`); benchmarks only, so driver errors
//! panic.

use std::sync::{Arc, Mutex};

use criterion::{BenchmarkId, Criterion, Throughput};
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use freekv_kernels::ops::init::InitKernels;

/// Criterion's measurement of one function with CUDA events (`f` gets the iteration index),
/// recording the per-iteration times of its samples; returns the median seconds per call of the
/// last 10 (criterion's measurement after its warm-up), for the summary tables.
pub fn measure(
    c: &mut Criterion,
    group: &str,
    id: BenchmarkId,
    throughput: Throughput,
    s: &Arc<CudaStream>,
    mut f: impl FnMut(u64),
) -> f64 {
    let samples = Arc::new(Mutex::new(Vec::<f64>::new()));
    let mut g = c.benchmark_group(group);
    g.throughput(throughput);
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let d = freekv_kernels::testing::gpu_time(s, iters, &mut f).unwrap();
            samples
                .lock()
                .unwrap()
                .push(d.as_secs_f64() / iters.max(1) as f64);
            d
        })
    });
    g.finish();
    let all = samples.lock().unwrap().clone();
    let mut v = all[all.len().saturating_sub(10)..].to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `n` seeded uniform bf16 values `offset + scale · U(−1, 1)` on the device.
pub fn random_bf16(
    init: &InitKernels,
    s: &Arc<CudaStream>,
    n: usize,
    seed: u64,
    scale: f32,
    offset: f32,
) -> CudaSlice<bf16> {
    let mut b = s.alloc_zeros::<bf16>(n).unwrap();
    init.uniform_bf16(s, &mut b, seed, scale, offset).unwrap();
    b
}
