//! Recall bandwidth on the GPU, timed with CUDA events (`iter_custom`): one layer's recall from
//! the pinned, mapped host pool into the NHD slots at Llama-3.1-8B geometry (P = 32, Hkv = 8,
//! d = 128: 16 KiB units) by
//!
//! * `gather_bN`: the zero-copy gather kernel with at most N blocks (N = 4, 8, 16, 32);
//! * `streamed_async` / `streamed_blocking`: the double-buffered streamed copy (one
//!   `cuMemcpyHtoDAsync` per unit, two staging buffers and streams; async = submit to the worker
//!   and make the timing stream wait for its done events);
//! * `per_page`: the ArkVale baseline (one `cuMemcpy2DAsync` per unit, blocking);
//! * `h2d_ceiling`: one pinned host-to-device copy of the same number of bytes.
//!
//! Shapes: 32 units per sequence (4 per KV head) for 1, 4 and 16 sequences, and 256 units per
//! (sequence, KV head) row for 1 and 4 sequences. Pages are drawn at random from a pool twice the
//! recalled size per sequence. Throughput is recalled bytes (GB/s = 10⁹ B/s). Prints "skipped:
//! no CUDA device" and exits 0 where there is no GPU.
//!
//! `FREEKV_RECALL_POOL_GIB=1,8,32` adds `cuda_recall_pool_size`: the gather (8 blocks) of 8
//! units per row for 16 sequences from pages drawn over a host pool of that many GiB, with
//! chunks from `cuMemHostAlloc` (`alloc`) and registered from the process's own memory as the
//! engine's pool grows ahead (`registered`): whether the gather slows down as the host KV grows
//! (the GPU's translation of host addresses).
//!
//! Run: `cargo bench -p freekv-recall --bench cuda_recall`

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream, DevicePtr, sys};
use freekv_kernels::half::bf16;
use freekv_kernels::{FreeKvShape, Gpu, HeadFilter, MappedHostBuffer};
use freekv_recall::cuda::{
    Backing, GatherRecall, HostKvPool, HostPoolConfig, PerPageRecall, RecallLists, StreamedRecall,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const P: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const UNIT_BYTES: usize = 2 * P * D * 2;

/// [`freekv_kernels::testing::gpu_time`], panicking on a driver error (benchmarks only).
fn gpu_time(s: &Arc<CudaStream>, iters: u64, mut f: impl FnMut()) -> Duration {
    freekv_kernels::testing::gpu_time(s, iters, |_| f()).unwrap()
}

struct Setup {
    shape: FreeKvShape,
    pool: HostKvPool,
    count: CudaSlice<i32>,
    list: CudaSlice<i32>,
    flags: CudaSlice<i32>,
    slots: CudaSlice<bf16>,
    units: usize,
}

/// `seqs` sequences, `per_row` units per (sequence, KV head) row (`k = per_row`), pages drawn
/// from `pool_pages` pages per sequence (default: twice the recalled ones, filled with random
/// values; a given pool is left as allocated and grows a chunk at a time, `grow_ahead` as the
/// engine's).
fn setup(
    g: &Gpu,
    seqs: usize,
    per_row: usize,
    pool_pages: Option<(usize, bool)>,
    rng: &mut StdRng,
) -> Setup {
    let s = g.stream();
    let pages = pool_pages.map_or(2 * per_row + 4, |p| p.0);
    let chunk_pages = if pool_pages.is_some() { 1024 } else { 256 };
    let shape = FreeKvShape {
        seqs,
        kv_heads: HKV,
        group: 4,
        head_dim: D,
        page_size: P,
        sink_pages: 1,
        top_k: per_row,
        window_pages: 2,
        max_pages: pages,
        spare_pages: 0,
    };
    let page_elems = 2 * P * HKV * D;
    let mut pool = HostKvPool::new(
        s,
        HostPoolConfig {
            layers: 1,
            seqs,
            max_pages: pages,
            kv_heads: HKV,
            page_elems,
            chunk_pages,
            max_bytes: None,
            backing: Backing::MappedHost,
            grow_ahead: pool_pages.is_some_and(|p| p.1),
        },
    )
    .unwrap();
    if pool_pages.is_some() {
        for seq in 0..seqs {
            for n in (chunk_pages / 2..pages)
                .step_by(chunk_pages / 2)
                .chain([pages])
            {
                pool.ensure_pages(s, seq, n).unwrap();
            }
        }
    } else {
        let page: Vec<bf16> = (0..page_elems)
            .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
            .collect();
        for seq in 0..seqs {
            pool.ensure_pages(s, seq, pages).unwrap();
            for p in 0..pages {
                pool.write_page(s, 0, seq, p, &page).unwrap();
            }
        }
    }
    let rows = seqs * HKV;
    let mut list = vec![0i32; rows * per_row * 2];
    for row in 0..rows {
        let mut pg: Vec<usize> = (0..pages).collect();
        pg.shuffle(rng);
        let mut pg = pg[..per_row].to_vec();
        pg.sort_unstable();
        for (i, &p) in pg.iter().enumerate() {
            list[(row * per_row + i) * 2] = p as i32;
            list[(row * per_row + i) * 2 + 1] = (1 + i) as i32; // the middle slots
        }
    }
    let nb = shape.slots();
    Setup {
        shape,
        pool,
        count: s.clone_htod(&vec![per_row as i32; rows]).unwrap(),
        list: s.clone_htod(&list).unwrap(),
        flags: s.alloc_zeros::<i32>(rows).unwrap(),
        slots: s.alloc_zeros::<bf16>(seqs * nb * page_elems).unwrap(),
        units: rows * per_row,
    }
}

fn bench_shape(c: &mut Criterion, g: &Arc<Gpu>, seqs: usize, per_row: usize, rng: &mut StdRng) {
    let s = g.stream();
    let mut st = setup(g, seqs, per_row, None, rng);
    let bytes = (st.units * UNIT_BYTES) as u64;
    let name = format!("cuda_recall_llama8b/{}units_per_row", per_row);
    let mut grp = c.benchmark_group(name);
    grp.throughput(Throughput::BytesDecimal(bytes));
    s.synchronize().unwrap();
    let rl = RecallLists {
        count: &st.count,
        list: &st.list,
        flags: &st.flags,
        filter: HeadFilter::All,
    };
    let id = |what: &str| BenchmarkId::new(what, format!("bs{seqs}_{}units", st.units));

    for blocks in [4usize, 8, 16, 32] {
        let gather = GatherRecall::new(blocks);
        grp.bench_function(id(&format!("gather_b{blocks}")), |b| {
            b.iter_custom(|iters| {
                gpu_time(s, iters, || {
                    gather
                        .recall(g.kernels(), s, &st.shape, &st.pool, 0, &rl, &mut st.slots)
                        .unwrap()
                })
            })
        });
    }

    let streamed = StreamedRecall::new(g, &st.shape).unwrap();
    grp.bench_function(id("streamed_async"), |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                let t = streamed.submit(s, &st.pool, 0, &rl, &mut st.slots).unwrap();
                streamed.wait(t, s).unwrap();
            })
        })
    });
    grp.bench_function(id("streamed_blocking"), |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                streamed
                    .recall_blocking(s, &st.pool, 0, &rl, &mut st.slots)
                    .unwrap();
            })
        })
    });

    let per_page = PerPageRecall::new(s, &st.shape).unwrap();
    grp.bench_function(id("per_page"), |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                per_page.recall(s, &st.pool, 0, &rl, &mut st.slots).unwrap();
            })
        })
    });

    // The link's ceiling for the same bytes: one pinned host-to-device copy.
    let host = MappedHostBuffer::<u8>::new(g.ctx(), bytes as usize).unwrap();
    let dev = s.alloc_zeros::<u8>(bytes as usize).unwrap();
    s.synchronize().unwrap();
    grp.bench_function(id("h2d_ceiling"), |b| {
        b.iter_custom(|iters| {
            gpu_time(s, iters, || {
                let (d, _g) = dev.device_ptr(s);
                // SAFETY: both buffers hold `bytes` bytes and outlive the copy (synchronised by
                // gpu_time before they can drop).
                unsafe {
                    sys::cuMemcpyHtoDAsync_v2(
                        d,
                        host.host_ptr() as *const std::ffi::c_void,
                        bytes as usize,
                        s.cu_stream(),
                    )
                }
                .result()
                .unwrap();
            })
        })
    });
    grp.finish();
    s.synchronize().unwrap();
}

/// The gather from host pools of growing size (`FREEKV_RECALL_POOL_GIB`), each with chunks
/// from `cuMemHostAlloc` and registered ones.
fn bench_pool_size(c: &mut Criterion, g: &Arc<Gpu>, gib: &[usize], rng: &mut StdRng) {
    let s = g.stream();
    let (seqs, per_row) = (16, 8);
    let mut grp = c.benchmark_group("cuda_recall_pool_size");
    let units = seqs * HKV * per_row;
    grp.throughput(Throughput::BytesDecimal((units * UNIT_BYTES) as u64));
    let gather = GatherRecall::new(8);
    for &size in gib {
        // A page holds the units of every KV head.
        let pages = (size << 30) / (seqs * HKV * UNIT_BYTES);
        if pages < per_row {
            continue;
        }
        for (name, registered) in [("alloc", false), ("registered", true)] {
            let mut st = setup(g, seqs, per_row, Some((pages, registered)), rng);
            s.synchronize().unwrap();
            let rl = RecallLists {
                count: &st.count,
                list: &st.list,
                flags: &st.flags,
                filter: HeadFilter::All,
            };
            let id = BenchmarkId::new(format!("gather_b8_{name}"), format!("{size}GiB"));
            grp.bench_function(id, |b| {
                b.iter_custom(|iters| {
                    gpu_time(s, iters, || {
                        gather
                            .recall(g.kernels(), s, &st.shape, &st.pool, 0, &rl, &mut st.slots)
                            .unwrap()
                    })
                })
            });
            s.synchronize().unwrap();
        }
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
        .measurement_time(Duration::from_millis(1500))
        .sample_size(10)
        .configure_from_args();
    let mut rng = StdRng::seed_from_u64(0x5EC4);
    for seqs in [1, 4, 16] {
        bench_shape(&mut c, &g, seqs, 4, &mut rng);
    }
    for seqs in [1, 4] {
        bench_shape(&mut c, &g, seqs, 256, &mut rng);
    }
    if let Ok(v) = std::env::var("FREEKV_RECALL_POOL_GIB") {
        let gib: Vec<usize> = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        bench_pool_size(&mut c, &g, &gib, &mut rng);
    }
    c.final_summary();
}
