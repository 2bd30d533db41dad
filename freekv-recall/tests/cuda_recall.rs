//! GPU tests of `freekv_recall::cuda`: the host KV pool (growth in chunks, the byte limit,
//! release and reuse, the device address tables, offload round trips) and the three recall
//! executors (zero-copy gather, double-buffered streamed copy — blocking and asynchronous — and
//! the per-page baseline), each checked byte for byte against a CPU reference built from the same
//! host pages and recall lists, on host and device backing. Skips with one line without a GPU.

use std::collections::HashMap;
use std::sync::Arc;

use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use freekv_kernels::half::bf16;
use freekv_kernels::testing::gpu;
use freekv_kernels::{FreeKvShape, Gpu, HeadFilter};
use freekv_layout::{PageGeometry, hnd_unit_to_nhd_slice, nhd_to_hnd};
use freekv_recall::RecallError;
use freekv_recall::cuda::{
    Backing, CudaRecallCounters, GatherRecall, HostKvPool, HostPoolConfig, PerPageRecall,
    RecallLists, StreamedRecall,
};
use freekv_select::{SummaryKind, summarize_block};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn rand_bf16(r: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(r.random_range(-4.0f32..4.0)))
        .collect()
}

fn up<T: DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> CudaSlice<T> {
    s.clone_htod(v).unwrap()
}

fn down<T: DeviceRepr + Default + Clone>(s: &Arc<CudaStream>, d: &CudaSlice<T>) -> Vec<T> {
    s.synchronize().unwrap();
    let v = s.clone_dtoh(d).unwrap();
    s.synchronize().unwrap();
    v
}

fn bits_eq(what: &str, got: &[bf16], want: &[bf16]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!("{what}: element {i}: got {} want {}", got[i], want[i]);
    }
}

fn shape(
    seqs: usize,
    kv_heads: usize,
    head_dim: usize,
    page_size: usize,
    top_k: usize,
) -> FreeKvShape {
    FreeKvShape {
        seqs,
        kv_heads,
        group: 2,
        head_dim,
        page_size,
        sink_pages: 1,
        top_k,
        window_pages: 2,
        max_pages: 16,
        spare_pages: 0,
    }
}

fn geom(s: &FreeKvShape) -> PageGeometry {
    PageGeometry::new(s.page_size, s.kv_heads, s.head_dim).unwrap()
}

fn pool_cfg(
    sh: &FreeKvShape,
    layers: usize,
    chunk_pages: usize,
    max_bytes: Option<usize>,
    backing: Backing,
) -> HostPoolConfig {
    HostPoolConfig {
        layers,
        seqs: sh.seqs,
        max_pages: sh.max_pages,
        kv_heads: sh.kv_heads,
        page_elems: geom(sh).page_elems(),
        chunk_pages,
        max_bytes,
        backing,
        grow_ahead: false,
    }
}

#[test]
fn pool_grows_ahead_within_the_limit() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let sh = shape(3, 3, 64, 8, 4);
    let pb = geom(&sh).page_elems() * 2;
    let cfg = HostPoolConfig {
        grow_ahead: true,
        ..pool_cfg(&sh, 2, 4, Some(20 * pb), Backing::MappedHost)
    };
    let mut pool = HostKvPool::new(s, cfg).unwrap();
    pool.ensure_pages(s, 0, 3).unwrap(); // 6 pages: two chunks in line, 2 free: one ahead
    assert_eq!(
        (pool.bytes_reserved(), pool.pages_allocated()),
        (12 * pb, 6)
    );
    pool.ensure_pages(s, 1, 2).unwrap(); // 4 pages: 2 free + the chunk ahead; another ahead
    assert_eq!(
        (pool.bytes_reserved(), pool.pages_allocated()),
        (16 * pb, 10)
    );
    pool.ensure_pages(s, 2, 2).unwrap(); // the last chunk ahead reaches the limit
    assert_eq!(
        (pool.bytes_reserved(), pool.pages_allocated()),
        (20 * pb, 14)
    );
    pool.ensure_pages(s, 0, 4).unwrap(); // 2 pages: no growth past the limit
    assert_eq!(
        (pool.bytes_reserved(), pool.pages_allocated()),
        (20 * pb, 16)
    );
    // 6 more pages than the 4 free would pass the limit: an error, and nothing changes.
    let e = pool.ensure_pages(s, 1, 5).unwrap_err();
    assert!(matches!(e, RecallError::HostPoolFull { .. }), "{e:?}");
    assert_eq!(
        (pool.bytes_reserved(), pool.pages_allocated()),
        (20 * pb, 16)
    );
    assert_eq!(pool.seq_pages(1), 2);
    assert_eq!(pool.pages_free(), 4, "the last chunk ahead was taken in");
    // Every allocated page has its own address, in both layers' tables, and reads as zeros.
    let mut seen = std::collections::HashSet::new();
    for l in 0..2 {
        let t = down(s, pool.device_table(l).unwrap());
        for (seq, n) in [(0, 4), (1, 2), (2, 2)] {
            for p in 0..sh.max_pages {
                let a = t[seq * sh.max_pages + p];
                if p < n {
                    assert!(
                        a != 0 && seen.insert(a),
                        "layer {l} seq {seq} page {p}: {a:#x}"
                    );
                    let u = pool.read_unit(l, seq, p, 0).unwrap();
                    assert!(u.iter().all(|x| x.to_f32() == 0.0));
                } else {
                    assert_eq!(a, 0, "layer {l} seq {seq} page {p}");
                }
            }
        }
    }
    // A pool dropped while a chunk is being pinned ahead waits for it and frees it.
    let mut early = HostKvPool::new(
        s,
        HostPoolConfig {
            grow_ahead: true,
            ..pool_cfg(&sh, 2, 4, None, Backing::MappedHost)
        },
    )
    .unwrap();
    early.ensure_pages(s, 0, 1).unwrap();
    assert_eq!(early.bytes_reserved(), 8 * pb);
    drop(early);
    // Device backing never grows ahead.
    let mut dev = HostKvPool::new(
        s,
        HostPoolConfig {
            grow_ahead: true,
            ..pool_cfg(&sh, 2, 4, None, Backing::Device)
        },
    )
    .unwrap();
    dev.ensure_pages(s, 0, 1).unwrap();
    assert_eq!(dev.bytes_reserved(), 4 * pb);
}

#[test]
fn pool_grows_in_chunks_respects_the_limit_and_reuses_released_pages() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    for backing in [Backing::MappedHost, Backing::Device] {
        let sh = shape(3, 3, 64, 8, 4);
        let pb = geom(&sh).page_elems() * 2;
        let mut pool = HostKvPool::new(s, pool_cfg(&sh, 2, 4, Some(20 * pb), backing)).unwrap();
        assert_eq!((pool.bytes_reserved(), pool.pages_allocated()), (0, 0));
        pool.ensure_pages(s, 0, 3).unwrap(); // 6 pages: two chunks of 4
        assert_eq!((pool.bytes_reserved(), pool.pages_allocated()), (8 * pb, 6));
        pool.ensure_pages(s, 0, 2).unwrap(); // already there: no change
        assert_eq!(pool.pages_allocated(), 6);
        pool.ensure_pages(s, 1, 5).unwrap(); // 10 more: 2 free + two chunks
        assert_eq!(
            (pool.bytes_reserved(), pool.pages_allocated()),
            (16 * pb, 16)
        );
        // 6 more pages would pass the 20-page limit: an error naming it, and nothing changes.
        let e = pool.ensure_pages(s, 2, 3).unwrap_err();
        assert!(
            matches!(e, RecallError::HostPoolFull { limit_bytes, .. } if limit_bytes == (20 * pb) as u64),
            "{e:?}"
        );
        assert!(e.to_string().contains("lower"), "{e}");
        assert_eq!(
            (pool.bytes_reserved(), pool.pages_allocated()),
            (16 * pb, 16)
        );
        assert_eq!(pool.seq_pages(2), 0);
        pool.ensure_pages(s, 2, 2).unwrap(); // exactly up to the limit
        assert_eq!(
            (pool.bytes_reserved(), pool.pages_allocated()),
            (20 * pb, 20)
        );
        // Bad requests.
        assert!(matches!(
            pool.ensure_pages(s, 3, 1),
            Err(RecallError::InvalidRequest(_))
        ));
        assert!(matches!(
            pool.ensure_pages(s, 0, sh.max_pages + 1),
            Err(RecallError::InvalidRequest(_))
        ));
        assert!(
            pool.read_unit(0, 2, 2, 0).is_err(),
            "page 2 of seq 2 is not allocated"
        );
        assert!(pool.read_unit(0, 0, 0, 3).is_err(), "head out of range");

        // The device tables: non-zero, distinct, 16-byte aligned addresses exactly where pages
        // are allocated.
        let check_tables = |pool: &HostKvPool, pages: [usize; 3]| {
            let mut seen = std::collections::HashSet::new();
            for l in 0..2 {
                let t = down(s, pool.device_table(l).unwrap());
                for seq in 0..3 {
                    for p in 0..sh.max_pages {
                        let a = t[seq * sh.max_pages + p];
                        if p < pages[seq] {
                            assert!(
                                a != 0 && a % 16 == 0,
                                "layer {l} seq {seq} page {p}: {a:#x}"
                            );
                            assert!(seen.insert(a), "address {a:#x} handed out twice");
                        } else {
                            assert_eq!(a, 0, "layer {l} seq {seq} page {p}");
                        }
                    }
                }
            }
        };
        check_tables(&pool, [3, 5, 2]);

        // Release and reuse: no growth.
        pool.release_seq(s, 1).unwrap();
        assert_eq!(
            (pool.bytes_reserved(), pool.pages_allocated()),
            (20 * pb, 10)
        );
        assert_eq!(pool.pages_free(), 10);
        check_tables(&pool, [3, 0, 2]);
        pool.ensure_pages(s, 1, 4).unwrap();
        pool.ensure_pages(s, 2, 3).unwrap();
        assert_eq!(
            (pool.bytes_reserved(), pool.pages_allocated()),
            (20 * pb, 20)
        );
        check_tables(&pool, [3, 4, 3]);

        // Unbounded pools grow as needed.
        let mut big = HostKvPool::new(s, pool_cfg(&sh, 1, 3, None, backing)).unwrap();
        big.ensure_pages(s, 0, sh.max_pages).unwrap();
        assert_eq!(big.bytes_reserved(), 18 * pb);
        assert_eq!(big.pages_allocated(), sh.max_pages);
    }
}

#[test]
fn pool_offload_round_trips_pages_and_summaries() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let k = g.kernels();
    let mut r = StdRng::seed_from_u64(5);
    for backing in [Backing::MappedHost, Backing::Device] {
        for &(bs, hkv, d, p) in &[(2, 3, 64, 16), (1, 8, 128, 32)] {
            let sh = shape(bs, hkv, d, p, 4);
            let geo = geom(&sh);
            let pe = geo.page_elems();
            let mut pool = HostKvPool::new(s, pool_cfg(&sh, 2, 5, None, backing)).unwrap();
            for seq in 0..bs {
                pool.ensure_pages(s, seq, 4).unwrap();
            }
            let src_pages = 6;
            let src = rand_bf16(&mut r, src_pages * pe);
            // (seq, src page, logical page); the last names page 9 (not allocated): skipped.
            let mut entries = Vec::new();
            for seq in 0..bs {
                for lp in 0..4 {
                    entries.extend([seq as i32, ((seq + lp * 2) % src_pages) as i32, lp as i32]);
                }
            }
            entries.extend([0, 0, 9]);
            let n = entries.len() / 3;
            let mut sums: CudaSlice<f32> = s.alloc_zeros(bs * hkv * sh.max_pages * 2 * d).unwrap();
            let kind = SummaryKind::ArkVale;
            pool.offload(
                k,
                s,
                1,
                &sh,
                &up(s, &src),
                &up(s, &entries),
                n,
                &mut sums,
                kind,
            )
            .unwrap();
            let got_sums = down(s, &sums);
            assert_eq!(
                pool.offload_counters(s).unwrap(),
                (((n - 1) * hkv) as u64, hkv as u64)
            );
            for e in entries.chunks(3).take(n - 1) {
                let (seq, sp, lp) = (e[0] as usize, e[1] as usize, e[2] as usize);
                let mut hnd = vec![bf16::ZERO; pe];
                nhd_to_hnd(geo, &src[sp * pe..(sp + 1) * pe], &mut hnd).unwrap();
                for h in 0..hkv {
                    let unit = &hnd[h * 2 * p * d..(h + 1) * 2 * p * d];
                    bits_eq(
                        &format!("{backing:?} unit ({seq}, {lp}, {h})"),
                        &pool.read_unit(1, seq, lp, h).unwrap(),
                        unit,
                    );
                    let keys: Vec<f32> = unit[..p * d].iter().map(|x| x.to_f32()).collect();
                    let (mut u, mut l) = (vec![0.0; d], vec![0.0; d]);
                    summarize_block(kind, &keys, d, &mut u, &mut l).unwrap();
                    let o = ((seq * hkv + h) * sh.max_pages + lp) * 2 * d;
                    let want: Vec<u32> = u.iter().chain(&l).map(|x| x.to_bits()).collect();
                    let got: Vec<u32> =
                        got_sums[o..o + 2 * d].iter().map(|x| x.to_bits()).collect();
                    assert_eq!(got, want, "{backing:?} summary ({seq}, {lp}, {h})");
                }
            }
            // Layer 0 was not written.
            assert!(
                pool.read_unit(0, 0, 0, 0)
                    .unwrap()
                    .iter()
                    .all(|x| x.to_bits() == 0)
            );
        }
    }
}

/// One layer's test data: random host pages of every allocated (seq, page), written into the
/// pool, and their CPU copies.
struct Data {
    pages: HashMap<(usize, usize, usize), Vec<bf16>>,
    /// Allocated pages per sequence.
    n_pages: Vec<usize>,
}

fn fill_pool(
    s: &Arc<CudaStream>,
    pool: &mut HostKvPool,
    sh: &FreeKvShape,
    layers: usize,
    r: &mut StdRng,
) -> Data {
    let pe = geom(sh).page_elems();
    let n_pages: Vec<usize> = (0..sh.seqs)
        .map(|_| r.random_range(sh.top_k..=sh.max_pages - 2))
        .collect();
    let mut pages = HashMap::new();
    for (seq, &n) in n_pages.iter().enumerate() {
        pool.ensure_pages(s, seq, n).unwrap();
        for l in 0..layers {
            for p in 0..n {
                let v = rand_bf16(r, pe);
                pool.write_page(s, l, seq, p, &v).unwrap();
                pages.insert((l, seq, p), v);
            }
        }
    }
    Data { pages, n_pages }
}

/// Random lists: per row up to k distinct pages (ascending; one row also names a page that is not
/// allocated) into distinct slots of 0..nb.
fn random_lists(r: &mut StdRng, sh: &FreeKvShape, data: &Data) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let (rows, k, nb) = (sh.rows(), sh.top_k, sh.slots());
    let mut count = vec![0i32; rows];
    let mut list = vec![-1i32; rows * k * 2];
    let mut flags = vec![0i32; rows];
    for row in 0..rows {
        let seq = row / sh.kv_heads;
        let avail = data.n_pages[seq] + usize::from(row == 1); // row 1 may name an unallocated page
        let n = r.random_range(0..=k.min(nb));
        count[row] = n as i32;
        flags[row] = i32::from(r.random_bool(0.5));
        let mut pages: Vec<usize> = (0..avail).collect();
        pages.shuffle(r);
        let mut pages = pages[..n.min(avail)].to_vec();
        pages.sort_unstable();
        count[row] = pages.len() as i32;
        let mut slots: Vec<usize> = (0..nb).collect();
        slots.shuffle(r);
        for (i, &pg) in pages.iter().enumerate() {
            list[(row * k + i) * 2] = pg as i32;
            list[(row * k + i) * 2 + 1] = slots[i] as i32;
        }
    }
    (count, list, flags)
}

/// CPU reference; returns (units moved, units skipped).
#[allow(clippy::too_many_arguments)]
fn reference(
    sh: &FreeKvShape,
    data: &Data,
    layer: usize,
    count: &[i32],
    list: &[i32],
    flags: &[i32],
    filter: HeadFilter,
    slots: &mut [bf16],
) -> (u64, u64) {
    let geo = geom(sh);
    let (pe, ue, k, nb) = (
        geo.page_elems(),
        geo.head_unit_elems(),
        sh.top_k,
        sh.slots(),
    );
    let (mut moved, mut skipped) = (0, 0);
    for row in 0..sh.rows() {
        let keep = match filter {
            HeadFilter::All => true,
            HeadFilter::Flagged => flags[row] != 0,
            HeadFilter::Unflagged => flags[row] == 0,
        };
        if !keep {
            continue;
        }
        let (seq, h) = (row / sh.kv_heads, row % sh.kv_heads);
        for i in 0..count[row] as usize {
            let page = list[(row * k + i) * 2] as usize;
            let slot = list[(row * k + i) * 2 + 1] as usize;
            let Some(src) = data.pages.get(&(layer, seq, page)) else {
                skipped += 1;
                continue;
            };
            let dst = &mut slots[(seq * nb + slot) * pe..(seq * nb + slot + 1) * pe];
            hnd_unit_to_nhd_slice(geo, h, &src[h * ue..(h + 1) * ue], dst).unwrap();
            moved += 1;
        }
    }
    (moved, skipped)
}

#[derive(Clone, Copy, Debug)]
enum Exec {
    Gather,
    StreamedBlocking,
    StreamedAsync,
    PerPage,
}

#[allow(clippy::too_many_arguments)]
fn run_exec(
    g: &Arc<Gpu>,
    exec: Exec,
    sh: &FreeKvShape,
    pool: &HostKvPool,
    layer: usize,
    lists: &RecallLists<'_>,
    slots: &mut CudaSlice<bf16>,
    streamed: &StreamedRecall,
    per_page: &PerPageRecall,
) -> Option<CudaRecallCounters> {
    let s = g.stream();
    match exec {
        Exec::Gather => {
            GatherRecall::new(8)
                .recall(g.kernels(), s, sh, pool, layer, lists, slots)
                .unwrap();
            None
        }
        Exec::StreamedBlocking => Some(
            streamed
                .recall_blocking(s, pool, layer, lists, slots)
                .unwrap(),
        ),
        Exec::StreamedAsync => {
            let t = streamed.submit(s, pool, layer, lists, slots).unwrap();
            Some(streamed.wait(t, s).unwrap())
        }
        Exec::PerPage => Some(per_page.recall(s, pool, layer, lists, slots).unwrap()),
    }
}

#[test]
fn executors_match_the_cpu_reference() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let cases = [
        (1, 3, 64, 8, 4),
        (2, 8, 128, 16, 3),
        (4, 3, 64, 32, 6),
        (3, 8, 128, 32, 5),
        (4, 8, 64, 16, 7),
    ];
    let mut seed = 1000;
    for &(bs, hkv, d, p, k) in &cases {
        let sh = shape(bs, hkv, d, p, k);
        let pe = geom(&sh).page_elems();
        let streamed = StreamedRecall::new(&g, &sh).unwrap();
        let per_page = PerPageRecall::new(s, &sh).unwrap();
        for backing in [Backing::MappedHost, Backing::Device] {
            seed += 1;
            let mut r = StdRng::seed_from_u64(seed);
            let mut pool = HostKvPool::new(s, pool_cfg(&sh, 2, 7, None, backing)).unwrap();
            let data = fill_pool(s, &mut pool, &sh, 2, &mut r);
            for filter in [HeadFilter::All, HeadFilter::Flagged, HeadFilter::Unflagged] {
                let layer = r.random_range(0..2);
                let (count, list, flags) = random_lists(&mut r, &sh, &data);
                let (count_d, list_d, flags_d) = (up(s, &count), up(s, &list), up(s, &flags));
                let lists = RecallLists {
                    count: &count_d,
                    list: &list_d,
                    flags: &flags_d,
                    filter,
                };
                let init = rand_bf16(&mut r, bs * sh.slots() * pe);
                let mut want = init.clone();
                let (moved, skipped) =
                    reference(&sh, &data, layer, &count, &list, &flags, filter, &mut want);
                for exec in [
                    Exec::Gather,
                    Exec::StreamedBlocking,
                    Exec::StreamedAsync,
                    Exec::PerPage,
                ] {
                    let mut slots = up(s, &init);
                    let c = run_exec(
                        &g, exec, &sh, &pool, layer, &lists, &mut slots, &streamed, &per_page,
                    );
                    let what = format!(
                        "{exec:?} {backing:?} {filter:?} bs {bs} hkv {hkv} d {d} p {p} k {k}"
                    );
                    bits_eq(&what, &down(s, &slots), &want);
                    if let Some(c) = c {
                        assert_eq!((c.units, c.skipped), (moved, skipped), "{what}");
                        assert_eq!(c.bytes, moved * (2 * p * d * 2) as u64, "{what}");
                        assert_eq!(c.copies, moved, "{what}: one copy per unit");
                    }
                }
            }
        }
        assert_eq!(streamed.totals().jobs, 2 * 3 * 2);
        assert_eq!(per_page.totals().jobs, 2 * 3);
    }
}

#[test]
fn gather_counters_and_backings_agree() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let sh = shape(3, 8, 128, 32, 6);
    let pe = geom(&sh).page_elems();
    let mut r = StdRng::seed_from_u64(77);
    let mut host = HostKvPool::new(s, pool_cfg(&sh, 1, 16, None, Backing::MappedHost)).unwrap();
    let data = fill_pool(s, &mut host, &sh, 1, &mut r);
    // The same pages in a device-backed pool.
    let mut dev = HostKvPool::new(s, pool_cfg(&sh, 1, 16, None, Backing::Device)).unwrap();
    for (seq, &n) in data.n_pages.iter().enumerate() {
        dev.ensure_pages(s, seq, n).unwrap();
        for p in 0..n {
            dev.write_page(s, 0, seq, p, &data.pages[&(0, seq, p)])
                .unwrap();
        }
    }
    let (count, list, flags) = random_lists(&mut r, &sh, &data);
    let (count_d, list_d, flags_d) = (up(s, &count), up(s, &list), up(s, &flags));
    let lists = RecallLists {
        count: &count_d,
        list: &list_d,
        flags: &flags_d,
        filter: HeadFilter::All,
    };
    let init = rand_bf16(&mut r, sh.seqs * sh.slots() * pe);
    let mut want = init.clone();
    let (moved, skipped) = reference(
        &sh,
        &data,
        0,
        &count,
        &list,
        &flags,
        HeadFilter::All,
        &mut want,
    );
    let gather = GatherRecall::new(4).with_counters(s).unwrap();
    let mut outs = Vec::new();
    for pool in [&host, &dev] {
        let mut slots = up(s, &init);
        gather
            .recall(g.kernels(), s, &sh, pool, 0, &lists, &mut slots)
            .unwrap();
        outs.push(down(s, &slots));
    }
    bits_eq("host backing", &outs[0], &want);
    bits_eq("device backing = host backing", &outs[1], &outs[0]);
    let c = gather.counters(s, &sh).unwrap().unwrap();
    assert_eq!((c.units, c.skipped), (2 * moved, 2 * skipped));
    assert_eq!(c.bytes, 2 * moved * 16384);
}

#[test]
fn streamed_async_jobs_run_in_order() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let sh = shape(2, 8, 128, 16, 8);
    let pe = geom(&sh).page_elems();
    let mut r = StdRng::seed_from_u64(99);
    let layers = 3;
    let mut pool =
        HostKvPool::new(s, pool_cfg(&sh, layers, 32, None, Backing::MappedHost)).unwrap();
    let data = fill_pool(s, &mut pool, &sh, layers, &mut r);
    let streamed = StreamedRecall::new(&g, &sh).unwrap();
    // Two rounds over every layer, all submitted before any wait; round 2 writes the same slots
    // buffers as round 1 with other lists, so the FIFO order decides the final contents.
    let mut slots: Vec<CudaSlice<bf16>> = Vec::new();
    let mut wants = Vec::new();
    let mut keep = Vec::new();
    for _ in 0..layers {
        let init = rand_bf16(&mut r, sh.seqs * sh.slots() * pe);
        slots.push(up(s, &init));
        wants.push(init);
    }
    let mut tickets = Vec::new();
    for _round in 0..2 {
        for (l, dst) in slots.iter_mut().enumerate() {
            let (count, list, flags) = random_lists(&mut r, &sh, &data);
            let filter = HeadFilter::Unflagged;
            reference(&sh, &data, l, &count, &list, &flags, filter, &mut wants[l]);
            let bufs = (up(s, &count), up(s, &list), up(s, &flags));
            let lists = RecallLists {
                count: &bufs.0,
                list: &bufs.1,
                flags: &bufs.2,
                filter,
            };
            tickets.push(streamed.submit(s, &pool, l, &lists, dst).unwrap());
            keep.push(bufs); // the lists stay alive until the tickets are waited for
        }
    }
    let mut units = 0;
    for t in tickets {
        units += streamed.wait(t, s).unwrap().units;
    }
    for (l, d) in slots.iter().enumerate() {
        bits_eq(&format!("layer {l}"), &down(s, d), &wants[l]);
    }
    assert_eq!(streamed.totals().jobs, 2 * layers as u64);
    assert_eq!(streamed.totals().units, units);
    drop(keep);
}
