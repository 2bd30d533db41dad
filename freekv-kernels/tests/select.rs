//! FreeKV selection kernels against the CPU reference: `freekv_select` (group scores bit for bit,
//! selected pages exactly as `freekv_select::Selector::select`, the slot diff exactly as
//! `freekv_layout::SlotTable::diff` over several consecutive steps) and `freekv_correction`
//! (flags exactly as `CorrectionPolicy::evaluate`, cosines within 1e-6 relative).
#![allow(clippy::needless_range_loop)] // index-based references read like the contract

mod common;

use common::*;
use freekv_kernels::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use freekv_kernels::cudarc::driver::{CudaSlice, DevicePtrMut};
use freekv_kernels::half::bf16;
use freekv_kernels::testing::gpu;
use freekv_kernels::{
    FreeKvShape, Gpu, HeadFilter, KernelError, SEQ_INFO_WIDTH, SelectCache, Strided,
};
use freekv_layout::{Budget, MiddleCache, SlotTable};
use freekv_select::{
    CorrectionAggregate, CorrectionPolicy, GroupPolicy, HeadSummaries, Selector, SelectorConfig,
    SummaryKind, score_key,
};
use rand::Rng;
use rand::rngs::StdRng;

/// Poison of the integer outputs (no valid answer takes it).
const JUNK: i32 = i32::MIN;
/// Tokens per page in these tests (only page counts matter to selection).
const P: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    d: usize,
    g: usize,
    hkv: usize,
    bs: usize,
    ns: usize,
    k: usize,
    nw: usize,
    mp: usize,
    steps: usize,
    /// Quantised summaries and queries: many exactly equal scores.
    ties: bool,
    /// The last sequence stays at N ≤ nb but is forced through modes 1 and 2 (k ≥ candidates,
    /// possibly no candidate at all).
    small_seq: bool,
    seed: u64,
}

impl Case {
    fn shape(&self) -> FreeKvShape {
        FreeKvShape {
            seqs: self.bs,
            kv_heads: self.hkv,
            group: self.g,
            head_dim: self.d,
            page_size: P,
            sink_pages: self.ns,
            top_k: self.k,
            window_pages: self.nw,
            max_pages: self.mp,
            spare_pages: 0,
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    launches: usize,
    active_rows: usize,
    skipped_rows: usize,
    table_rows: usize,
    recalls: usize,
    selected_pages: usize,
    score_values: usize,
    score_mismatches: usize,
}

/// `[rows][mp][2][d]` summaries: boxes `c ± r`; 10% of the pages copy an earlier page of the
/// same row (exactly tied scores whatever the query).
fn gen_summaries(rng: &mut StdRng, rows: usize, mp: usize, d: usize, ties: bool) -> Vec<f32> {
    let mut s = vec![0.0f32; rows * mp * 2 * d];
    for r in 0..rows {
        for p in 0..mp {
            let base = (r * mp + p) * 2 * d;
            if p > 0 && rng.random_bool(0.1) {
                let src = (r * mp + rng.random_range(0..p)) * 2 * d;
                s.copy_within(src..src + 2 * d, base);
                continue;
            }
            for i in 0..d {
                let (c, rad) = if ties {
                    (
                        rng.random_range(-2i32..=2) as f32 * 0.5,
                        rng.random_range(0i32..=1) as f32 * 0.5,
                    )
                } else {
                    (
                        rng.random_range(-1.0f32..1.0),
                        rng.random_range(0.0f32..0.5),
                    )
                };
                s[base + i] = c + rad;
                s[base + d + i] = c - rad;
            }
        }
    }
    s
}

fn gen_queries(rng: &mut StdRng, n: usize, ties: bool) -> Vec<f32> {
    (0..n)
        .map(|_| {
            if ties {
                rng.random_range(-1i32..=1) as f32
            } else {
                rng.random_range(-1.5f32..1.5)
            }
        })
        .collect()
}

/// Row `row`'s upper and lower summaries (`[mp][d]` each) out of `[rows][mp][2][d]`.
fn row_summaries(sums: &[f32], row: usize, mp: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut u = Vec::with_capacity(mp * d);
    let mut l = Vec::with_capacity(mp * d);
    for p in 0..mp {
        let base = (row * mp + p) * 2 * d;
        u.extend_from_slice(&sums[base..base + d]);
        l.extend_from_slice(&sums[base + d..base + 2 * d]);
    }
    (u, l)
}

/// The contract's slot diff on one row's device arrays (`mid`: k entries, `pm`: MP entries);
/// returns the recall list `(page, slot)`.
fn emulate_row(
    mode: i32,
    sel: &[usize],
    ns: usize,
    mid: &mut [i32],
    pm: &mut [i32],
) -> Vec<(i32, i32)> {
    if mode == 1 {
        mid.fill(-1);
        pm.fill(-1);
    }
    let in_sel = |p: i32| p >= 0 && sel.binary_search(&(p as usize)).is_ok();
    let mut free = Vec::new();
    for i in 0..mid.len() {
        let p = mid[i];
        if !in_sel(p) {
            if p >= 0 {
                pm[p as usize] = -1;
                mid[i] = -1;
            }
            free.push(i);
        }
    }
    let mut free = free.into_iter();
    let mut rec = Vec::new();
    for &p in sel {
        if mid.contains(&(p as i32)) {
            continue;
        }
        let i = free
            .next()
            .expect("a free middle slot for every missing page");
        mid[i] = p as i32;
        pm[p] = i as i32;
        rec.push((p as i32, (ns + i) as i32));
    }
    rec
}

/// The device arrays a [`SlotTable`] describes.
fn table_arrays(t: &SlotTable, ns: usize, k: usize, mp: usize) -> (Vec<i32>, Vec<i32>) {
    let mut mid = vec![-1; k];
    let mut pm = vec![-1; mp];
    for i in 0..k {
        if let Some(p) = t.page_in(ns + i) {
            mid[i] = p as i32;
            pm[p] = i as i32;
        }
    }
    (mid, pm)
}

fn passes(filter: HeadFilter, flag: i32) -> bool {
    match filter {
        HeadFilter::All => true,
        HeadFilter::Flagged => flag != 0,
        HeadFilter::Unflagged => flag == 0,
    }
}

/// Runs `c.steps` consecutive selections with `policy` and checks every output.
fn run_scenario(gpu: &Gpu, c: &Case, policy: GroupPolicy, kind: SummaryKind, st: &mut Stats) {
    let s = gpu.stream();
    let kern = gpu.kernels();
    let shape = c.shape();
    let (d, g, k, mp, ns) = (c.d, c.g, c.k, c.mp, c.ns);
    let hq = c.hkv * g;
    let rows = c.bs * c.hkv;
    let nb = shape.slots();
    let mut rng = rng(c.seed.wrapping_mul(31).wrapping_add(policy as u64));
    let sums = gen_summaries(&mut rng, rows, mp, d, c.ties);
    let d_sums = up(s, &sums);
    // Junk prior state: mode 1 must not depend on it.
    let mut mid_exp: Vec<i32> = (0..rows * k)
        .map(|_| rng.random_range(-1..mp as i32))
        .collect();
    let mut pm_exp: Vec<i32> = (0..rows * mp)
        .map(|_| rng.random_range(-1..k as i32))
        .collect();
    let mut d_mid = up(s, &mid_exp);
    let mut d_pm = up(s, &pm_exp);
    let mut d_scratch = poison_f32(s, shape.select_scratch_len());
    let budget = Budget::new(ns, k, c.nw, P).unwrap();
    let mut tables: Vec<SlotTable> = (0..rows).map(|_| SlotTable::new(budget)).collect();
    let mut init = vec![false; rows];
    let small = |b: usize| c.small_seq && b + 1 == c.bs;
    // Token counts: seq 0 sits at exactly nb pages (dense) and turns sparse at step 1; seq 1 (if
    // any besides the small one) is inactive at step 0; the others start anywhere.
    let max_start = mp - c.steps * 3;
    let mut len: Vec<usize> = (0..c.bs)
        .map(|b| {
            if small(b) {
                rng.random_range(1..=nb) * P - rng.random_range(0..P)
            } else if b == 0 && c.bs > 1 {
                nb * P
            } else if b == 1 && c.bs > 2 {
                0
            } else {
                let lo = (nb * P).saturating_sub(2 * P).max(1).max(max_start * P / 2);
                rng.random_range(lo..=max_start * P)
            }
        })
        .collect();
    let selector = Selector::new(SelectorConfig {
        top_k: k,
        sink_pages: ns,
        window_pages: c.nw,
        policy,
        summary: kind,
    })
    .unwrap();
    for b in 0..c.bs {
        for h in 0..c.hkv {
            tables[b * c.hkv + h].append_tokens(len[b]).unwrap();
        }
    }
    for step in 0..c.steps {
        if step > 0 {
            for b in 0..c.bs {
                let add = if small(b) {
                    0
                } else if b == 0 && c.bs > 1 && step == 1 {
                    1
                } else if b == 1 && c.bs > 2 && step == 1 {
                    rng.random_range(nb * P + 1..=max_start * P)
                } else {
                    rng.random_range(0..=2 * P)
                };
                let add = add.min(mp * P - len[b]);
                len[b] += add;
                for h in 0..c.hkv {
                    tables[b * c.hkv + h].append_tokens(add).unwrap();
                }
            }
        }
        let n_pages: Vec<usize> = len.iter().map(|l| l.div_ceil(P)).collect();
        let mode: Vec<i32> = (0..c.bs)
            .map(|b| {
                let all_init = (0..c.hkv).all(|h| init[b * c.hkv + h]);
                if n_pages[b] == 0 || (n_pages[b] <= nb && !small(b)) {
                    0
                } else if all_init {
                    2
                } else {
                    1
                }
            })
            .collect();
        let filter = [HeadFilter::All, HeadFilter::Flagged, HeadFilter::Unflagged][step % 3];
        let flags: Vec<i32> = (0..rows).map(|_| rng.random_range(0..=1)).collect();
        let q = gen_queries(&mut rng, c.bs * hq * d, c.ties);
        let mut info = vec![0i32; c.bs * SEQ_INFO_WIDTH];
        for b in 0..c.bs {
            info[b * SEQ_INFO_WIDTH] = n_pages[b] as i32;
            info[b * SEQ_INFO_WIDTH + 1] = mode[b];
            info[b * SEQ_INFO_WIDTH + 2] = -1;
        }
        let (d_q, d_info, d_flags) = (up(s, &q), up(s, &info), up(s, &flags));
        let mut d_rc = poison_i32(s, rows);
        let mut d_rl = poison_i32(s, rows * k * 2);
        let mut d_sel = poison_i32(s, rows * k);
        let use_sel = step != 1;
        let sel_arg: Option<&mut dyn DevicePtrMut<i32>> =
            if use_sel { Some(&mut d_sel) } else { None };
        kern.freekv_select(
            s,
            &shape,
            policy,
            kind,
            &d_q,
            &d_sums,
            &d_info,
            &d_flags,
            filter,
            &mut d_mid,
            &mut d_pm,
            &mut d_rc,
            &mut d_rl,
            sel_arg,
            &mut d_scratch,
            None,
        )
        .unwrap();
        st.launches += 1;
        let (got_mid, got_pm) = (down(s, &d_mid), down(s, &d_pm));
        let (got_rc, got_rl, got_sel) = (down(s, &d_rc), down(s, &d_rl), down(s, &d_sel));
        let got_scratch = down(s, &d_scratch);
        let ctx = |b: usize, h: usize| {
            format!(
                "{} {policy} step {step} seq {b} head {h} (N {}, mode {}, filter {filter:?})",
                c.name, n_pages[b], mode[b]
            )
        };
        for b in 0..c.bs {
            for h in 0..c.hkv {
                let row = b * c.hkv + h;
                let n = n_pages[b];
                let rl_row = &got_rl[row * k * 2..(row + 1) * k * 2];
                let active =
                    matches!(mode[b], 1 | 2) && n > 0 && n <= mp && passes(filter, flags[row]);
                if !active {
                    assert_eq!(
                        got_rc[row],
                        0,
                        "{}: recall_count of a skipped row",
                        ctx(b, h)
                    );
                    assert!(
                        rl_row.iter().all(|&x| x == JUNK),
                        "{}: recall_list written",
                        ctx(b, h)
                    );
                    assert!(
                        got_sel[row * k..(row + 1) * k].iter().all(|&x| x == JUNK),
                        "{}: selected written",
                        ctx(b, h)
                    );
                    st.skipped_rows += 1;
                    continue;
                }
                st.active_rows += 1;
                let qh = &q[(b * hq + h * g) * d..(b * hq + (h + 1) * g) * d];
                let (u, l) = row_summaries(&sums, row, mp, d);
                let hs = HeadSummaries::new(kind, d, &u, &l).unwrap();
                let want = selector.select(qh, hs, n).unwrap();
                // group scores (scratch row 0 of this (seq, head)), bit for bit
                let nc = want.candidates().len();
                let got_scores = &got_scratch[row * g * mp..row * g * mp + nc];
                for (i, (gs, ws)) in got_scores.iter().zip(want.scores()).enumerate() {
                    st.score_values += 1;
                    if gs.to_bits() != ws.to_bits() {
                        if st.score_mismatches < 5 {
                            println!(
                                "{}: group score of page {} is {gs:e}, reference {ws:e}",
                                ctx(b, h),
                                want.candidates().start + i
                            );
                        }
                        st.score_mismatches += 1;
                    }
                }
                let mut want_sel: Vec<i32> = want.pages().iter().map(|&p| p as i32).collect();
                st.selected_pages += want_sel.len();
                want_sel.resize(k, -1);
                if use_sel {
                    assert_eq!(
                        &got_sel[row * k..(row + 1) * k],
                        &want_sel[..],
                        "{}: selected",
                        ctx(b, h)
                    );
                } else {
                    assert!(got_sel[row * k..(row + 1) * k].iter().all(|&x| x == JUNK));
                }
                let rec = emulate_row(
                    mode[b],
                    want.pages(),
                    ns,
                    &mut mid_exp[row * k..(row + 1) * k],
                    &mut pm_exp[row * mp..(row + 1) * mp],
                );
                assert_eq!(
                    got_rc[row] as usize,
                    rec.len(),
                    "{}: recall_count",
                    ctx(b, h)
                );
                for (m, &(p, sl)) in rec.iter().enumerate() {
                    assert_eq!(
                        (rl_row[2 * m], rl_row[2 * m + 1]),
                        (p, sl),
                        "{}: recall {m}",
                        ctx(b, h)
                    );
                }
                assert!(
                    rl_row[2 * rec.len()..].iter().all(|&x| x == JUNK),
                    "{}: recall_list tail",
                    ctx(b, h)
                );
                st.recalls += rec.len();
                if mode[b] == 1 {
                    init[row] = true;
                }
                // The same step through freekv-layout's SlotTable (engine states only).
                if n > nb {
                    let t = &mut tables[row];
                    if mode[b] == 1 {
                        t.evict_middle();
                    }
                    let diff = t.diff(want.pages()).unwrap();
                    let trec: Vec<(i32, i32)> = diff
                        .recalls
                        .iter()
                        .map(|sp| (sp.page as i32, sp.slot as i32))
                        .collect();
                    assert_eq!(trec, rec, "{}: SlotTable::diff recalls", ctx(b, h));
                    t.apply(&diff).unwrap();
                    t.check_consistency().unwrap();
                    let (tm, tp) = table_arrays(t, ns, k, mp);
                    assert_eq!(
                        &tm[..],
                        &mid_exp[row * k..(row + 1) * k],
                        "{}: table mid",
                        ctx(b, h)
                    );
                    assert_eq!(
                        &tp[..],
                        &pm_exp[row * mp..(row + 1) * mp],
                        "{}: table page_mid",
                        ctx(b, h)
                    );
                    st.table_rows += 1;
                }
            }
        }
        assert_eq!(
            got_mid, mid_exp,
            "{} {policy} step {step}: mid_page",
            c.name
        );
        assert_eq!(got_pm, pm_exp, "{} {policy} step {step}: page_mid", c.name);
    }
}

const CASES: [Case; 6] = [
    Case {
        name: "d128-g4",
        d: 128,
        g: 4,
        hkv: 2,
        bs: 3,
        ns: 2,
        k: 8,
        nw: 3,
        mp: 300,
        steps: 5,
        ties: false,
        small_seq: false,
        seed: 1,
    },
    Case {
        name: "d64-g3-k1-ties",
        d: 64,
        g: 3,
        hkv: 3,
        bs: 5,
        ns: 1,
        k: 1,
        nw: 1,
        mp: 60,
        steps: 6,
        ties: true,
        small_seq: true,
        seed: 2,
    },
    Case {
        name: "d64-g7-k64",
        d: 64,
        g: 7,
        hkv: 1,
        bs: 2,
        ns: 0,
        k: 64,
        nw: 4,
        mp: 3000,
        steps: 3,
        ties: false,
        small_seq: false,
        seed: 3,
    },
    Case {
        name: "d128-g1-ties",
        d: 128,
        g: 1,
        hkv: 4,
        bs: 4,
        ns: 4,
        k: 16,
        nw: 2,
        mp: 1200,
        steps: 4,
        ties: true,
        small_seq: false,
        seed: 4,
    },
    Case {
        name: "d256-g2-small",
        d: 256,
        g: 2,
        hkv: 2,
        bs: 3,
        ns: 2,
        k: 32,
        nw: 2,
        mp: 200,
        steps: 4,
        ties: false,
        small_seq: true,
        seed: 5,
    },
    Case {
        name: "d128-g4-16k",
        d: 128,
        g: 4,
        hkv: 1,
        bs: 2,
        ns: 16,
        k: 32,
        nw: 16,
        mp: 16384,
        steps: 2,
        ties: false,
        small_seq: false,
        seed: 6,
    },
];

#[test]
fn select_matches_cpu_reference_over_steps() {
    let Some(gpu) = gpu() else { return };
    let mut st = Stats::default();
    for c in &CASES {
        for (i, policy) in GroupPolicy::ALL.into_iter().enumerate() {
            let kind = SummaryKind::ALL[i % 2];
            run_scenario(&gpu, c, policy, kind, &mut st);
        }
    }
    println!(
        "freekv_select: {} launches, {} active rows exact ({} also via SlotTable), {} skipped rows untouched, {} pages selected, {} recalls, {} group scores ({} not bit-identical)",
        st.launches,
        st.active_rows,
        st.table_rows,
        st.skipped_rows,
        st.selected_pages,
        st.recalls,
        st.score_values,
        st.score_mismatches
    );
    assert!(st.active_rows > 0 && st.skipped_rows > 0 && st.recalls > 0 && st.table_rows > 0);
    assert_eq!(
        st.score_mismatches, 0,
        "group scores differ from freekv-select"
    );
}

/// Spare slots: a prefetching selection (filter All, `want` k + x) makes the top-(k + x)
/// resident, the others (all rows, or the flagged ones) the top-k while keeping cached pages,
/// overwriting the lowest-scored ones first; `selected` is always the
/// CPU top-k, the slot state and the recall lists follow `freekv_layout::MiddleCache` exactly,
/// and the page mask is its skip mask (sink and window entries never written).
#[test]
fn select_with_spare_slots_matches_cpu_ranking() {
    let Some(gpu) = gpu() else { return };
    let s = gpu.stream();
    let kern = gpu.kernels();
    for (ci, spare) in [(0usize, 5usize), (1, 2), (3, 16), (5, 7)] {
        let c = CASES[ci];
        let shape = c.shape().with_spare_pages(spare);
        let (d, g, k, mp) = (c.d, c.g, c.k, c.mp);
        let cap = shape.cache_pages();
        let (hq, rows, nb) = (c.hkv * g, c.bs * c.hkv, shape.slots());
        let mut r = rng(c.seed + 100);
        let sums = gen_summaries(&mut r, rows, mp, d, c.ties);
        let d_sums = up(s, &sums);
        let mut caches: Vec<MiddleCache> = (0..rows)
            .map(|_| MiddleCache::new(k, spare).unwrap())
            .collect();
        let mut mid_exp = vec![-1i32; rows * cap];
        let mut pm_exp = vec![-1i32; rows * mp];
        let mut mask_exp = vec![7i32; c.bs * nb * c.hkv];
        let (mut d_mid, mut d_pm, mut d_mask) = (up(s, &mid_exp), up(s, &pm_exp), up(s, &mask_exp));
        let mut d_scratch = poison_f32(s, shape.select_scratch_len());
        let nb0 = nb - spare;
        // Every sequence sparse from the start with room to grow.
        let mut n_pages: Vec<usize> = (0..c.bs)
            .map(|_| r.random_range(nb0 + 1..=(mp - 4 * c.steps).max(nb0 + 1)))
            .collect();
        let cfg = |top_k| SelectorConfig {
            top_k,
            sink_pages: c.ns,
            window_pages: c.nw,
            policy: GroupPolicy::MeanSoftmax,
            summary: SummaryKind::MinMax,
        };
        let (sel_k, sel_w) = (
            Selector::new(cfg(k)).unwrap(),
            Selector::new(cfg(cap)).unwrap(),
        );
        let mut recalls = 0;
        for step in 0..4 * c.steps + 2 {
            let spec = step % 2 == 0;
            let (want, filter) = match step % 4 {
                0 => (cap, HeadFilter::All),
                2 => (k, HeadFilter::All),
                1 => (k, HeadFilter::Flagged),
                _ => (k, HeadFilter::Unflagged),
            };
            if step > 0 && spec {
                for n in &mut n_pages {
                    *n = (*n + r.random_range(0..=2)).min(mp);
                }
            }
            let mode = if step == 0 { 1 } else { 2 };
            let flags: Vec<i32> = (0..rows).map(|_| r.random_range(0..=1)).collect();
            let q = gen_queries(&mut r, c.bs * hq * d, c.ties);
            let mut info = vec![0i32; c.bs * SEQ_INFO_WIDTH];
            for b in 0..c.bs {
                info[b * SEQ_INFO_WIDTH..(b + 1) * SEQ_INFO_WIDTH].copy_from_slice(&[
                    n_pages[b] as i32,
                    mode,
                    -1,
                    0,
                ]);
            }
            let mut d_rc = poison_i32(s, rows);
            let mut d_rl = poison_i32(s, rows * cap * 2);
            let mut d_sel = poison_i32(s, rows * k);
            kern.freekv_select(
                s,
                &shape,
                GroupPolicy::MeanSoftmax,
                SummaryKind::MinMax,
                &up(s, &q),
                &d_sums,
                &up(s, &info),
                &up(s, &flags),
                filter,
                &mut d_mid,
                &mut d_pm,
                &mut d_rc,
                &mut d_rl,
                Some(&mut d_sel),
                &mut d_scratch,
                Some(SelectCache {
                    want,
                    page_mask: &mut d_mask,
                }),
            )
            .unwrap();
            let (got_rc, got_rl, got_sel) = (down(s, &d_rc), down(s, &d_rl), down(s, &d_sel));
            for b in 0..c.bs {
                for h in 0..c.hkv {
                    let row = b * c.hkv + h;
                    let ctx = format!("{} spare {spare} step {step} seq {b} head {h}", c.name);
                    if !passes(filter, flags[row]) {
                        assert_eq!(got_rc[row], 0, "{ctx}: skipped row recalled");
                        continue;
                    }
                    let qh = &q[(b * hq + h * g) * d..(b * hq + (h + 1) * g) * d];
                    let (u, l) = row_summaries(&sums, row, mp, d);
                    let hs = HeadSummaries::new(SummaryKind::MinMax, d, &u, &l).unwrap();
                    let top = sel_k.select(qh, hs, n_pages[b]).unwrap();
                    let hs = HeadSummaries::new(SummaryKind::MinMax, d, &u, &l).unwrap();
                    let wanted = if want == cap {
                        sel_w.select(qh, hs, n_pages[b]).unwrap().pages().to_vec()
                    } else {
                        top.pages().to_vec()
                    };
                    assert!(
                        top.pages().iter().all(|p| wanted.contains(p)),
                        "{ctx}: S ⊄ W"
                    );
                    let mut want_sel: Vec<i32> = top.pages().iter().map(|&p| p as i32).collect();
                    want_sel.resize(k, -1);
                    assert_eq!(
                        &got_sel[row * k..(row + 1) * k],
                        &want_sel[..],
                        "{ctx}: selected"
                    );
                    let cache = &mut caches[row];
                    if mode == 1 {
                        cache.clear();
                    }
                    let scores = top.scores();
                    let key = |p: usize| {
                        p.checked_sub(c.ns)
                            .and_then(|i| scores.get(i))
                            .map_or(0, |&x| score_key(x))
                    };
                    let rec: Vec<(i32, i32)> = cache
                        .select(&wanted, key)
                        .unwrap()
                        .recalls
                        .iter()
                        .map(|&(p, i)| (p as i32, shape.middle_slot(i) as i32))
                        .collect();
                    assert_eq!(got_rc[row] as usize, rec.len(), "{ctx}: recall_count");
                    let rl = &got_rl[row * cap * 2..(row + 1) * cap * 2];
                    for (m, &(p, sl)) in rec.iter().enumerate() {
                        assert_eq!((rl[2 * m], rl[2 * m + 1]), (p, sl), "{ctx}: recall {m}");
                    }
                    recalls += rec.len();
                    // mid_page is the cache's row, page_mid its inverse (−1 elsewhere).
                    let pm_row = &mut pm_exp[row * mp..(row + 1) * mp];
                    pm_row.fill(-1);
                    let skip = cache.skip_mask(top.pages());
                    for (i, page) in cache.pages().iter().enumerate() {
                        mid_exp[row * cap + i] = page.map_or(-1, |p| p as i32);
                        if let Some(p) = page {
                            pm_row[*p] = i as i32;
                        }
                        mask_exp[(b * nb + shape.middle_slot(i)) * c.hkv + h] = i32::from(skip[i]);
                    }
                }
            }
            assert_eq!(
                down(s, &d_mid),
                mid_exp,
                "{} spare {spare} step {step}: mid_page",
                c.name
            );
            assert_eq!(
                down(s, &d_pm),
                pm_exp,
                "{} spare {spare} step {step}: page_mid",
                c.name
            );
            assert_eq!(
                down(s, &d_mask),
                mask_exp,
                "{} spare {spare} step {step}: mask",
                c.name
            );
        }
        assert!(recalls > 0, "{}: nothing recalled", c.name);
    }
}

#[test]
fn select_skips_rows_with_invalid_sequence_info() {
    let Some(gpu) = gpu() else { return };
    let s = gpu.stream();
    let c = CASES[0];
    let shape = FreeKvShape {
        seqs: 4,
        ..c.shape()
    };
    let rows = shape.rows();
    let (k, mp, d) = (shape.top_k, shape.max_pages, shape.head_dim);
    let mut r = rng(11);
    let sums = up(s, &gen_summaries(&mut r, rows, mp, d, false));
    let q = up(
        s,
        &gen_queries(&mut r, shape.seqs * shape.q_heads() * d, false),
    );
    // N > MP, N < 0, mode 3, mode -1: all skipped.
    let info: Vec<i32> = [(mp as i32 + 5, 2), (-3, 1), (50, 3), (50, -1)]
        .iter()
        .flat_map(|&(n, m)| [n, m, -1, 0])
        .collect();
    let mid0: Vec<i32> = (0..rows * k).map(|i| i as i32 % 7).collect();
    let pm0: Vec<i32> = (0..rows * mp).map(|i| i as i32 % 5 - 1).collect();
    let (mut dm, mut dp) = (up(s, &mid0), up(s, &pm0));
    let mut rc = poison_i32(s, rows);
    let mut rl = poison_i32(s, rows * k * 2);
    let mut sel = poison_i32(s, rows * k);
    let mut scratch = poison_f32(s, shape.select_scratch_len());
    gpu.kernels()
        .freekv_select(
            s,
            &shape,
            GroupPolicy::MeanSoftmax,
            SummaryKind::MinMax,
            &q,
            &sums,
            &up(s, &info),
            &up(s, &vec![1; rows]),
            HeadFilter::All,
            &mut dm,
            &mut dp,
            &mut rc,
            &mut rl,
            Some(&mut sel),
            &mut scratch,
            None,
        )
        .unwrap();
    assert_eq!(down(s, &rc), vec![0; rows]);
    assert_eq!(down(s, &dm), mid0);
    assert_eq!(down(s, &dp), pm0);
    assert!(
        down(s, &rl)
            .iter()
            .chain(down(s, &sel).iter())
            .all(|&x| x == JUNK)
    );
}

#[test]
fn select_and_correction_reject_bad_buffers() {
    let Some(gpu) = gpu() else { return };
    let s = gpu.stream();
    let kern = gpu.kernels();
    let shape = CASES[0].shape();
    let rows = shape.rows();
    let (k, mp, d) = (shape.top_k, shape.max_pages, shape.head_dim);
    let q = poison_f32(s, shape.seqs * shape.q_heads() * d);
    let sums = poison_f32(s, rows * mp * 2 * d);
    let info = up(s, &vec![0i32; shape.seqs * SEQ_INFO_WIDTH]);
    let flags = up(s, &vec![0i32; rows]);
    let mut mid = poison_i32(s, rows * k);
    let mut pm = poison_i32(s, rows * mp);
    let mut rc = poison_i32(s, rows);
    let mut short_rl = poison_i32(s, rows * k * 2 - 1);
    let mut scratch = poison_f32(s, shape.select_scratch_len());
    let e = kern
        .freekv_select(
            s,
            &shape,
            GroupPolicy::MaxScore,
            SummaryKind::ArkVale,
            &q,
            &sums,
            &info,
            &flags,
            HeadFilter::All,
            &mut mid,
            &mut pm,
            &mut rc,
            &mut short_rl,
            None,
            &mut scratch,
            None,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            KernelError::InvalidArgument {
                kernel: "freekv_select",
                ..
            }
        ) && e.to_string().contains("recall_list"),
        "{e}"
    );
    let bad_shape = FreeKvShape {
        head_dim: 96,
        ..shape
    };
    let e = kern
        .freekv_select(
            s,
            &bad_shape,
            GroupPolicy::MaxScore,
            SummaryKind::ArkVale,
            &q,
            &sums,
            &info,
            &flags,
            HeadFilter::All,
            &mut mid,
            &mut pm,
            &mut rc,
            &mut short_rl,
            None,
            &mut scratch,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("head_dim 96"), "{e}");
    // correction: q_prev one element short, then a bad threshold
    let qb = poison_bf16(s, shape.seqs * shape.q_heads() * d);
    let mut qp = poison_f32(s, shape.seqs * shape.q_heads() * d - 1);
    let mut fl = poison_i32(s, rows);
    let rows_q = Strided::contiguous(shape.q_heads() * d);
    let e = kern
        .freekv_correction(
            s,
            &shape,
            &qb,
            rows_q,
            &mut qp,
            &info,
            Some(0.5),
            CorrectionAggregate::Mean,
            &mut fl,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("q_prev"), "{e}");
    let mut qp = poison_f32(s, shape.seqs * shape.q_heads() * d);
    let e = kern
        .freekv_correction(
            s,
            &shape,
            &qb,
            rows_q,
            &mut qp,
            &info,
            Some(2.0),
            CorrectionAggregate::Mean,
            &mut fl,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("threshold"), "{e}");
    // nothing was launched: the outputs still hold their poison
    assert!(
        down(s, &rc)
            .iter()
            .chain(down(s, &fl).iter())
            .all(|&x| x == JUNK)
    );
}

/// Query head kinds for the correction test: near-parallel, random, opposite, zero current,
/// zero previous, NaN previous.
fn correction_inputs(rng: &mut StdRng, n_heads: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let mut prev = vec![0.0f32; n_heads * d];
    let mut cur = vec![0.0f32; n_heads * d];
    for j in 0..n_heads {
        let kind = rng.random_range(0..12);
        for i in 0..d {
            let a: f32 = rng.random_range(-2.0..2.0);
            let noise: f32 = rng.random_range(-0.3..0.3);
            let (p, c) = match kind {
                0..=4 => (a, a * 1.5 + noise),
                5..=7 => (a, rng.random_range(-2.0..2.0)),
                8 => (a, -a),
                9 => (a, 0.0),
                10 => (0.0, a),
                _ => (if i == d / 2 { f32::NAN } else { a }, a),
            };
            prev[j * d + i] = p;
            cur[j * d + i] = c;
        }
    }
    (prev, cur)
}

#[test]
fn correction_matches_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    let s = gpu.stream();
    let kern = gpu.kernels();
    let (mut rows_checked, mut cos_checked, mut cos_exact, mut flagged) = (0, 0, 0, 0);
    let mut cos_nan = 0;
    let mut worst = 0.0f64;
    for (si, &(d, g, hkv, bs)) in [
        (128, 4, 2, 4),
        (64, 7, 1, 3),
        (64, 1, 3, 2),
        (128, 8, 1, 3),
        (64, 32, 1, 2),
    ]
    .iter()
    .enumerate()
    {
        let shape = FreeKvShape {
            seqs: bs,
            kv_heads: hkv,
            group: g,
            head_dim: d,
            page_size: P,
            sink_pages: 1,
            top_k: 4,
            window_pages: 2,
            max_pages: 64,
            spare_pages: 0,
        };
        let hq = hkv * g;
        let rows = bs * hkv;
        // fused-QKV-like rows: the q heads start 3 elements into a row of (Hq + 2 Hkv) d + 5
        let q_rows = Strided {
            offset: 3,
            stride: (hq + 2 * hkv) * d + 5,
        };
        for (ti, trigger) in [Some(0.9f32), Some(0.0), Some(-1.0), Some(1.0), None]
            .into_iter()
            .enumerate()
        {
            for aggregate in [CorrectionAggregate::Mean, CorrectionAggregate::Max] {
                let mut r = rng(100 + si as u64 * 10 + ti as u64);
                let (prev, cur) = correction_inputs(&mut r, bs * hq, d);
                let mut qbuf = vec![bf16::from_f32(7.0); q_rows.offset + bs * q_rows.stride];
                for b in 0..bs {
                    for e in 0..hq * d {
                        qbuf[q_rows.offset + b * q_rows.stride + e] =
                            bf16::from_f32(cur[b * hq * d + e]);
                    }
                }
                let qf: Vec<f32> = (0..bs * hq * d)
                    .map(|e| {
                        qbuf[q_rows.offset + (e / (hq * d)) * q_rows.stride + e % (hq * d)].to_f32()
                    })
                    .collect();
                let modes: Vec<i32> = (0..bs)
                    .map(|b| if b < 3 { [2, 0, 1][b] } else { 2 })
                    .collect();
                let info: Vec<i32> = modes.iter().flat_map(|&m| [40, m, -1, 0]).collect();
                let d_q = up(s, &qbuf);
                let mut d_prev = up(s, &prev);
                let mut d_flags = poison_i32(s, rows);
                let mut d_cos = poison_f32(s, rows);
                kern.freekv_correction(
                    s,
                    &shape,
                    &d_q,
                    q_rows,
                    &mut d_prev,
                    &up(s, &info),
                    trigger,
                    aggregate,
                    &mut d_flags,
                    Some(&mut d_cos),
                )
                .unwrap();
                let (gf, gc, gp) = (down(s, &d_flags), down(s, &d_cos), down(s, &d_prev));
                // Without the cosine output (the decode path), the same flags and q_prev; with
                // every head flagged the kernel skips the cosine.
                {
                    let mut d_prev2 = up(s, &prev);
                    let mut d_flags2 = poison_i32(s, rows);
                    kern.freekv_correction(
                        s,
                        &shape,
                        &d_q,
                        q_rows,
                        &mut d_prev2,
                        &up(s, &info),
                        trigger,
                        aggregate,
                        &mut d_flags2,
                        None,
                    )
                    .unwrap();
                    assert_eq!(down(s, &d_flags2), gf, "{trigger:?}: flags without cosines");
                    let p2 = down(s, &d_prev2);
                    assert!(
                        p2.iter().zip(&gp).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{trigger:?}: q_prev without cosines"
                    );
                }
                let policy = match trigger {
                    Some(t) => CorrectionPolicy::from_tau(t, aggregate).unwrap(),
                    None => CorrectionPolicy::always(aggregate),
                };
                for b in 0..bs {
                    let span = b * hq * d..(b + 1) * hq * d;
                    let what = format!(
                        "d{d} g{g} seq {b} mode {} {trigger:?} {aggregate}",
                        modes[b]
                    );
                    match modes[b] {
                        0 => {
                            assert_eq!(&gf[b * hkv..(b + 1) * hkv], &vec![0; hkv][..], "{what}");
                            assert!(
                                gc[b * hkv..(b + 1) * hkv].iter().all(|c| c.is_nan()),
                                "{what}"
                            );
                            let same = gp[span.clone()]
                                .iter()
                                .zip(&prev[span.clone()])
                                .all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{what}: q_prev changed");
                        }
                        1 => {
                            assert_eq!(&gf[b * hkv..(b + 1) * hkv], &vec![1; hkv][..], "{what}");
                            assert_eq!(&gp[span.clone()], &qf[span.clone()], "{what}: q_prev");
                        }
                        _ => {
                            let ev = policy
                                .evaluate(&prev[span.clone()], &qf[span.clone()], d, hkv)
                                .unwrap();
                            let want_flags: Vec<i32> =
                                ev.flagged.iter().map(|&f| i32::from(f)).collect();
                            assert_eq!(
                                &gf[b * hkv..(b + 1) * hkv],
                                &want_flags[..],
                                "{what}: flags (cos {:?})",
                                ev.group_cosines
                            );
                            flagged += want_flags.iter().filter(|&&f| f == 1).count();
                            for h in 0..hkv {
                                let (got, want) = (gc[b * hkv + h], ev.group_cosines[h]);
                                cos_checked += 1;
                                if got.to_bits() == want.to_bits()
                                    || (got.is_nan() && want.is_nan())
                                {
                                    cos_exact += 1;
                                }
                                if want.is_nan() {
                                    cos_nan += 1;
                                }
                                if want.is_nan() {
                                    assert!(got.is_nan(), "{what}: cosine {got} want NaN");
                                } else {
                                    let rel = ((got as f64 - want as f64)
                                        / (want.abs() as f64).max(1e-30))
                                    .abs();
                                    if want != 0.0 {
                                        worst = worst.max(rel);
                                        assert!(rel <= 1e-6, "{what}: cosine {got} want {want}");
                                    } else {
                                        assert!(got.abs() <= 1e-6, "{what}: cosine {got} want 0");
                                    }
                                }
                            }
                            assert_eq!(&gp[span.clone()], &qf[span.clone()], "{what}: q_prev");
                        }
                    }
                    rows_checked += hkv;
                }
            }
        }
    }
    println!(
        "freekv_correction: {rows_checked} rows checked, {flagged} flagged, {cos_exact}/{cos_checked} group cosines bit-identical (NaN = NaN; {cos_nan} NaN), worst relative error {worst:.2e}"
    );
    assert!(flagged > 0 && flagged < cos_checked);
}

/// Correction + both selection passes captured in a CUDA graph give the same results as the
/// eager launches.
#[test]
fn graph_replay_matches_eager() {
    let Some(gpu) = gpu() else { return };
    let s = gpu.stream();
    let kern = gpu.kernels();
    let c = CASES[0];
    let shape = c.shape();
    let (rows, k, mp, d) = (shape.rows(), c.k, c.mp, c.d);
    let hq = shape.q_heads();
    let mut r = rng(77);
    let sums = up(s, &gen_summaries(&mut r, rows, mp, d, false));
    let prev0 = gen_queries(&mut r, c.bs * hq * d, false);
    let qb: Vec<bf16> = gen_queries(&mut r, c.bs * hq * d, false)
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let d_q = up(s, &qb);
    let info: Vec<i32> = [(150, 2), (120, 1), (200, 2)]
        .iter()
        .flat_map(|&(n, m)| [n, m, -1, 0])
        .collect();
    let d_info = up(s, &info);
    let mid0: Vec<i32> = (0..rows * k)
        .map(|i| if i % 3 == 0 { -1 } else { (10 + i) as i32 })
        .collect();
    let mut pm0 = vec![-1i32; rows * mp];
    for row in 0..rows {
        for i in 0..k {
            let p = mid0[row * k + i];
            if p >= 0 {
                pm0[row * mp + p as usize] = i as i32;
            }
        }
    }
    let rows_q = Strided::contiguous(hq * d);
    let mut outs: Vec<Vec<Vec<i32>>> = Vec::new();
    for graph in [false, true] {
        let mut prev = up(s, &prev0);
        let (mut mid, mut pm) = (up(s, &mid0), up(s, &pm0));
        let mut flags = poison_i32(s, rows);
        let (mut rc1, mut rc2) = (poison_i32(s, rows), poison_i32(s, rows));
        let (mut rl1, mut rl2) = (poison_i32(s, rows * k * 2), poison_i32(s, rows * k * 2));
        let mut sel = poison_i32(s, rows * k);
        let mut scratch = poison_f32(s, shape.select_scratch_len());
        s.synchronize().unwrap();
        let mut body = |prev: &mut CudaSlice<f32>| {
            kern.freekv_correction(
                s,
                &shape,
                &d_q,
                rows_q,
                prev,
                &d_info,
                Some(0.95),
                CorrectionAggregate::Mean,
                &mut flags,
                None,
            )
            .unwrap();
            kern.freekv_select(
                s,
                &shape,
                GroupPolicy::MeanSoftmax,
                SummaryKind::MinMax,
                &*prev,
                &sums,
                &d_info,
                &flags,
                HeadFilter::Flagged,
                &mut mid,
                &mut pm,
                &mut rc1,
                &mut rl1,
                None,
                &mut scratch,
                None,
            )
            .unwrap();
            kern.freekv_select(
                s,
                &shape,
                GroupPolicy::MeanSoftmax,
                SummaryKind::MinMax,
                &*prev,
                &sums,
                &d_info,
                &flags,
                HeadFilter::Unflagged,
                &mut mid,
                &mut pm,
                &mut rc2,
                &mut rl2,
                Some(&mut sel),
                &mut scratch,
                None,
            )
            .unwrap();
        };
        if graph {
            s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .unwrap();
            body(&mut prev);
            let g = s
                .end_capture(CUgraphInstantiate_flags(0))
                .unwrap()
                .expect("a captured graph");
            g.launch().unwrap();
            s.synchronize().unwrap();
        } else {
            body(&mut prev);
        }
        let pbits: Vec<i32> = down(s, &prev).iter().map(|x| x.to_bits() as i32).collect();
        outs.push(vec![
            down(s, &flags),
            down(s, &mid),
            down(s, &pm),
            down(s, &rc1),
            down(s, &rc2),
            down(s, &rl1),
            down(s, &rl2),
            down(s, &sel),
            pbits,
        ]);
    }
    assert_eq!(outs[0], outs[1]);
    let flags = &outs[0][0];
    assert!(flags.iter().all(|&f| f == 0 || f == 1));
    // seq 1 is at mode 1: all its heads flagged and recalled in the corrective pass
    for h in 0..c.hkv {
        assert_eq!(flags[c.hkv + h], 1);
        assert!(outs[0][3][c.hkv + h] > 0);
        assert_eq!(outs[0][4][c.hkv + h], 0);
    }
}
