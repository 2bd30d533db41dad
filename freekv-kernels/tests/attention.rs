//! Paged decode attention (split-K, GQA) and causal prefill attention against f64 CPU references
//! on the same bf16 inputs.
#![allow(clippy::needless_range_loop)] // index-based scalar references read like the math

mod common;

use common::*;
use freekv_kernels::cudarc::driver::{CudaSlice, DevicePtr};
use freekv_kernels::half::bf16;
use freekv_kernels::testing::gpu;
use freekv_kernels::{
    AttentionShape, DECODE_COMPACT_PAGES, DecodePlan, Gpu, HeadFilter, HeadMask, KernelError,
    PrefillPlan, Strided,
};
use freekv_layout::PageGeometry;
use rand::Rng;
use rand::rngs::StdRng;

/// A paged KV pool holding a batch of sequences; page ids shuffled, unused slots and pages NaN.
struct Paged {
    geom: PageGeometry,
    lens: Vec<usize>,
    stride: usize,
    table: Vec<i32>,
    pool: Vec<bf16>,
}

impl Paged {
    fn new(r: &mut StdRng, geom: PageGeometry, lens: &[usize]) -> Self {
        let p = geom.page_size;
        let stride = lens.iter().map(|&l| l.div_ceil(p)).max().unwrap_or(0) + 1;
        let used: usize = lens.iter().map(|&l| l.div_ceil(p)).sum();
        let num_pages = used + 2;
        let perm = permutation(r, num_pages);
        let mut table = vec![-1i32; lens.len() * stride];
        let mut next = 0;
        for (b, &l) in lens.iter().enumerate() {
            for lp in 0..l.div_ceil(p) {
                table[b * stride + lp] = perm[next] as i32;
                next += 1;
            }
        }
        let mut pool = vec![bf16::from_bits(NAN_BF16); num_pages * geom.page_elems()];
        let row = geom.kv_heads * geom.head_dim;
        for (b, &l) in lens.iter().enumerate() {
            for t in 0..l {
                let page = table[b * stride + t / p] as usize;
                for kv in 0..2 {
                    let at = page * geom.page_elems() + geom.nhd_index(kv, t % p, 0, 0);
                    let (lo, hi) = if kv == 0 { (-2.0, 2.0) } else { (-0.5, 1.5) };
                    for x in &mut pool[at..at + row] {
                        *x = bf16::from_f32(r.random_range(lo..hi));
                    }
                }
            }
        }
        Self {
            geom,
            lens: lens.to_vec(),
            stride,
            table,
            pool,
        }
    }

    /// K (kv = 0) or V (kv = 1) of token t, KV head h, of sequence b.
    fn row(&self, b: usize, t: usize, h: usize, kv: usize) -> &[bf16] {
        let p = self.geom.page_size;
        let page = self.table[b * self.stride + t / p] as usize;
        let at = page * self.geom.page_elems() + self.geom.nhd_index(kv, t % p, h, 0);
        &self.pool[at..at + self.geom.head_dim]
    }
}

/// Attention of one query vector over tokens 0..=last of sequence b, KV head h (f64).
fn attend(kv: &Paged, b: usize, h: usize, q: &[bf16], n: usize, scale: f64, out: &mut [f64]) {
    out.iter_mut().for_each(|o| *o = 0.0);
    if n == 0 {
        return;
    }
    let s: Vec<f64> = (0..n)
        .map(|t| {
            let k = kv.row(b, t, h, 0);
            q.iter()
                .zip(k)
                .map(|(a, c)| a.to_f32() as f64 * c.to_f32() as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut l = 0.0;
    for (t, &st) in s.iter().enumerate() {
        let p = (st - m).exp();
        l += p;
        for (o, v) in out.iter_mut().zip(kv.row(b, t, h, 1)) {
            *o += p * v.to_f32() as f64;
        }
    }
    out.iter_mut().for_each(|o| *o /= l);
}

/// Runs `f(i)` for i in 0..n on all cores and collects the results in order.
fn par_map<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |x| x.get())
        .min(n.max(1));
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    std::thread::scope(|sc| {
        for (ti, chunk) in out.chunks_mut(n.div_ceil(threads).max(1)).enumerate() {
            let f = &f;
            let base = ti * n.div_ceil(threads).max(1);
            sc.spawn(move || {
                for (j, slot) in chunk.iter_mut().enumerate() {
                    *slot = Some(f(base + j));
                }
            });
        }
    });
    out.into_iter().map(|x| x.unwrap()).collect()
}

fn decode_ref(kv: &Paged, q: &[bf16], q_rows: Strided, hq: usize) -> Vec<f64> {
    let d = kv.geom.head_dim;
    let group = hq / kv.geom.kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let per = par_map(kv.lens.len() * hq, |i| {
        let (b, h) = (i / hq, i % hq);
        let qv = &q[q_rows.offset + b * q_rows.stride + h * d..][..d];
        let mut o = vec![0.0; d];
        attend(kv, b, h / group, qv, kv.lens[b], scale, &mut o);
        o
    });
    per.concat()
}

struct DecodeCase {
    group: usize,
    kv_heads: usize,
    d: usize,
    page: usize,
    lens: Vec<usize>,
    fused_q: bool,
}

/// Runs one decode case under several plans; returns the worst relative error.
fn run_decode(g: &Gpu, r: &mut StdRng, c: &DecodeCase, plans: &[&str]) -> f64 {
    let s = g.stream();
    let geom = PageGeometry::new(c.page, c.kv_heads, c.d).unwrap();
    let hq = c.group * c.kv_heads;
    let kv = Paged::new(r, geom, &c.lens);
    let batch = c.lens.len();
    let q_rows = if c.fused_q {
        Strided {
            offset: 0,
            stride: (hq + 2 * c.kv_heads) * c.d,
        }
    } else {
        Strided::contiguous(hq * c.d)
    };
    let q = rand_bf16(r, batch * q_rows.stride, -2.0, 2.0);
    let want = decode_ref(&kv, &q, q_rows, hq);
    let (dq, dpool, dtab) = (up(s, &q), up(s, &kv.pool), up(s, &kv.table));
    let lens_i: Vec<i32> = c.lens.iter().map(|&l| l as i32).collect();
    let dlens = up(s, &lens_i);
    let max_len = *c.lens.iter().max().unwrap();
    let shape = AttentionShape {
        q_heads: hq,
        geom,
        table_stride: kv.stride,
        q_rows,
        scale: None,
    };
    let auto = g.kernels().plan_decode(shape, batch, max_len).unwrap();
    let mut worst = 0.0f64;
    for &which in plans {
        let plan: DecodePlan = match which {
            "auto" => auto,
            "chunk64" => auto.with_chunk(64),
            "single" => auto.with_chunk(max_len.max(1)),
            // Planned for shorter sequences than the real ones: the last split takes the rest.
            "underplanned" => g
                .kernels()
                .plan_decode(shape, batch, 100)
                .unwrap()
                .with_chunk(64),
            _ => unreachable!(),
        };
        let mut out = poison_bf16(s, batch * hq * c.d);
        let mut ws = poison_f32(s, plan.workspace_len().max(1));
        g.kernels()
            .decode_attention(s, &plan, &dq, &dpool, &dtab, &dlens, &mut out, &mut ws)
            .unwrap();
        let got_bits = down(s, &out);
        let got = f(&got_bits);
        let what = format!(
            "decode G={} Hkv={} d={} P={} plan={which} (splits {} chunk {} tile {})",
            c.group, c.kv_heads, c.d, c.page, plan.splits, plan.chunk, plan.group_tile
        );
        check_head_filter(
            g,
            r,
            c,
            &plan,
            (&dq, &dpool, &dtab, &dlens),
            &got_bits,
            &what,
        );
        check_page_mask(g, r, c, &plan, (&dq, &dpool, &dtab, &dlens), &what);
        worst = worst.max(assert_close(&what, &got, &want, TOL));
        // A zero-length sequence yields zeros.
        for (b, &l) in c.lens.iter().enumerate() {
            if l == 0 {
                assert!(
                    got[b * hq * c.d..(b + 1) * hq * c.d]
                        .iter()
                        .all(|&x| x == 0.0),
                    "{what}: empty sequence"
                );
            }
        }
    }
    worst
}

/// The head-filtered launches on fresh random flags: `Flagged` alone writes exactly the flagged
/// heads' rows of the unfiltered output and leaves the others untouched; `Unflagged` then
/// `Flagged` (sharing one workspace) reproduce the unfiltered output bit for bit.
fn check_head_filter(
    g: &Gpu,
    r: &mut StdRng,
    c: &DecodeCase,
    plan: &DecodePlan,
    (dq, dpool, dtab, dlens): DecodeInputs<'_>,
    want: &[bf16],
    what: &str,
) {
    let s = g.stream();
    let batch = c.lens.len();
    let hq = c.group * c.kv_heads;
    let flags: Vec<i32> = (0..batch * c.kv_heads)
        .map(|_| i32::from(r.random_bool(0.5)) * r.random_range(1..4))
        .collect();
    let dflags = up(s, &flags);
    let run = |filters: &[HeadFilter]| {
        let mut out = poison_bf16(s, batch * hq * c.d);
        let mut ws = poison_f32(s, plan.workspace_len().max(1));
        for &filter in filters {
            g.kernels()
                .decode_attention_heads(
                    s,
                    plan,
                    dq,
                    dpool,
                    dtab,
                    dlens,
                    &mut out,
                    &mut ws,
                    Some(HeadMask {
                        flags: &dflags,
                        filter,
                        pages: None,
                    }),
                )
                .unwrap();
        }
        down(s, &out)
    };
    let only_flagged = run(&[HeadFilter::Flagged]);
    for b in 0..batch {
        for h in 0..hq {
            let flagged = flags[b * c.kv_heads + h / c.group] != 0;
            let at = (b * hq + h) * c.d..(b * hq + h + 1) * c.d;
            for (i, (x, w)) in only_flagged[at.clone()].iter().zip(&want[at]).enumerate() {
                let expect = if flagged { w.to_bits() } else { NAN_BF16 };
                assert_eq!(
                    x.to_bits(),
                    expect,
                    "{what}: flagged-only launch, seq {b} head {h} dim {i} (flagged {flagged})"
                );
            }
        }
    }
    let both = run(&[HeadFilter::Unflagged, HeadFilter::Flagged]);
    assert!(
        both.iter()
            .zip(want)
            .all(|(x, w)| x.to_bits() == w.to_bits()),
        "{what}: unflagged + flagged launches differ from the unfiltered one"
    );
    let all = run(&[HeadFilter::All]);
    assert!(
        all.iter()
            .zip(want)
            .all(|(x, w)| x.to_bits() == w.to_bits()),
        "{what}: HeadFilter::All differs from the unfiltered launch"
    );
}

/// The per-head page mask on a fresh random mask: KV head h's output equals, bit for bit, an
/// unmasked launch whose page table lists only the pages h attends (the kernel compacts them;
/// for tables longer than DECODE_COMPACT_PAGES, a table with the skipped entries set to -1,
/// the invalid-page path); head-filtered launches with the mask reproduce the masked launch.
fn check_page_mask(
    g: &Gpu,
    r: &mut StdRng,
    c: &DecodeCase,
    plan: &DecodePlan,
    (dq, dpool, dtab, dlens): DecodeInputs<'_>,
    what: &str,
) {
    let s = g.stream();
    let batch = c.lens.len();
    let hq = c.group * c.kv_heads;
    let num_pages = dpool.len() / (2 * c.page * c.kv_heads * c.d);
    let mask: Vec<i32> = (0..num_pages * c.kv_heads)
        .map(|_| i32::from(r.random_bool(0.3)) * r.random_range(1..3))
        .collect();
    let dmask = up(s, &mask);
    let flags: Vec<i32> = (0..batch * c.kv_heads)
        .map(|_| i32::from(r.random_bool(0.5)))
        .collect();
    let dflags = up(s, &flags);
    let run = |table: &CudaSlice<i32>, heads: &[Option<HeadMask<'_>>]| {
        let mut out = poison_bf16(s, batch * hq * c.d);
        let mut ws = poison_f32(s, plan.workspace_len().max(1));
        for h in heads {
            g.kernels()
                .decode_attention_heads(s, plan, dq, dpool, table, dlens, &mut out, &mut ws, *h)
                .unwrap();
        }
        down(s, &out)
    };
    let mk = |filter| {
        Some(HeadMask {
            flags: &dflags,
            filter,
            pages: Some(&dmask),
        })
    };
    let masked = run(dtab, &[mk(HeadFilter::All)]);
    let table = down(s, dtab);
    let stride = table.len() / batch.max(1);
    // Tables up to DECODE_COMPACT_PAGES entries are compacted per KV head by the kernel: the
    // reference is then a table listing only the pages the head attends (in order) and the
    // length of their tokens; longer tables take the invalid-page path (entries set to -1).
    let compacted = stride <= DECODE_COMPACT_PAGES;
    let lens = &c.lens;
    for kvh in 0..c.kv_heads {
        let skip =
            |p: i32| p < 0 || (p as usize) >= num_pages || mask[p as usize * c.kv_heads + kvh] != 0;
        let (ref_table, ref_lens): (Vec<i32>, Vec<i32>) = if compacted {
            let mut t = vec![-1i32; table.len()];
            let mut l = vec![0i32; batch];
            for b in 0..batch {
                let row = &table[b * stride..(b + 1) * stride];
                let np = lens[b].div_ceil(c.page).min(stride);
                let mut n = 0;
                for (pi, &p) in row.iter().enumerate().take(np) {
                    if !skip(p) {
                        t[b * stride + n] = p;
                        n += 1;
                        l[b] += (lens[b] - pi * c.page).min(c.page) as i32;
                    }
                }
            }
            (t, l)
        } else {
            let t = table
                .iter()
                .map(|&p| if skip(p) && p >= 0 { -1 } else { p })
                .collect();
            (t, lens.iter().map(|&l| l as i32).collect())
        };
        let dl = up(s, &ref_lens);
        let want = {
            let mut out = poison_bf16(s, batch * hq * c.d);
            let mut ws = poison_f32(s, plan.workspace_len().max(1));
            g.kernels()
                .decode_attention_heads(
                    s,
                    plan,
                    dq,
                    dpool,
                    &up(s, &ref_table),
                    &dl,
                    &mut out,
                    &mut ws,
                    None,
                )
                .unwrap();
            down(s, &out)
        };
        for b in 0..batch {
            for h in kvh * c.group..(kvh + 1) * c.group {
                let at = (b * hq + h) * c.d..(b * hq + h + 1) * c.d;
                assert!(
                    masked[at.clone()]
                        .iter()
                        .zip(&want[at])
                        .all(|(x, w)| x.to_bits() == w.to_bits()),
                    "{what}: page mask, seq {b} query head {h}: differs from dropping its pages (compacted {compacted})"
                );
            }
        }
    }
    let split = run(dtab, &[mk(HeadFilter::Unflagged), mk(HeadFilter::Flagged)]);
    assert!(
        split
            .iter()
            .zip(&masked)
            .all(|(x, w)| x.to_bits() == w.to_bits()),
        "{what}: masked unflagged + flagged launches differ from the masked launch"
    );
}

type DecodeInputs<'a> = (
    &'a CudaSlice<bf16>,
    &'a CudaSlice<bf16>,
    &'a CudaSlice<i32>,
    &'a CudaSlice<i32>,
);

#[test]
fn decode_head_mask_rejects_short_buffers() {
    let Some(g) = gpu() else { return };
    let s = g.stream();
    let geom = PageGeometry::new(16, 2, 64).unwrap();
    let shape = AttentionShape {
        q_heads: 4,
        geom,
        table_stride: 2,
        q_rows: Strided::contiguous(4 * 64),
        scale: None,
    };
    let plan = g.kernels().plan_decode(shape, 3, 32).unwrap();
    let q = up(s, &vec![bf16::ZERO; 3 * 4 * 64]);
    let pool = up(s, &vec![bf16::ZERO; 4 * geom.page_elems()]);
    let table = up(s, &[0i32, 1, 2, 3, 0, 1]);
    let lens = up(s, &[32i32, 5, 0]);
    let mut out = poison_bf16(s, 3 * 4 * 64);
    let mut ws = poison_f32(s, plan.workspace_len().max(1));
    // Flags shorter than batch · kv_heads (3 · 2); a page mask shorter than num_pages · kv_heads
    // (4 · 2).
    let (short_flags, flags) = (up(s, &[1i32; 5]), up(s, &[1i32; 6]));
    let short_mask = up(s, &[0i32; 7]);
    let cases = [
        (&short_flags, HeadFilter::Flagged, None, "head flags"),
        (&flags, HeadFilter::All, Some(&short_mask), "page mask"),
    ];
    for (flags, filter, mask, what) in cases {
        let e = g
            .kernels()
            .decode_attention_heads(
                s,
                &plan,
                &q,
                &pool,
                &table,
                &lens,
                &mut out,
                &mut ws,
                Some(HeadMask {
                    flags,
                    filter,
                    pages: mask.map(|m| m as &dyn DevicePtr<i32>),
                }),
            )
            .unwrap_err();
        assert!(
            matches!(e, KernelError::InvalidArgument { .. }) && e.to_string().contains(what),
            "{e}"
        );
    }
}

#[test]
fn decode_gqa_groups_head_dims_page_sizes() {
    let Some(g) = gpu() else { return };
    let mut r = rng(0xDEC0);
    for group in [1usize, 3, 4, 8] {
        for d in [64usize, 128] {
            for page in [16usize, 32] {
                let c = DecodeCase {
                    group,
                    kv_heads: 2,
                    d,
                    page,
                    lens: vec![1, 17, 64, 300, 1000, 0, 129],
                    fused_q: (group + d / 64 + page / 16) % 2 == 0,
                };
                let e = run_decode(
                    &g,
                    &mut r,
                    &c,
                    &["auto", "chunk64", "single", "underplanned"],
                );
                println!("decode G={group} d={d} P={page}: worst rel err {e:.2e}");
            }
        }
    }
}

#[test]
fn decode_large_and_odd_groups() {
    let Some(g) = gpu() else { return };
    let mut r = rng(0xDEC1);
    for (group, kv_heads) in [(5usize, 2usize), (7, 4), (12, 1), (16, 2), (2, 8)] {
        let c = DecodeCase {
            group,
            kv_heads,
            d: 128,
            page: 16,
            lens: vec![513, 2, 77],
            fused_q: false,
        };
        let e = run_decode(&g, &mut r, &c, &["auto", "chunk64"]);
        println!("decode G={group} Hkv={kv_heads}: worst rel err {e:.2e}");
    }
}

#[test]
fn decode_long_context_split_k_8k_32k() {
    let Some(g) = gpu() else { return };
    let mut r = rng(0xDEC2);
    let cases = [
        DecodeCase {
            group: 4,
            kv_heads: 8,
            d: 128,
            page: 16,
            lens: vec![8192, 5000, 123],
            fused_q: true,
        },
        DecodeCase {
            group: 3,
            kv_heads: 3,
            d: 64,
            page: 32,
            lens: vec![8192, 8000],
            fused_q: false,
        },
        DecodeCase {
            group: 4,
            kv_heads: 8,
            d: 128,
            // 2049 table entries: past DECODE_COMPACT_PAGES, the page mask takes the
            // uncompacted path.
            page: 16,
            lens: vec![32768, 20000],
            fused_q: false,
        },
    ];
    for c in &cases {
        let e = run_decode(&g, &mut r, c, &["auto", "single"]);
        println!(
            "decode long lens={:?} G={} d={} P={}: worst rel err {e:.2e}",
            c.lens, c.group, c.d, c.page
        );
    }
}

#[test]
fn decode_rejects_bad_shapes() {
    let Some(g) = gpu() else { return };
    let geom = PageGeometry::new(16, 2, 96).unwrap();
    let shape = AttentionShape {
        q_heads: 4,
        geom,
        table_stride: 4,
        q_rows: Strided::contiguous(4 * 96),
        scale: None,
    };
    let e = g.kernels().plan_decode(shape, 1, 10).unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::InvalidArgument {
                kernel: "decode_attention",
                ..
            }
        ),
        "{e}"
    );
    let shape = AttentionShape {
        q_heads: 3,
        geom: PageGeometry::new(16, 2, 64).unwrap(),
        ..shape
    };
    assert!(g.kernels().plan_decode(shape, 1, 10).is_err());
}

/// Causal attention for the packed queries of every sequence (only rows in `check` tokens).
fn prefill_ref(
    kv: &Paged,
    q: &[bf16],
    q_rows: Strided,
    hq: usize,
    nq: &[usize],
    check: &[usize],
) -> Vec<f64> {
    let d = kv.geom.head_dim;
    let group = hq / kv.geom.kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    let mut starts = vec![0usize];
    for &n in nq {
        starts.push(starts.last().unwrap() + n);
    }
    let per = par_map(check.len() * hq, |i| {
        let (tok, h) = (check[i / hq], i % hq);
        let b = starts
            .iter()
            .rposition(|&st| st <= tok)
            .unwrap()
            .min(nq.len() - 1);
        let pos = kv.lens[b] - nq[b] + (tok - starts[b]);
        let qv = &q[q_rows.offset + tok * q_rows.stride + h * d..][..d];
        let mut o = vec![0.0; d];
        attend(kv, b, h / group, qv, pos + 1, scale, &mut o);
        o
    });
    per.concat()
}

#[allow(clippy::too_many_arguments)]
fn run_prefill(
    g: &Gpu,
    r: &mut StdRng,
    group: usize,
    kv_heads: usize,
    d: usize,
    page: usize,
    seqs: &[(usize, usize)],
    sample: Option<usize>,
) -> f64 {
    let s = g.stream();
    let geom = PageGeometry::new(page, kv_heads, d).unwrap();
    let hq = group * kv_heads;
    let lens: Vec<usize> = seqs.iter().map(|x| x.0).collect();
    let nq: Vec<usize> = seqs.iter().map(|x| x.1).collect();
    let kv = Paged::new(r, geom, &lens);
    let total_q: usize = nq.iter().sum();
    let fused = (group + d + page) % 2 == 1;
    let q_rows = if fused {
        Strided {
            offset: 0,
            stride: (hq + 2 * kv_heads) * d,
        }
    } else {
        Strided::contiguous(hq * d)
    };
    let q = rand_bf16(r, total_q * q_rows.stride, -2.0, 2.0);
    let check: Vec<usize> = match sample {
        None => (0..total_q).collect(),
        Some(n) => {
            let mut v: Vec<usize> = (0..n).map(|_| r.random_range(0..total_q)).collect();
            v.push(total_q - 1);
            v.push(0);
            v
        }
    };
    let want = prefill_ref(&kv, &q, q_rows, hq, &nq, &check);
    let mut q_start = vec![0i32];
    for &n in &nq {
        q_start.push(q_start.last().unwrap() + n as i32);
    }
    let lens_i: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    let (dq, dqs, dpool, dtab, dlens) = (
        up(s, &q),
        up(s, &q_start),
        up(s, &kv.pool),
        up(s, &kv.table),
        up(s, &lens_i),
    );
    let plan = PrefillPlan {
        shape: AttentionShape {
            q_heads: hq,
            geom,
            table_stride: kv.stride,
            q_rows,
            scale: None,
        },
        batch: seqs.len(),
        total_q,
        max_q: *nq.iter().max().unwrap(),
    };
    let mut out = poison_bf16(s, total_q * hq * d);
    g.kernels()
        .prefill_attention(s, &plan, &dq, &dqs, &dpool, &dtab, &dlens, &mut out)
        .unwrap();
    let all = f(&down(s, &out));
    assert!(
        all.iter().all(|x| x.is_finite()),
        "prefill: NaN or inf left in the output"
    );
    let got: Vec<f32> = check
        .iter()
        .flat_map(|&t| all[t * hq * d..(t + 1) * hq * d].to_vec())
        .collect();
    assert_close(
        &format!("prefill G={group} Hkv={kv_heads} d={d} P={page} seqs={seqs:?}"),
        &got,
        &want,
        TOL,
    )
}

#[test]
fn prefill_causal_ragged_chunked() {
    let Some(g) = gpu() else { return };
    let mut r = rng(0x9F11);
    // (kv length after the chunk, new query tokens): full prefill, chunked continuation, one token.
    let seqs = [
        (1usize, 1usize),
        (70, 70),
        (300, 45),
        (129, 1),
        (1000, 200),
        (64, 64),
    ];
    for group in [1usize, 3, 4, 8] {
        for d in [64usize, 128] {
            for page in [16usize, 32] {
                let e = run_prefill(&g, &mut r, group, 2, d, page, &seqs, None);
                println!("prefill G={group} d={d} P={page}: rel err {e:.2e}");
            }
        }
    }
}

#[test]
fn prefill_long_prompt() {
    let Some(g) = gpu() else { return };
    let mut r = rng(0x9F12);
    let e = run_prefill(
        &g,
        &mut r,
        4,
        2,
        128,
        16,
        &[(4096, 4096), (3000, 1000)],
        Some(96),
    );
    println!("prefill 4K: rel err {e:.2e}");
    let e = run_prefill(&g, &mut r, 3, 3, 64, 32, &[(8192, 2048)], Some(64));
    println!("prefill 8K context, 2K chunk: rel err {e:.2e}");
}
