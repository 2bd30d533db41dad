//! GPU tests of the FreeKV data-movement kernels against CPU references: offload (summaries
//! bit-identical with `freekv_select::summarize_block`, host pages byte-identical with
//! `freekv_layout::nhd_to_hnd`), zero-copy gather, staging scatter, page copies, and the mapped
//! host buffer. Every test skips with one line without a GPU.

mod common;

use std::sync::Arc;

use common::{assert_bits_eq, down, permutation, rng, up};
use freekv_kernels::cudarc::driver::{CudaSlice, CudaStream};
use freekv_kernels::half::bf16;
use freekv_kernels::testing::gpu;
use freekv_kernels::{DeviceCounters, FreeKvShape, Gpu, HeadFilter, MappedHostBuffer};
use freekv_layout::{PageGeometry, hnd_unit_to_nhd_slice, nhd_to_hnd};
use freekv_select::{SummaryKind, summarize_block};
use rand::Rng;
use rand::rngs::StdRng;

/// Random bf16 values in [-4, 4) without zeros (signed zeros make max/min ambiguous), with
/// frequent exact repeats (ties in the summaries).
fn rand_keys(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| {
            let x = if rng.random_bool(0.2) {
                f32::from(rng.random_range(-3i8..=3)) + 0.5
            } else {
                rng.random_range(-4.0f32..4.0)
            };
            let b = bf16::from_f32(x);
            if b.to_f32() == 0.0 {
                bf16::from_f32(0.25)
            } else {
                b
            }
        })
        .collect()
}

fn shape(
    seqs: usize,
    kv_heads: usize,
    head_dim: usize,
    page_size: usize,
    top_k: usize,
    max_pages: usize,
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
        max_pages,
        spare_pages: 0,
    }
}

fn geom(s: &FreeKvShape) -> PageGeometry {
    PageGeometry::new(s.page_size, s.kv_heads, s.head_dim).unwrap()
}

/// `n` HND host pages in one mapped buffer, filled with random data, and their device addresses.
fn host_pages(
    g: &Gpu,
    rng: &mut StdRng,
    n: usize,
    page_elems: usize,
) -> (MappedHostBuffer<bf16>, Vec<u64>) {
    let mut buf = MappedHostBuffer::<bf16>::new(g.ctx(), n * page_elems).unwrap();
    buf.as_mut_slice()
        .copy_from_slice(&rand_keys(rng, n * page_elems));
    let addrs = (0..n)
        .map(|i| buf.device_ptr() + (i * page_elems * 2) as u64)
        .collect();
    (buf, addrs)
}

fn read_counters(s: &Arc<CudaStream>, c: &DeviceCounters) -> (u64, u64) {
    c.read(s).unwrap()
}

#[test]
fn offload_matches_summarize_block_and_nhd_to_hnd() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let k = g.kernels();
    let mut seed = 10;
    for &(bs, hkv, d, p) in &[
        (2, 3, 64, 8),
        (3, 8, 128, 16),
        (1, 8, 128, 32),
        (4, 3, 64, 32),
    ] {
        for kind in [SummaryKind::MinMax, SummaryKind::ArkVale] {
            seed += 1;
            let mut r = rng(seed);
            let mp = 6;
            let sh = shape(bs, hkv, d, p, 2, mp);
            let geo = geom(&sh);
            let pe = geo.page_elems();
            let src_pages = 5;
            let src = rand_keys(&mut r, src_pages * pe);
            let src_d = up(s, &src);
            // Host pages: every (seq, page) gets one, except (0, 1): address 0.
            let (host, addrs) = host_pages(&g, &mut r, bs * mp, pe);
            let mut table = addrs.clone();
            table[1] = 0;
            let table_d = up(s, &table);
            let before = host.as_slice().to_vec();
            // Entries: a few (seq, src page, logical page), one padding row, one missing page.
            let mut entries = Vec::new();
            let mut want_pages = Vec::new();
            for seq in 0..bs {
                for (j, lp) in [0usize, 3, 5].into_iter().enumerate() {
                    let sp = (seq + j * 2) % src_pages;
                    entries.extend([seq as i32, sp as i32, lp as i32]);
                    want_pages.push((seq, sp, lp));
                }
            }
            entries.extend([-1, 0, 0]);
            entries.extend([0, 2, 1]); // host page address 0: skipped
            let n = entries.len() / 3;
            let entries_d = up(s, &entries);
            let sum_len = bs * hkv * mp * 2 * d;
            let poison = f32::from_bits(0x7fc0_0001);
            let mut sums = up(s, &vec![poison; sum_len]);
            let counters = DeviceCounters::new(s).unwrap();
            k.freekv_offload(
                s,
                &sh,
                &src_d,
                &entries_d,
                n,
                &table_d,
                &mut sums,
                kind,
                Some(&counters),
            )
            .unwrap();
            let got = down(s, &sums);
            let (written, skipped) = read_counters(s, &counters);
            assert_eq!(written as usize, want_pages.len() * hkv);
            assert_eq!(skipped as usize, hkv, "the page with address 0");

            let mut want_sums = vec![poison; sum_len];
            let mut want_host = before.clone();
            for &(seq, sp, lp) in &want_pages {
                let page = &src[sp * pe..(sp + 1) * pe];
                let mut hnd = vec![bf16::ZERO; pe];
                nhd_to_hnd(geo, page, &mut hnd).unwrap();
                let at = (seq * mp + lp) * pe;
                want_host[at..at + pe].copy_from_slice(&hnd);
                for h in 0..hkv {
                    // Keys of head h: the first P rows of its HND unit.
                    let keys: Vec<f32> = hnd[h * 2 * p * d..h * 2 * p * d + p * d]
                        .iter()
                        .map(|x| x.to_f32())
                        .collect();
                    let (mut u, mut l) = (vec![0.0; d], vec![0.0; d]);
                    summarize_block(kind, &keys, d, &mut u, &mut l).unwrap();
                    let o = ((seq * hkv + h) * mp + lp) * 2 * d;
                    want_sums[o..o + d].copy_from_slice(&u);
                    want_sums[o + d..o + 2 * d].copy_from_slice(&l);
                }
            }
            for (i, (a, b)) in got.iter().zip(&want_sums).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{kind:?} bs {bs} hkv {hkv} d {d} p {p}: summary element {i}: got {a} want {b}"
                );
            }
            s.synchronize().unwrap();
            assert_bits_eq(
                &format!("{kind:?} bs {bs} hkv {hkv} d {d} p {p}: host pages"),
                host.as_slice(),
                &want_host,
            );
        }
    }
}

/// Random recall lists: per row up to k units, distinct ascending pages among `pages_avail`,
/// distinct slots in `0..nb`. Returns (count, list, flags).
fn random_lists(
    r: &mut StdRng,
    sh: &FreeKvShape,
    pages_avail: usize,
) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let (rows, k, nb) = (sh.rows(), sh.top_k, sh.slots());
    let mut count = vec![0i32; rows];
    let mut list = vec![-7i32; rows * k * 2];
    let mut flags = vec![0i32; rows];
    for row in 0..rows {
        let n = r.random_range(0..=k.min(pages_avail).min(nb));
        count[row] = n as i32;
        flags[row] = i32::from(r.random_bool(0.5));
        let mut pages = permutation(r, pages_avail)[..n].to_vec();
        pages.sort_unstable();
        let slots = permutation(r, nb);
        for i in 0..n {
            list[(row * k + i) * 2] = pages[i] as i32;
            list[(row * k + i) * 2 + 1] = slots[i] as i32;
        }
    }
    (count, list, flags)
}

/// CPU reference of a recall into NHD slots.
#[allow(clippy::too_many_arguments)]
fn reference_recall(
    sh: &FreeKvShape,
    host: &[bf16],
    page_index: &dyn Fn(usize, usize) -> Option<usize>,
    count: &[i32],
    list: &[i32],
    flags: &[i32],
    filter: HeadFilter,
    slots: &mut [bf16],
) -> usize {
    let geo = geom(sh);
    let (pe, ue, k, nb) = (
        geo.page_elems(),
        geo.head_unit_elems(),
        sh.top_k,
        sh.slots(),
    );
    let mut moved = 0;
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
            let Some(hp) = page_index(seq, page) else {
                continue;
            };
            let unit = &host[hp * pe + h * ue..hp * pe + (h + 1) * ue];
            let dst = &mut slots[(seq * nb + slot) * pe..(seq * nb + slot + 1) * pe];
            hnd_unit_to_nhd_slice(geo, h, unit, dst).unwrap();
            moved += 1;
        }
    }
    moved
}

#[test]
fn gather_matches_cpu_reference() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let k = g.kernels();
    let mut seed = 100;
    let cases = [
        (1, 3, 64, 8, 4),
        (2, 8, 128, 16, 3),
        (4, 3, 64, 32, 6),
        (3, 8, 128, 32, 5),
        (4, 8, 64, 16, 8),
    ];
    for &(bs, hkv, d, p, topk) in &cases {
        for filter in [HeadFilter::All, HeadFilter::Flagged, HeadFilter::Unflagged] {
            for max_blocks in [1usize, 3, 8, 64] {
                seed += 1;
                let mut r = rng(seed);
                let mp = 12;
                let sh = shape(bs, hkv, d, p, topk, mp);
                let geo = geom(&sh);
                let pe = geo.page_elems();
                let nb = sh.slots();
                // Host pages for (seq, page) in a shuffled order inside the buffer; page 7 of
                // seq 0 is not allocated (address 0).
                let order = permutation(&mut r, bs * mp);
                let (host, addrs) = host_pages(&g, &mut r, bs * mp, pe);
                let idx = |seq: usize, page: usize| -> Option<usize> {
                    if seq == 0 && page == 7 {
                        None
                    } else {
                        Some(order[seq * mp + page])
                    }
                };
                let table: Vec<u64> = (0..bs * mp)
                    .map(|i| idx(i / mp, i % mp).map_or(0, |j| addrs[j]))
                    .collect();
                let (count, list, flags) = random_lists(&mut r, &sh, mp);
                let init = rand_keys(&mut r, bs * nb * pe);
                let mut want = init.clone();
                let moved = reference_recall(
                    &sh,
                    host.as_slice(),
                    &idx,
                    &count,
                    &list,
                    &flags,
                    filter,
                    &mut want,
                );
                let mut slots = up(s, &init);
                let counters = DeviceCounters::new(s).unwrap();
                k.freekv_gather(
                    s,
                    &sh,
                    &up(s, &table),
                    &up(s, &count),
                    &up(s, &list),
                    &up(s, &flags),
                    filter,
                    &mut slots,
                    max_blocks,
                    Some(&counters),
                )
                .unwrap();
                let what =
                    format!("gather bs {bs} hkv {hkv} d {d} p {p} {filter:?} blocks {max_blocks}");
                assert_bits_eq(&what, &down(s, &slots), &want);
                let (units, skipped) = read_counters(s, &counters);
                assert_eq!(units as usize, moved, "{what}: units");
                // Every listed unit of a kept row is either moved or (page 7 of seq 0) skipped.
                let listed: usize = (0..sh.rows())
                    .filter(|&row| match filter {
                        HeadFilter::All => true,
                        HeadFilter::Flagged => flags[row] != 0,
                        HeadFilter::Unflagged => flags[row] == 0,
                    })
                    .map(|row| count[row] as usize)
                    .sum();
                assert_eq!((units + skipped) as usize, listed, "{what}: skipped");
            }
        }
    }
}

#[test]
fn gather_with_nothing_listed_writes_nothing() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let sh = shape(2, 3, 64, 8, 4, 8);
    let pe = geom(&sh).page_elems();
    let mut r = rng(7);
    let init = rand_keys(&mut r, sh.seqs * sh.slots() * pe);
    let mut slots = up(s, &init);
    let zeros = vec![0i32; sh.rows()];
    let list = vec![0i32; sh.rows() * sh.top_k * 2];
    let table = vec![0u64; sh.seqs * sh.max_pages];
    g.kernels()
        .freekv_gather(
            s,
            &sh,
            &up(s, &table),
            &up(s, &zeros),
            &up(s, &list),
            &up(s, &zeros),
            HeadFilter::All,
            &mut slots,
            8,
            None,
        )
        .unwrap();
    assert_bits_eq("untouched slots", &down(s, &slots), &init);
}

#[test]
fn scatter_matches_cpu_reference() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    for (i, &(bs, hkv, d, p)) in [(2, 3, 64, 8), (3, 8, 128, 32), (4, 8, 64, 16)]
        .iter()
        .enumerate()
    {
        let mut r = rng(300 + i as u64);
        let sh = shape(bs, hkv, d, p, 4, 8);
        let geo = geom(&sh);
        let (pe, ue, nb) = (geo.page_elems(), geo.head_unit_elems(), sh.slots());
        let n = 9;
        let staging = rand_keys(&mut r, n * ue);
        // Distinct (seq, slot, head) destinations; one padding unit and one out of range.
        let dests = permutation(&mut r, bs * nb * hkv);
        let mut units = Vec::new();
        for &x in &dests[..n - 2] {
            units.extend([
                (x / (nb * hkv)) as i32,
                ((x / hkv) % nb) as i32,
                (x % hkv) as i32,
            ]);
        }
        units.extend([-1, 0, 0]);
        units.extend([0, nb as i32, 0]);
        let init = rand_keys(&mut r, bs * nb * pe);
        let mut want = init.clone();
        for j in 0..n - 2 {
            let (seq, slot, h) = (
                units[3 * j] as usize,
                units[3 * j + 1] as usize,
                units[3 * j + 2] as usize,
            );
            let dst = &mut want[(seq * nb + slot) * pe..(seq * nb + slot + 1) * pe];
            hnd_unit_to_nhd_slice(geo, h, &staging[j * ue..(j + 1) * ue], dst).unwrap();
        }
        let mut slots = up(s, &init);
        let counters = DeviceCounters::new(s).unwrap();
        g.kernels()
            .freekv_scatter(
                s,
                &sh,
                &up(s, &staging),
                &up(s, &units),
                n,
                &mut slots,
                Some(&counters),
            )
            .unwrap();
        assert_bits_eq("scatter", &down(s, &slots), &want);
        assert_eq!(read_counters(s, &counters), ((n - 2) as u64, 1));
    }
}

#[test]
fn copy_pages_copies_listed_pages() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let mut r = rng(400);
    for pe in [2 * 8 * 3 * 64, 2 * 32 * 8 * 128] {
        let (ns, nd) = (5, 7);
        let src = rand_keys(&mut r, ns * pe);
        let init = rand_keys(&mut r, nd * pe);
        let pairs = vec![0, 6, 4, 0, 2, 3, 9, 1, 1, 99];
        let n = pairs.len() / 2;
        let mut want = init.clone();
        for q in pairs.chunks(2) {
            let (a, b) = (q[0] as usize, q[1] as usize);
            if a < ns && b < nd {
                want[b * pe..(b + 1) * pe].copy_from_slice(&src[a * pe..(a + 1) * pe]);
            }
        }
        let mut dst = up(s, &init);
        g.kernels()
            .copy_pages(s, &up(s, &src), &mut dst, &up(s, &pairs), n, pe)
            .unwrap();
        assert_bits_eq("copy_pages", &down(s, &dst), &want);
    }
}

#[test]
fn launchers_reject_bad_arguments() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let k = g.kernels();
    let sh = shape(2, 3, 64, 8, 4, 8);
    let pe = geom(&sh).page_elems();
    let small: CudaSlice<i32> = up(s, &[0i32; 2]);
    let table = up(s, &[0u64; 16]);
    let mut slots = up(s, &vec![bf16::ZERO; 2 * sh.slots() * pe]);
    // Lists too short for the shape.
    let e = k
        .freekv_gather(
            s,
            &sh,
            &table,
            &small,
            &small,
            &small,
            HeadFilter::All,
            &mut slots,
            8,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("recall_count"), "{e}");
    // max_blocks 0.
    let rows = up(s, &vec![0i32; sh.rows()]);
    let list = up(s, &vec![0i32; sh.rows() * sh.top_k * 2]);
    let e = k
        .freekv_gather(
            s,
            &sh,
            &table,
            &rows,
            &list,
            &rows,
            HeadFilter::All,
            &mut slots,
            0,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("max_blocks"), "{e}");
    // copy_pages with a page size that is not a multiple of 8.
    let e = k
        .copy_pages(s, &slots.clone(), &mut slots, &small, 1, 12)
        .unwrap_err();
    assert!(e.to_string().contains("multiple of 8"), "{e}");
}

#[test]
fn mapped_host_buffer_sizes_and_addresses() {
    let Some(g) = gpu() else { return };
    type New<T> = fn(
        &Arc<freekv_kernels::cudarc::driver::CudaContext>,
        usize,
    ) -> Result<MappedHostBuffer<T>, freekv_kernels::KernelError>;
    let ctors: [(&str, New<u32>); 2] = [
        ("cuMemHostAlloc", MappedHostBuffer::<u32>::new),
        ("registered", |c, n| {
            MappedHostBuffer::<u32>::new_registered(c, n, 4)
        }),
    ];
    // Overflowing and oversized requests are errors that say what to lower, never panics.
    for (name, e) in [
        (
            "alloc",
            MappedHostBuffer::<u64>::new(g.ctx(), usize::MAX).unwrap_err(),
        ),
        (
            "alloc",
            MappedHostBuffer::<u8>::new(g.ctx(), (1usize << 40) + 1).unwrap_err(),
        ),
        (
            "registered",
            MappedHostBuffer::<u64>::new_registered(g.ctx(), usize::MAX, 8).unwrap_err(),
        ),
        (
            "registered",
            MappedHostBuffer::<u8>::new_registered(g.ctx(), (1usize << 40) + 1, 1).unwrap_err(),
        ),
    ] {
        assert!(e.to_string().contains("lower"), "{name}: {e}");
    }
    let s = g.stream();
    for (name, new) in ctors {
        let mut b = new(g.ctx(), 1000).unwrap();
        assert_eq!(b.len(), 1000);
        assert_eq!(b.bytes(), 4000);
        assert!(
            b.as_slice().iter().all(|&x| x == 0),
            "{name}: zero-initialised"
        );
        assert_ne!(b.device_ptr(), 0);
        assert_eq!(b.device_ptr() % 16, 0);
        // Host writes reach the device: a (pinned, asynchronous) copy out of the buffer returns
        // them. Kernel reads through `device_ptr` are exercised by the gather tests.
        for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
            *x = (i as u32).wrapping_mul(2_654_435_761);
        }
        let mut d: CudaSlice<u32> = s.alloc_zeros(1000).unwrap();
        s.memcpy_htod(&b, &mut d).unwrap();
        let back = down(s, &d);
        assert_eq!(back, b.as_slice(), "{name}");
        let empty = new(g.ctx(), 0).unwrap();
        assert!(empty.is_empty());
    }
    assert!(
        MappedHostBuffer::<u8>::new_registered(g.ctx(), 10, 0)
            .unwrap_err()
            .to_string()
            .contains("granule")
    );
    // A registered buffer of several pieces, each a whole number of 3 MiB granules (15 MiB):
    // one device address range; every granule (what the pool copies: a page) lies in one piece,
    // so device-side copies of the granules next to the pieces' boundaries work.
    let granule = 3 << 20;
    let n = (40 << 20) / 4;
    let mut big = MappedHostBuffer::<u32>::new_registered(g.ctx(), n, granule).unwrap();
    assert_eq!(big.registered_pieces(), 3);
    assert_eq!(
        MappedHostBuffer::<u32>::new(g.ctx(), 4)
            .unwrap()
            .registered_pieces(),
        0
    );
    assert!(big.as_slice().iter().all(|&x| x == 0), "zero-initialised");
    for (i, x) in big.as_mut_slice().iter_mut().enumerate() {
        *x = i as u32 ^ 0x5a5a_5a5a;
    }
    let gv = granule / 4;
    for block in [4, 5, 9, 10, 13] {
        let len = gv.min(n - block * gv);
        let mut d: CudaSlice<u32> = s.alloc_zeros(len).unwrap();
        {
            let (dst, _g) = freekv_kernels::cudarc::driver::DevicePtrMut::device_ptr_mut(&mut d, s);
            // SAFETY: `len` values of granule `block`, inside the mapped buffer (device address),
            // into a slice of `len` values.
            unsafe {
                freekv_kernels::cudarc::driver::sys::cuMemcpyDtoDAsync_v2(
                    dst,
                    big.device_ptr() + (4 * block * gv) as u64,
                    4 * len,
                    s.cu_stream(),
                )
            }
            .result()
            .unwrap();
        }
        let back = down(s, &d);
        assert_eq!(
            back,
            big.as_slice()[block * gv..block * gv + len],
            "granule {block}"
        );
    }
}
