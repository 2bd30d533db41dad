//! Grouped-query attention kernels over blocks of KV rows, and the KV-policy seam of the decoder.
//!
//! The kernels see the KV history of one KV head as an ordered list of [`KvBlock`]s: runs of rows
//! whose keys and values are `head_dim` floats each, consecutive rows `stride` floats apart. A page
//! of the host cache in HND layout is one block with stride `head_dim`; a resident NHD slot of the
//! device layout is one block with stride `kv_heads * head_dim`. The list order is the row order.
//!
//! Results depend only on the sequence of rows, never on how they are cut into blocks: scores are
//! computed row by row, the softmax is exact (a max pass, then `exp(s - max)`), sums run over the
//! rows in order, and decode work is split for parallelism at row counts that depend only on the
//! number of rows. So a cache with page size 1, 3 or 32 gives bit-identical outputs.
//!
//! GQA: the `G = n_heads / n_kv_heads` query heads of a group are processed together, so every key
//! and value row is loaded once per group (and, in prefill, once per block of query tokens).
//!
//! [`KvPolicy`] is the seam where FreeKV policies sit: the decoder calls it once per layer per
//! decode step with the post-RoPE query and the new key/value; it appends them and produces the
//! attention output. [`DenseKv`] (full attention over every page) is the default.

use std::ops::Range;
use std::sync::Mutex;

use freekv_layout::PagedKvCache;

use crate::ModelError;

/// A decode attention cuts a head with `n` rows into `clamp(n / SPLIT_ROWS, 1, MAX_SPLITS)`
/// equal pieces, processed in parallel and merged in order.
const SPLIT_ROWS: usize = 256;
/// Upper bound on the pieces one KV head is cut into.
const MAX_SPLITS: usize = 16;
/// Query tokens processed together (per KV head) by the prefill kernel.
const PREFILL_QUERY_BLOCK: usize = 16;

/// A run of KV rows of one KV head: keys and values of `rows` tokens, `stride` floats apart.
#[derive(Debug, Clone, Copy)]
pub struct KvBlock<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    rows: usize,
    stride: usize,
    dim: usize,
}

impl<'a> KvBlock<'a> {
    /// A block of `rows` rows of `head_dim` floats, row `r` starting at `r * stride` in both
    /// `keys` and `values`. Errors when a slice is too short or `stride < head_dim`.
    pub fn new(
        keys: &'a [f32],
        values: &'a [f32],
        rows: usize,
        stride: usize,
        head_dim: usize,
    ) -> Result<Self, ModelError> {
        if head_dim == 0 || stride < head_dim {
            return Err(ModelError::Shape(format!(
                "KV block: stride {stride} < head_dim {head_dim} (or head_dim 0)"
            )));
        }
        let need = if rows == 0 {
            0
        } else {
            (rows - 1)
                .checked_mul(stride)
                .and_then(|x| x.checked_add(head_dim))
                .ok_or_else(|| ModelError::Shape("KV block too large".into()))?
        };
        if keys.len() < need || values.len() < need {
            return Err(ModelError::Shape(format!(
                "KV block of {rows} rows (stride {stride}, head_dim {head_dim}) needs {need} floats; \
                 keys have {}, values {}",
                keys.len(),
                values.len()
            )));
        }
        Ok(Self {
            keys,
            values,
            rows,
            stride,
            dim: head_dim,
        })
    }

    /// Rows in this block.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Floats between consecutive rows.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.dim
    }

    /// Key of row `r` (`r < rows`, guaranteed by the constructor's length check).
    #[inline(always)]
    fn key(&self, r: usize) -> &'a [f32] {
        let s = r * self.stride;
        &self.keys[s..s + self.dim]
    }

    /// Value of row `r` (`r < rows`).
    #[inline(always)]
    fn value(&self, r: usize) -> &'a [f32] {
        let s = r * self.stride;
        &self.values[s..s + self.dim]
    }
}

/// A source of KV rows, per KV head, as an ordered list of blocks.
pub trait KvBlocks: Sync {
    /// Total rows of `kv_head` (the sum of its blocks' rows).
    fn num_rows(&self, kv_head: usize) -> usize;
    /// Number of blocks of `kv_head`.
    fn num_blocks(&self, kv_head: usize) -> usize;
    /// Block `index` of `kv_head`.
    fn block(&self, kv_head: usize, index: usize) -> Result<KvBlock<'_>, ModelError>;
    /// The block that holds row `row` of `kv_head` and the row's offset in it. The default scans
    /// the blocks; sources with uniform blocks compute it directly.
    fn locate(&self, kv_head: usize, row: usize) -> Result<(usize, usize), ModelError> {
        let mut start = 0;
        for i in 0..self.num_blocks(kv_head) {
            let n = self.block(kv_head, i)?.rows();
            if row < start + n {
                return Ok((i, row - start));
            }
            start += n;
        }
        Err(ModelError::Shape(format!(
            "row {row} past the {start} rows of KV head {kv_head}"
        )))
    }
}

/// Per KV head, an explicit list of blocks (what a sparse policy builds from its resident slots).
impl KvBlocks for [Vec<KvBlock<'_>>] {
    fn num_rows(&self, kv_head: usize) -> usize {
        self.get(kv_head)
            .map_or(0, |b| b.iter().map(KvBlock::rows).sum())
    }
    fn num_blocks(&self, kv_head: usize) -> usize {
        self.get(kv_head).map_or(0, Vec::len)
    }
    fn block(&self, kv_head: usize, index: usize) -> Result<KvBlock<'_>, ModelError> {
        self.get(kv_head)
            .and_then(|b| b.get(index))
            .copied()
            .ok_or_else(|| ModelError::Shape(format!("no KV block {index} of head {kv_head}")))
    }
}

/// All pages of one layer of a [`PagedKvCache`], in logical order (HND blocks, stride `head_dim`).
#[derive(Debug, Clone, Copy)]
pub struct CacheLayer<'a> {
    cache: &'a PagedKvCache,
    layer: usize,
}

impl<'a> CacheLayer<'a> {
    /// The view of `layer` of `cache`.
    pub fn new(cache: &'a PagedKvCache, layer: usize) -> Self {
        Self { cache, layer }
    }
}

impl KvBlocks for CacheLayer<'_> {
    fn num_rows(&self, _kv_head: usize) -> usize {
        self.cache.len(self.layer)
    }
    fn num_blocks(&self, _kv_head: usize) -> usize {
        self.cache.num_pages(self.layer)
    }
    fn block(&self, kv_head: usize, index: usize) -> Result<KvBlock<'_>, ModelError> {
        let d = self.cache.geometry().head_dim;
        KvBlock::new(
            self.cache.keys(self.layer, index, kv_head)?,
            self.cache.values(self.layer, index, kv_head)?,
            self.cache.page_len(self.layer, index),
            d,
            d,
        )
    }
    fn locate(&self, _kv_head: usize, row: usize) -> Result<(usize, usize), ModelError> {
        let len = self.cache.len(self.layer);
        if row >= len {
            return Err(ModelError::Shape(format!(
                "row {row} past the {len} rows of layer {}",
                self.layer
            )));
        }
        let p = self.cache.geometry().page_size;
        Ok((row / p, row % p))
    }
}

/// Head counts and the score scale of an attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// KV heads (`n_heads` is a multiple of it).
    pub n_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Score scale, normally `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl AttnShape {
    /// The shape with the standard scale `1 / sqrt(head_dim)`; checks that the heads divide.
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Result<Self, ModelError> {
        if n_heads == 0 || n_kv_heads == 0 || head_dim == 0 || !n_heads.is_multiple_of(n_kv_heads) {
            return Err(ModelError::Shape(format!(
                "attention with {n_heads} query heads, {n_kv_heads} KV heads, head_dim {head_dim}"
            )));
        }
        Ok(Self {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        })
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Floats of all query heads of one token.
    pub fn q_len(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Floats of all KV heads of one token.
    pub fn kv_len(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// Causal visibility for a block of queries: query `i` sits at position `first_pos + i / per_pos`
/// and sees rows `0..=` that position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Causal {
    /// Position of the first query.
    pub first_pos: usize,
    /// Consecutive queries sharing one position (e.g. the query heads of a group).
    pub per_pos: usize,
}

impl Causal {
    /// The first query (index) that sees absolute row `row`.
    #[inline(always)]
    fn first_query(&self, row: usize) -> usize {
        row.saturating_sub(self.first_pos)
            .saturating_mul(self.per_pos)
    }

    /// Of `n` rows starting at absolute row `row0`, those visible to query `q`.
    #[inline(always)]
    fn visible(&self, q: usize, row0: usize, n: usize) -> usize {
        let pos = self.first_pos.saturating_add(q / self.per_pos);
        pos.saturating_add(1).saturating_sub(row0).min(n)
    }
}

/// The unnormalised softmax state of a set of queries over some rows: max score `m`, sum of
/// `exp(s - m)` `l`, and `acc = Σ exp(s - m) v`. States over disjoint row ranges merge into the
/// state over their union.
#[derive(Debug, Clone, Default)]
pub struct PartialAttn {
    /// Per query: the max score (`-inf` when no row was seen).
    pub m: Vec<f32>,
    /// Per query: the sum of `exp(score - m)`.
    pub l: Vec<f32>,
    /// Per query: `head_dim` floats of `Σ exp(score - m) · value`.
    pub acc: Vec<f32>,
}

impl PartialAttn {
    /// Reset to the empty state for `n_queries` queries of `head_dim`.
    pub fn reset(&mut self, n_queries: usize, head_dim: usize) {
        self.m.clear();
        self.m.resize(n_queries, f32::NEG_INFINITY);
        self.l.clear();
        self.l.resize(n_queries, 0.0);
        self.acc.clear();
        self.acc.resize(n_queries * head_dim, 0.0);
    }

    /// Fold `other` (same queries, other rows) into `self`.
    pub fn merge(&mut self, other: &PartialAttn, head_dim: usize) {
        for (q, (&om, &ol)) in other.m.iter().zip(&other.l).enumerate() {
            if om == f32::NEG_INFINITY {
                continue;
            }
            let (Some(sm), Some(sl)) = (self.m.get_mut(q), self.l.get_mut(q)) else {
                break;
            };
            let mx = sm.max(om);
            let a = if *sm == f32::NEG_INFINITY {
                0.0
            } else {
                (*sm - mx).exp()
            };
            let b = (om - mx).exp();
            *sm = mx;
            *sl = *sl * a + ol * b;
            let r = q * head_dim..(q + 1) * head_dim;
            if let (Some(sa), Some(oa)) = (self.acc.get_mut(r.clone()), other.acc.get(r)) {
                for (x, &y) in sa.iter_mut().zip(oa) {
                    *x = *x * a + y * b;
                }
            }
        }
    }

    /// Write the normalised outputs (`acc / l`; zeros for a query that saw no row) into `out`.
    pub fn finish(&self, head_dim: usize, out: &mut [f32]) {
        for (q, o) in out.chunks_exact_mut(head_dim).enumerate() {
            let l = self.l.get(q).copied().unwrap_or(0.0);
            match self.acc.get(q * head_dim..(q + 1) * head_dim) {
                Some(acc) if l > 0.0 => {
                    let inv = 1.0 / l;
                    for (x, &a) in o.iter_mut().zip(acc) {
                        *x = a * inv;
                    }
                }
                _ => o.fill(0.0),
            }
        }
    }
}

/// Reusable scratch of one single-threaded kernel call (the score matrix).
#[derive(Debug, Default)]
pub struct KernelScratch {
    scores: Vec<f32>,
}

/// Attention of the queries of one KV head over rows `rows` of that head, folded into `state`
/// (reset it with [`PartialAttn::reset`] first; a state holding earlier rows is rescaled, which is
/// exact up to rounding).
///
/// `queries` holds `n_q * head_dim` floats. With `causal`, query `i` sees row `j` only when
/// `j <= first_pos + i / per_pos`; without, every query sees every row of the range.
/// Single-threaded; callers parallelise over heads and row ranges.
#[allow(clippy::too_many_arguments)]
pub fn attend_rows<S: KvBlocks + ?Sized>(
    src: &S,
    kv_head: usize,
    rows: Range<usize>,
    queries: &[f32],
    head_dim: usize,
    scale: f32,
    causal: Option<Causal>,
    scratch: &mut KernelScratch,
    state: &mut PartialAttn,
) -> Result<(), ModelError> {
    if head_dim == 0 || !queries.len().is_multiple_of(head_dim) {
        return Err(ModelError::Shape(format!(
            "attention queries of {} floats, head_dim {head_dim}",
            queries.len()
        )));
    }
    let n_q = queries.len() / head_dim;
    if state.m.len() != n_q || state.l.len() != n_q || state.acc.len() != n_q * head_dim {
        return Err(ModelError::Shape(format!(
            "attention state sized for {} queries, called with {n_q}",
            state.m.len()
        )));
    }
    if causal.is_some_and(|c| c.per_pos == 0) {
        return Err(ModelError::Shape("causal per_pos must be > 0".into()));
    }
    let total = src.num_rows(kv_head);
    if rows.start > rows.end || rows.end > total {
        return Err(ModelError::Shape(format!(
            "attention rows {rows:?} outside the {total} rows of KV head {kv_head}"
        )));
    }
    // Rows past the last query's position are seen by nobody.
    let end = match causal {
        Some(c) if n_q > 0 => {
            let last = c.first_pos.saturating_add((n_q - 1) / c.per_pos);
            rows.end.min(last.saturating_add(1))
        }
        _ => rows.end,
    };
    if n_q == 0 || rows.start >= end {
        return Ok(());
    }
    let row0 = rows.start;
    let n = end - row0;
    let scores = &mut scratch.scores;
    scores.clear();
    scores.resize(n_q * n, f32::NEG_INFINITY);
    let geo = Geo {
        n,
        n_q,
        d: head_dim,
        causal,
    };

    // Pass 1: scores[q][j] = scale · q·k_j for every visible (query, row).
    let (mut bi, mut off) = src.locate(kv_head, row0)?;
    let mut j = 0;
    while j < n {
        let b = src.block(kv_head, bi)?;
        if b.head_dim() != head_dim {
            return Err(ModelError::Shape(format!(
                "KV block of head_dim {}, attention head_dim {head_dim}",
                b.head_dim()
            )));
        }
        let take = b.rows().saturating_sub(off).min(n - j);
        if j + take < n
            && let Ok(next) = src.block(kv_head, bi + 1)
        {
            kernels::prefetch(&next, false);
        }
        kernels::scores(&b, off, take, row0 + j, j, &geo, queries, scale, scores);
        j += take;
        bi += 1;
        off = 0;
    }

    // Softmax numerators of each query over its visible prefix, folded into the state.
    for q in 0..n_q {
        let visible = causal.map_or(n, |c| c.visible(q, row0, n));
        if visible == 0 {
            continue;
        }
        let s = &mut scores[q * n..q * n + visible];
        let mx = kernels::max(s);
        let m_old = state.m[q];
        let m_new = m_old.max(mx);
        let sum = kernels::exp_sub_sum(s, m_new);
        if m_old != f32::NEG_INFINITY && m_old != m_new {
            let a = (m_old - m_new).exp();
            state.l[q] *= a;
            for x in &mut state.acc[q * head_dim..(q + 1) * head_dim] {
                *x *= a;
            }
        }
        state.m[q] = m_new;
        state.l[q] += sum;
    }

    // Pass 2: acc[q] += p[q][j] · v_j, rows in order.
    let (mut bi, mut off) = src.locate(kv_head, row0)?;
    let mut j = 0;
    while j < n {
        let b = src.block(kv_head, bi)?;
        let take = b.rows().saturating_sub(off).min(n - j);
        if j + take < n
            && let Ok(next) = src.block(kv_head, bi + 1)
        {
            kernels::prefetch(&next, true);
        }
        kernels::accumulate(&b, off, take, row0 + j, j, &geo, scores, &mut state.acc);
        j += take;
        bi += 1;
        off = 0;
    }
    Ok(())
}

/// Sizes shared by the inner kernels.
#[derive(Debug, Clone, Copy)]
struct Geo {
    /// Rows in the score matrix (its row stride).
    n: usize,
    /// Queries.
    n_q: usize,
    /// Head dimension.
    d: usize,
    causal: Option<Causal>,
}

/// One work item's scratch for the parallel drivers.
#[derive(Debug, Default)]
struct Slot {
    kernel: KernelScratch,
    state: PartialAttn,
    queries: Vec<f32>,
    out: Vec<f32>,
    err: Option<ModelError>,
}

/// Reusable scratch of [`decode_attention`] and [`prefill_attention`]: after the first calls at a
/// given size, they allocate nothing.
#[derive(Debug, Default)]
pub struct AttnScratch {
    slots: Vec<Mutex<Slot>>,
    items: Vec<(usize, Range<usize>)>,
}

impl AttnScratch {
    /// Empty scratch.
    pub fn new() -> Self {
        Self::default()
    }

    fn ensure_slots(&mut self, n: usize) {
        while self.slots.len() < n {
            self.slots.push(Mutex::new(Slot::default()));
        }
    }
}

fn lock(m: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How many pieces a decode attention over `rows` rows is cut into.
fn splits_for(rows: usize) -> usize {
    (rows / SPLIT_ROWS).clamp(1, MAX_SPLITS)
}

/// Decode attention of one token: all `n_heads` query heads (`q`, head-major) over every row of
/// `src`, GQA-aware, written to `out` (`n_heads * head_dim`). Parallel over KV heads and row
/// ranges; the result depends only on the rows, not on the thread count or the block structure.
pub fn decode_attention<S: KvBlocks + ?Sized>(
    src: &S,
    q: &[f32],
    shape: &AttnShape,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) -> Result<(), ModelError> {
    let _span = tracing::trace_span!("decode_attention").entered();
    let d = shape.head_dim;
    let g = shape.group();
    if q.len() != shape.q_len() || out.len() != shape.q_len() {
        return Err(ModelError::Shape(format!(
            "decode attention: q has {} floats, out {}, expected {}",
            q.len(),
            out.len(),
            shape.q_len()
        )));
    }
    scratch.items.clear();
    for h in 0..shape.n_kv_heads {
        let n = src.num_rows(h);
        let s = splits_for(n);
        for i in 0..s {
            scratch.items.push((h, i * n / s..(i + 1) * n / s));
        }
    }
    let n_items = scratch.items.len();
    scratch.ensure_slots(n_items);
    let items = &scratch.items;
    let slots = &scratch.slots;
    let work = |i: usize| {
        let (Some((h, rows)), Some(slot)) = (items.get(i), slots.get(i)) else {
            return;
        };
        let mut guard = lock(slot);
        let slot = &mut *guard;
        slot.err = None;
        slot.state.reset(g, d);
        let qh = &q[h * g * d..(h + 1) * g * d];
        if let Err(e) = attend_rows(
            src,
            *h,
            rows.clone(),
            qh,
            d,
            shape.scale,
            None,
            &mut slot.kernel,
            &mut slot.state,
        ) {
            slot.err = Some(e);
        }
    };
    par_for_each(n_items, &work);

    // Merge the pieces of each head in order.
    let mut i = 0;
    for h in 0..shape.n_kv_heads {
        let first = i;
        while i < n_items && items[i].0 == h {
            i += 1;
        }
        let Some((head, rest)) = slots[first..i].split_first() else {
            out[h * g * d..(h + 1) * g * d].fill(0.0);
            continue;
        };
        let mut head = lock(head);
        if let Some(e) = head.err.take() {
            return Err(e);
        }
        for other in rest {
            let mut other = lock(other);
            if let Some(e) = other.err.take() {
                return Err(e);
            }
            head.state.merge(&other.state, d);
        }
        head.state.finish(d, &mut out[h * g * d..(h + 1) * g * d]);
    }
    Ok(())
}

/// Causal prefill attention of `T = q.len() / (n_heads * head_dim)` tokens at positions
/// `first_pos..first_pos + T` (their keys and values already in `src`, which holds at least
/// `first_pos + T` rows per head). `q` and `out` are token-major (`T × n_heads × head_dim`).
/// Parallel over KV heads and blocks of query tokens.
pub fn prefill_attention<S: KvBlocks + ?Sized>(
    src: &S,
    q: &[f32],
    first_pos: usize,
    shape: &AttnShape,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) -> Result<(), ModelError> {
    let _span = tracing::debug_span!("prefill_attention").entered();
    let d = shape.head_dim;
    let g = shape.group();
    let ql = shape.q_len();
    if !q.len().is_multiple_of(ql) || out.len() != q.len() {
        return Err(ModelError::Shape(format!(
            "prefill attention: q has {} floats, out {}, token size {ql}",
            q.len(),
            out.len()
        )));
    }
    let t = q.len() / ql;
    for h in 0..shape.n_kv_heads {
        if src.num_rows(h) < first_pos + t {
            return Err(ModelError::Shape(format!(
                "prefill attention: KV head {h} has {} rows, needs {}",
                src.num_rows(h),
                first_pos + t
            )));
        }
    }
    let n_blocks = t.div_ceil(PREFILL_QUERY_BLOCK);
    scratch.items.clear();
    // Longest blocks (the last ones) first, for balance.
    for b in (0..n_blocks).rev() {
        for h in 0..shape.n_kv_heads {
            let t0 = b * PREFILL_QUERY_BLOCK;
            scratch
                .items
                .push((h, t0..(t0 + PREFILL_QUERY_BLOCK).min(t)));
        }
    }
    let n_items = scratch.items.len();
    scratch.ensure_slots(n_items);
    let items = &scratch.items;
    let slots = &scratch.slots;
    let work = |i: usize| {
        let (Some((h, toks)), Some(slot)) = (items.get(i), slots.get(i)) else {
            return;
        };
        let mut guard = lock(slot);
        let slot = &mut *guard;
        slot.err = None;
        let nq = toks.len() * g;
        // Gather this group's queries, token-major.
        slot.queries.clear();
        for tok in toks.clone() {
            let base = tok * ql + h * g * d;
            slot.queries.extend_from_slice(&q[base..base + g * d]);
        }
        slot.state.reset(nq, d);
        let causal = Causal {
            first_pos: first_pos + toks.start,
            per_pos: g,
        };
        if let Err(e) = attend_rows(
            src,
            *h,
            0..first_pos + toks.end,
            &slot.queries,
            d,
            shape.scale,
            Some(causal),
            &mut slot.kernel,
            &mut slot.state,
        ) {
            slot.err = Some(e);
            return;
        }
        slot.out.resize(nq * d, 0.0);
        slot.state.finish(d, &mut slot.out);
    };
    par_for_each(n_items, &work);
    for (i, (h, toks)) in items.iter().enumerate() {
        let mut slot = lock(&slots[i]);
        if let Some(e) = slot.err.take() {
            return Err(e);
        }
        for (k, tok) in toks.clone().enumerate() {
            let dst = tok * ql + h * g * d;
            out[dst..dst + g * d].copy_from_slice(&slot.out[k * g * d..(k + 1) * g * d]);
        }
    }
    Ok(())
}

/// Run `f(i)` for `i` in `0..n` on the global [`ThreadPool`](crate::qmatmul::parallel::ThreadPool),
/// items handed out dynamically (one atomic counter), inline when `n <= 1`.
pub(crate) fn par_for_each(n: usize, f: &(dyn Fn(usize) + Sync)) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pool = crate::qmatmul::parallel::ThreadPool::global();
    if n <= 1 || pool.threads() <= 1 {
        (0..n).for_each(f);
        return;
    }
    let next = AtomicUsize::new(0);
    pool.for_each_chunk(pool.threads().min(n), &|_| {
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            f(i);
        }
    });
}

/// What the decoder hands a KV policy for one layer of one decode step.
#[derive(Debug, Clone, Copy)]
pub struct LayerStep<'a> {
    /// Layer index.
    pub layer: usize,
    /// Absolute position of the new token (0-based; equals the tokens already cached).
    pub position: usize,
    /// Post-RoPE queries of all heads, head-major (`n_heads * head_dim`).
    pub q: &'a [f32],
    /// Post-RoPE key of the new token, head-major (`n_kv_heads * head_dim`).
    pub k: &'a [f32],
    /// Value of the new token, head-major (`n_kv_heads * head_dim`).
    pub v: &'a [f32],
    /// Heads and scale.
    pub shape: AttnShape,
}

/// A KV-cache policy: decides which cached rows each decode step attends to.
///
/// The decoder calls [`attend`](Self::attend) once per layer per decode step; the policy appends
/// the new key and value to the cache (every policy keeps the full history there) and writes the
/// attention output. Prefill always runs dense attention and then calls
/// [`after_prefill`](Self::after_prefill), so a policy can build its page summaries.
pub trait KvPolicy: Send {
    /// Short name (`"full"`, `"freekv"`, ...).
    fn name(&self) -> &str;

    /// A new sequence starts; the cache was cleared.
    fn reset(&mut self) {}

    /// The prompt's keys and values of every layer are in `cache`.
    fn after_prefill(&mut self, cache: &PagedKvCache) -> Result<(), ModelError> {
        let _ = cache;
        Ok(())
    }

    /// Append `step.k`/`step.v` to layer `step.layer` of `cache` and write the attention output of
    /// `step.q` into `out` (`n_heads * head_dim`, head-major).
    fn attend(
        &mut self,
        step: &LayerStep<'_>,
        cache: &mut PagedKvCache,
        out: &mut [f32],
    ) -> Result<(), ModelError>;

    /// Every layer of one decode step is done.
    fn end_step(&mut self) {}

    /// Run statistics for reports (`None` when the policy keeps none).
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Full attention over every cached row: the default policy and the reference the others match.
#[derive(Debug, Default)]
pub struct DenseKv {
    scratch: AttnScratch,
}

impl DenseKv {
    /// A dense policy.
    pub fn new() -> Self {
        Self::default()
    }
}

impl KvPolicy for DenseKv {
    fn name(&self) -> &str {
        "full"
    }

    fn attend(
        &mut self,
        step: &LayerStep<'_>,
        cache: &mut PagedKvCache,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        cache.append(step.layer, step.k, step.v)?;
        decode_attention(
            &CacheLayer::new(cache, step.layer),
            step.q,
            &step.shape,
            out,
            &mut self.scratch,
        )
    }
}

/// The inner loops, compiled twice: with AVX2+FMA (chosen at run time) and portable.
pub(crate) mod kernels {
    use super::{Geo, KvBlock};

    /// `a * b + c`, fused or not.
    trait MulAdd {
        fn mul_add(a: f32, b: f32, c: f32) -> f32;
    }

    /// Plain multiply and add (portable).
    struct Plain;
    impl MulAdd for Plain {
        #[inline(always)]
        fn mul_add(a: f32, b: f32, c: f32) -> f32 {
            a * b + c
        }
    }

    /// Fused multiply-add; only used inside functions compiled with the `fma` feature.
    #[cfg(target_arch = "x86_64")]
    struct Fused;
    #[cfg(target_arch = "x86_64")]
    impl MulAdd for Fused {
        #[inline(always)]
        fn mul_add(a: f32, b: f32, c: f32) -> f32 {
            a.mul_add(b, c)
        }
    }

    /// Whether the AVX2+FMA kernels run: the CPU has them and `FREEKV_NO_SIMD` does not ask for
    /// the portable ones (the same switch as the matrix products, see
    /// [`Isa::active`](crate::qmatmul::Isa::active)).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    fn has_fma() -> bool {
        crate::qmatmul::Isa::active() == crate::qmatmul::Isa::Avx2
    }

    /// Dot product, 16 lanes.
    #[inline(always)]
    fn dot<M: MulAdd>(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        let mut acc = [0.0f32; 16];
        let (ac, at) = a.as_chunks::<16>();
        let (bc, bt) = b.as_chunks::<16>();
        for (x, y) in ac.iter().zip(bc) {
            for i in 0..16 {
                acc[i] = M::mul_add(x[i], y[i], acc[i]);
            }
        }
        let mut tail = 0.0;
        for (x, y) in at.iter().zip(bt) {
            tail = M::mul_add(*x, *y, tail);
        }
        for w in [8, 4, 2, 1] {
            for i in 0..w {
                acc[i] += acc[i + w];
            }
        }
        acc[0] + tail
    }

    /// `y += a * x`.
    #[inline(always)]
    fn axpy<M: MulAdd>(y: &mut [f32], a: f32, x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = M::mul_add(a, x, *y);
        }
    }

    /// `exp(x)` for `x <= 88` (Cephes polynomial, ~1 ulp; tiny instead of 0 below -87.3).
    #[inline(always)]
    fn exp<M: MulAdd>(x: f32) -> f32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        let x = x.clamp(-87.3, 88.3);
        let t = M::mul_add(x, std::f32::consts::LOG2_E, MAGIC);
        let n = t - MAGIC;
        let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
        let r = M::mul_add(n, -0.693_359_4, x);
        let r = M::mul_add(n, 2.121_944_4e-4, r);
        let mut p = 1.987_569_1e-4;
        p = M::mul_add(p, r, 1.398_199_9e-3);
        p = M::mul_add(p, r, 8.333_452e-3);
        p = M::mul_add(p, r, 4.166_579_6e-2);
        p = M::mul_add(p, r, 0.166_666_65);
        p = M::mul_add(p, r, 0.5);
        let y = M::mul_add(p, r * r, r) + 1.0;
        let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
        y * scale
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn scores_impl<M: MulAdd>(
        b: &KvBlock<'_>,
        off: usize,
        take: usize,
        abs0: usize,
        j0: usize,
        geo: &Geo,
        queries: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        let d = geo.d;
        for r in 0..take {
            let k = b.key(off + r);
            let q0 = geo.causal.map_or(0, |c| c.first_query(abs0 + r));
            for qi in q0..geo.n_q {
                let s = dot::<M>(&queries[qi * d..(qi + 1) * d], k);
                scores[qi * geo.n + j0 + r] = s * scale;
            }
        }
    }

    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn accumulate_impl<M: MulAdd>(
        b: &KvBlock<'_>,
        off: usize,
        take: usize,
        abs0: usize,
        j0: usize,
        geo: &Geo,
        probs: &[f32],
        acc: &mut [f32],
    ) {
        let d = geo.d;
        for r in 0..take {
            let v = b.value(off + r);
            let q0 = geo.causal.map_or(0, |c| c.first_query(abs0 + r));
            for qi in q0..geo.n_q {
                let p = probs[qi * geo.n + j0 + r];
                axpy::<M>(&mut acc[qi * d..(qi + 1) * d], p, v);
            }
        }
    }

    #[inline(always)]
    fn exp_sub_sum_impl<M: MulAdd>(s: &mut [f32], m: f32) -> f32 {
        let mut lanes = [0.0f32; 8];
        let (chunks, tail) = s.as_chunks_mut::<8>();
        for c in chunks {
            for i in 0..8 {
                c[i] = exp::<M>(c[i] - m);
                lanes[i] += c[i];
            }
        }
        let mut t = 0.0;
        for x in tail {
            *x = exp::<M>(*x - m);
            t += *x;
        }
        for w in [4, 2, 1] {
            for i in 0..w {
                lanes[i] += lanes[i + w];
            }
        }
        lanes[0] + t
    }

    /// Explicit AVX2 kernels for `head_dim % 8 == 0`. Scores are computed for 8 rows of one
    /// query at a time and reduced with one transpose-add; a single row (at block ends) is reduced
    /// in exactly the same order, so results do not depend on where blocks end.
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub(super) fn load8(a: &[f32]) -> __m256 {
            let a: &[f32; 8] = a[..8].try_into().unwrap_or(&[0.0; 8]);
            // SAFETY: `a` is 8 readable floats.
            unsafe { _mm256_loadu_ps(a.as_ptr()) }
        }

        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub(super) fn store8(dst: &mut [f32], v: __m256) {
            if let Some(d) = dst.get_mut(..8) {
                // SAFETY: `d` is 8 writable floats.
                unsafe { _mm256_storeu_ps(d.as_mut_ptr(), v) }
            }
        }

        /// Lane `i` of the result is the sum of the lanes of `a[i]`, each summed as
        /// `((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7))`.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub(super) fn reduce8(a: &[__m256; 8]) -> __m256 {
            let t0 = _mm256_hadd_ps(a[0], a[1]);
            let t1 = _mm256_hadd_ps(a[2], a[3]);
            let t2 = _mm256_hadd_ps(a[4], a[5]);
            let t3 = _mm256_hadd_ps(a[6], a[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
            let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
            _mm256_add_ps(lo, hi)
        }

        /// The sum of the lanes of `a`, in the order of [`reduce8`].
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        pub(super) fn reduce1(a: __m256) -> f32 {
            let mut l = [0.0f32; 8];
            store8(&mut l, a);
            ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
        }
    }

    /// Row `r` of `keys_or_values` as a fixed-size array (the block's length check makes this
    /// infallible; a zero row is returned otherwise, which cannot happen).
    #[inline(always)]
    fn row_arr<const D: usize>(row: &[f32]) -> &[f32; D] {
        row.get(..D)
            .and_then(|r| r.try_into().ok())
            .unwrap_or(&[0.0; D])
    }

    /// [`scores_fma`] for a compile-time head dimension: no bounds checks in the inner loops.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn scores_const<const D: usize>(
        b: &KvBlock<'_>,
        off: usize,
        take: usize,
        abs0: usize,
        j0: usize,
        geo: &Geo,
        queries: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        use avx2::{load8, reduce1, reduce8, store8};
        use std::arch::x86_64::*;
        let vscale = _mm256_set1_ps(scale);
        for qi in 0..geo.n_q {
            let vis = geo.causal.map_or(take, |c| c.visible(qi, abs0, take));
            let q: &[f32; D] = row_arr(&queries[qi * D..]);
            let base = qi * geo.n + j0;
            let dst = &mut scores[base..base + vis];
            let mut r = 0;
            while r + 8 <= vis {
                let rows: [&[f32; D]; 8] = std::array::from_fn(|i| row_arr(b.key(off + r + i)));
                let mut acc = [_mm256_setzero_ps(); 8];
                for cc in 0..D / 8 {
                    let qc = load8(&q[cc * 8..]);
                    for i in 0..8 {
                        acc[i] = _mm256_fmadd_ps(qc, load8(&rows[i][cc * 8..]), acc[i]);
                    }
                }
                store8(&mut dst[r..], _mm256_mul_ps(reduce8(&acc), vscale));
                r += 8;
            }
            while r < vis {
                let k: &[f32; D] = row_arr(b.key(off + r));
                let mut acc = _mm256_setzero_ps();
                for cc in 0..D / 8 {
                    acc = _mm256_fmadd_ps(load8(&q[cc * 8..]), load8(&k[cc * 8..]), acc);
                }
                dst[r] = reduce1(acc) * scale;
                r += 1;
            }
        }
    }

    /// [`accumulate_fma`] for a compile-time head dimension (a multiple of 64).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn accumulate_const<const D: usize>(
        b: &KvBlock<'_>,
        off: usize,
        take: usize,
        abs0: usize,
        j0: usize,
        geo: &Geo,
        probs: &[f32],
        acc: &mut [f32],
    ) {
        use avx2::{load8, store8};
        use std::arch::x86_64::*;
        for qi in 0..geo.n_q {
            let vis = geo.causal.map_or(take, |c| c.visible(qi, abs0, take));
            if vis == 0 {
                continue;
            }
            let base = qi * geo.n + j0;
            let p = &probs[base..base + vis];
            let out = &mut acc[qi * D..(qi + 1) * D];
            for s in 0..D / 64 {
                let mut a: [__m256; 8] = std::array::from_fn(|i| load8(&out[s * 64 + 8 * i..]));
                for (r, &pr) in p.iter().enumerate() {
                    let pv = _mm256_set1_ps(pr);
                    let v: &[f32; D] = row_arr(b.value(off + r));
                    for i in 0..8 {
                        a[i] = _mm256_fmadd_ps(pv, load8(&v[s * 64 + 8 * i..]), a[i]);
                    }
                }
                for (i, ai) in a.iter().enumerate() {
                    store8(&mut out[s * 64 + 8 * i..], *ai);
                }
            }
        }
    }

    /// Ask the cache hierarchy for the keys (`values == false`) or values of a block.
    pub(super) fn prefetch(b: &KvBlock<'_>, values: bool) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let data = if values { b.values } else { b.keys };
            let line = |i: usize| {
                if let Some(x) = data.get(i..) {
                    // SAFETY: prefetching never faults; the address is inside `data`.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().cast()) };
                }
            };
            if b.stride == b.dim {
                // Contiguous rows: every 64-byte line of the block.
                (0..b.rows * b.dim).step_by(16).for_each(line);
            } else {
                for r in 0..b.rows {
                    (r * b.stride..r * b.stride + b.dim)
                        .step_by(16)
                        .for_each(line);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b, values);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn scores_fma(
        b: &KvBlock<'_>,
        off: usize,
        take: usize,
        abs0: usize,
        j0: usize,
        geo: &Geo,
        queries: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        use avx2::{load8, reduce1, reduce8, store8};
        use std::arch::x86_64::*;
        let d = geo.d;
        if !d.is_multiple_of(8) {
            return scores_impl::<Fused>(b, off, take, abs0, j0, geo, queries, scale, scores);
        }
        match d {
            64 => return scores_const::<64>(b, off, take, abs0, j0, geo, queries, scale, scores),
            128 => return scores_const::<128>(b, off, take, abs0, j0, geo, queries, scale, scores),
            _ => {}
        }
        let vscale = _mm256_set1_ps(scale);
        for qi in 0..geo.n_q {
            let vis = geo.causal.map_or(take, |c| c.visible(qi, abs0, take));
            let q = &queries[qi * d..(qi + 1) * d];
            let base = qi * geo.n + j0;
            let dst = &mut scores[base..base + vis];
            let mut r = 0;
            while r + 8 <= vis {
                let rows: [&[f32]; 8] = std::array::from_fn(|i| b.key(off + r + i));
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < d {
                    let qc = load8(&q[c..]);
                    for i in 0..8 {
                        acc[i] = _mm256_fmadd_ps(qc, load8(&rows[i][c..]), acc[i]);
                    }
                    c += 8;
                }
                store8(&mut dst[r..], _mm256_mul_ps(reduce8(&acc), vscale));
                r += 8;
            }
            while r < vis {
                let k = b.key(off + r);
                let mut acc = _mm256_setzero_ps();
                let mut c = 0;
                while c < d {
                    acc = _mm256_fmadd_ps(load8(&q[c..]), load8(&k[c..]), acc);
                    c += 8;
                }
                dst[r] = reduce1(acc) * scale;
                r += 1;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    fn accumulate_fma(
        b: &KvBlock<'_>,
        off: usize,
        take: usize,
        abs0: usize,
        j0: usize,
        geo: &Geo,
        probs: &[f32],
        acc: &mut [f32],
    ) {
        use avx2::{load8, store8};
        use std::arch::x86_64::*;
        let d = geo.d;
        if !d.is_multiple_of(8) {
            return accumulate_impl::<Fused>(b, off, take, abs0, j0, geo, probs, acc);
        }
        match d {
            64 => return accumulate_const::<64>(b, off, take, abs0, j0, geo, probs, acc),
            128 => return accumulate_const::<128>(b, off, take, abs0, j0, geo, probs, acc),
            _ => {}
        }
        for qi in 0..geo.n_q {
            let vis = geo.causal.map_or(take, |c| c.visible(qi, abs0, take));
            if vis == 0 {
                continue;
            }
            let base = qi * geo.n + j0;
            let p = &probs[base..base + vis];
            let out = &mut acc[qi * d..(qi + 1) * d];
            let mut s = 0;
            while s < d {
                if d - s >= 64 {
                    // 64 columns in 8 registers across all rows.
                    let mut a: [__m256; 8] = std::array::from_fn(|i| load8(&out[s + 8 * i..]));
                    for (r, &pr) in p.iter().enumerate() {
                        let pv = _mm256_set1_ps(pr);
                        let v = &b.value(off + r)[s..s + 64];
                        for i in 0..8 {
                            a[i] = _mm256_fmadd_ps(pv, load8(&v[8 * i..]), a[i]);
                        }
                    }
                    for (i, ai) in a.iter().enumerate() {
                        store8(&mut out[s + 8 * i..], *ai);
                    }
                    s += 64;
                } else {
                    let mut a = load8(&out[s..]);
                    for (r, &pr) in p.iter().enumerate() {
                        let v = b.value(off + r);
                        a = _mm256_fmadd_ps(_mm256_set1_ps(pr), load8(&v[s..]), a);
                    }
                    store8(&mut out[s..], a);
                    s += 8;
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn exp_sub_sum_fma(s: &mut [f32], m: f32) -> f32 {
        exp_sub_sum_impl::<Fused>(s, m)
    }

    /// Scores of rows `off..off + take` of `b` (absolute rows from `abs0`) into columns
    /// `j0..j0 + take` of the score matrix.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn scores(
        b: &KvBlock<'_>,
        off: usize,
        take: usize,
        abs0: usize,
        j0: usize,
        geo: &Geo,
        queries: &[f32],
        scale: f32,
        scores: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { scores_fma(b, off, take, abs0, j0, geo, queries, scale, scores) };
        }
        scores_impl::<Plain>(b, off, take, abs0, j0, geo, queries, scale, scores)
    }

    /// `acc[q] += p[q][j] · v_j` for rows `off..off + take` of `b`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn accumulate(
        b: &KvBlock<'_>,
        off: usize,
        take: usize,
        abs0: usize,
        j0: usize,
        geo: &Geo,
        probs: &[f32],
        acc: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { accumulate_fma(b, off, take, abs0, j0, geo, probs, acc) };
        }
        accumulate_impl::<Plain>(b, off, take, abs0, j0, geo, probs, acc)
    }

    /// Replace each `x` by `exp(x - m)` and return their sum.
    pub(super) fn exp_sub_sum(s: &mut [f32], m: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { exp_sub_sum_fma(s, m) };
        }
        exp_sub_sum_impl::<Plain>(s, m)
    }

    #[inline(always)]
    fn silu_mul_impl<M: MulAdd>(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            let x = *g;
            *g = x / (1.0 + exp::<M>(-x)) * u;
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn silu_mul_fma(gate: &mut [f32], up: &[f32]) {
        silu_mul_impl::<Fused>(gate, up)
    }

    #[inline(always)]
    fn sum_exp_impl<M: MulAdd>(s: &[f32], m: f32, scale: f32) -> f64 {
        let mut lanes = [0.0f64; 8];
        let (chunks, tail) = s.as_chunks::<8>();
        for c in chunks {
            for i in 0..8 {
                let e = exp::<M>((c[i] - m) * scale);
                // NaN inputs contribute nothing.
                lanes[i] += if c[i].is_nan() { 0.0 } else { e as f64 };
            }
        }
        let mut t = 0.0f64;
        for &x in tail {
            if !x.is_nan() {
                t += exp::<M>((x - m) * scale) as f64;
            }
        }
        lanes.iter().sum::<f64>() + t
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn sum_exp_fma(s: &[f32], m: f32, scale: f32) -> f64 {
        sum_exp_impl::<Fused>(s, m, scale)
    }

    /// `Σ exp((x - m) · scale)` over the non-NaN `x` of `s` (vectorised `exp`, `f64` sums), for
    /// `(x - m) · scale <= 88`.
    pub(crate) fn sum_exp(s: &[f32], m: f32, scale: f32) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { sum_exp_fma(s, m, scale) };
        }
        sum_exp_impl::<Plain>(s, m, scale)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn exp_one_fma(x: f32) -> f32 {
        exp::<Fused>(x)
    }

    /// The same `exp` as [`sum_exp`] uses, for one value (bit-identical to its lanes).
    pub(crate) fn exp_one(x: f32) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { exp_one_fma(x) };
        }
        exp::<Plain>(x)
    }

    /// `gate[i] = silu(gate[i]) * up[i]` (SwiGLU), with the vectorised `exp`.
    pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { silu_mul_fma(gate, up) };
        }
        silu_mul_impl::<Plain>(gate, up)
    }

    /// The largest element (`-inf` for an empty slice; NaN is ignored).
    pub(super) fn max(s: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let (chunks, tail) = s.as_chunks::<8>();
        for c in chunks {
            for i in 0..8 {
                lanes[i] = lanes[i].max(c[i]);
            }
        }
        let mut m = f32::NEG_INFINITY;
        for &x in tail.iter().chain(lanes.iter()) {
            m = m.max(x);
        }
        m
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn exp_matches_std() {
            let mut worst = 0.0f64;
            let mut x = -87.0f32;
            while x < 88.0 {
                let a = exp::<Plain>(x) as f64;
                let b = (x as f64).exp();
                worst = worst.max(((a - b) / b).abs());
                x += 0.0137;
            }
            assert!(worst < 3e-7, "worst relative error {worst}");
            assert!(exp::<Plain>(-200.0) < 1e-37);
            assert_eq!(exp::<Plain>(0.0), 1.0);
        }

        #[test]
        fn dot_and_max() {
            let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
            let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.25).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let got = dot::<Plain>(&a, &b) as f64;
            assert!((got - want).abs() <= 1e-5 * want.abs());
            assert_eq!(max(&a), 18.0);
            assert_eq!(max(&[]), f32::NEG_INFINITY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freekv_layout::PageGeometry;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Naive f64 attention of one query over `keys`/`values` (row-major `n × d`).
    fn naive(q: &[f32], keys: &[f32], values: &[f32], d: usize, scale: f64) -> Vec<f64> {
        let n = keys.len() / d;
        let s: Vec<f64> = (0..n)
            .map(|j| {
                (0..d)
                    .map(|i| q[i] as f64 * keys[j * d + i] as f64)
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
        let l: f64 = p.iter().sum();
        (0..d)
            .map(|i| (0..n).map(|j| p[j] * values[j * d + i] as f64).sum::<f64>() / l)
            .collect()
    }

    fn rel_err(a: &[f32], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    fn random(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-amp..amp)).collect()
    }

    /// A cache of `layers` filled with `n` random tokens; also returns per-head row-major K/V.
    fn filled_cache(
        seed: u64,
        page: usize,
        kv: usize,
        d: usize,
        n: usize,
    ) -> (PagedKvCache, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let g = PageGeometry::new(page, kv, d).unwrap();
        let mut c = PagedKvCache::new(g, 1, None).unwrap();
        let mut ks = vec![Vec::new(); kv];
        let mut vs = vec![Vec::new(); kv];
        for _ in 0..n {
            let k = random(&mut rng, kv * d, 2.0);
            let v = random(&mut rng, kv * d, 1.0);
            c.append(0, &k, &v).unwrap();
            for h in 0..kv {
                ks[h].extend_from_slice(&k[h * d..(h + 1) * d]);
                vs[h].extend_from_slice(&v[h * d..(h + 1) * d]);
            }
        }
        (c, ks, vs)
    }

    #[test]
    fn decode_matches_naive_and_is_page_size_independent() {
        // Head dims of every kernel variant: const 64 and 128, dynamic multiple of 8, generic.
        for (d, sizes) in [
            (16, &[1usize, 5, 33, 300, 1100][..]),
            (64, &[7, 300][..]),
            (128, &[13, 520][..]),
            (12, &[9, 270][..]),
        ] {
            decode_case(d, sizes);
        }
    }

    fn decode_case(d: usize, sizes: &[usize]) {
        let (nh, kv) = (6, 2);
        let shape = AttnShape::new(nh, kv, d).unwrap();
        for &n in sizes {
            let mut rng = StdRng::seed_from_u64(n as u64);
            let q = random(&mut rng, nh * d, 1.0);
            let mut outs = Vec::new();
            for page in [1usize, 3, 32] {
                let (c, ks, vs) = filled_cache(7, page, kv, d, n);
                let mut out = vec![0.0; nh * d];
                let mut scratch = AttnScratch::new();
                decode_attention(&CacheLayer::new(&c, 0), &q, &shape, &mut out, &mut scratch)
                    .unwrap();
                for h in 0..nh {
                    let kh = h / shape.group();
                    let want = naive(
                        &q[h * d..(h + 1) * d],
                        &ks[kh],
                        &vs[kh],
                        d,
                        shape.scale as f64,
                    );
                    let e = rel_err(&out[h * d..(h + 1) * d], &want);
                    assert!(e < 1e-5, "d={d} n={n} page={page} head={h}: rel err {e}");
                }
                outs.push(out);
            }
            assert_eq!(outs[0], outs[1], "d={d} n={n}: page 1 vs 3");
            assert_eq!(outs[0], outs[2], "d={d} n={n}: page 1 vs 32");
        }
    }

    #[test]
    fn explicit_blocks_with_nhd_stride_match_cache() {
        // The same rows as NHD slots (stride kv*d), cut into uneven blocks.
        let (nh, kv, d, n) = (4, 2, 8, 70);
        let shape = AttnShape::new(nh, kv, d).unwrap();
        let (c, _, _) = filled_cache(3, 4, kv, d, n);
        let mut rng = StdRng::seed_from_u64(9);
        let q = random(&mut rng, nh * d, 1.0);
        // Build token-major NHD buffers.
        let mut kbuf = vec![0.0; n * kv * d];
        let mut vbuf = vec![0.0; n * kv * d];
        for t in 0..n {
            for h in 0..kv {
                let k = c.keys(0, t / 4, h).unwrap();
                let v = c.values(0, t / 4, h).unwrap();
                let r = (t % 4) * d;
                kbuf[(t * kv + h) * d..(t * kv + h + 1) * d].copy_from_slice(&k[r..r + d]);
                vbuf[(t * kv + h) * d..(t * kv + h + 1) * d].copy_from_slice(&v[r..r + d]);
            }
        }
        let cuts = [0usize, 7, 8, 30, 31, 70];
        let lists: Vec<Vec<KvBlock<'_>>> = (0..kv)
            .map(|h| {
                cuts.windows(2)
                    .map(|w| {
                        let s = (w[0] * kv + h) * d;
                        KvBlock::new(&kbuf[s..], &vbuf[s..], w[1] - w[0], kv * d, d).unwrap()
                    })
                    .collect()
            })
            .collect();
        let mut a = vec![0.0; nh * d];
        let mut b = vec![0.0; nh * d];
        let mut scratch = AttnScratch::new();
        decode_attention(lists.as_slice(), &q, &shape, &mut a, &mut scratch).unwrap();
        decode_attention(&CacheLayer::new(&c, 0), &q, &shape, &mut b, &mut scratch).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn prefill_matches_decode_per_position() {
        prefill_case(16);
        prefill_case(64);
    }

    fn prefill_case(d: usize) {
        let (nh, kv, n) = (6, 3, 45);
        let shape = AttnShape::new(nh, kv, d).unwrap();
        let (c, ks, vs) = filled_cache(11, 8, kv, d, n);
        let mut rng = StdRng::seed_from_u64(5);
        let first = 10;
        let t = n - first;
        let q = random(&mut rng, t * nh * d, 1.0);
        let mut out = vec![0.0; q.len()];
        let mut scratch = AttnScratch::new();
        prefill_attention(
            &CacheLayer::new(&c, 0),
            &q,
            first,
            &shape,
            &mut out,
            &mut scratch,
        )
        .unwrap();
        for tok in 0..t {
            let pos = first + tok;
            for h in 0..nh {
                let kh = h / shape.group();
                let qh = &q[(tok * nh + h) * d..(tok * nh + h + 1) * d];
                let want = naive(
                    qh,
                    &ks[kh][..(pos + 1) * d],
                    &vs[kh][..(pos + 1) * d],
                    d,
                    shape.scale as f64,
                );
                let got = &out[(tok * nh + h) * d..(tok * nh + h + 1) * d];
                let e = rel_err(got, &want);
                assert!(e < 1e-5, "token {tok} head {h}: {e}");
            }
        }
    }

    #[test]
    fn merge_of_partial_states_is_exact() {
        let (kv, d, n) = (1, 8, 50);
        let (c, ks, vs) = filled_cache(1, 5, kv, d, n);
        let src = CacheLayer::new(&c, 0);
        let mut rng = StdRng::seed_from_u64(2);
        let q = random(&mut rng, 2 * d, 3.0);
        let mut ks_ = KernelScratch::default();
        let mut a = PartialAttn::default();
        let mut b = PartialAttn::default();
        a.reset(2, d);
        b.reset(2, d);
        attend_rows(&src, 0, 0..17, &q, d, 0.3, None, &mut ks_, &mut a).unwrap();
        attend_rows(&src, 0, 17..50, &q, d, 0.3, None, &mut ks_, &mut b).unwrap();
        a.merge(&b, d);
        let mut out = vec![0.0; 2 * d];
        a.finish(d, &mut out);
        for i in 0..2 {
            let want = naive(&q[i * d..(i + 1) * d], &ks[0], &vs[0], d, 0.3);
            assert!(rel_err(&out[i * d..(i + 1) * d], &want) < 1e-5);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(AttnShape::new(6, 4, 8).is_err());
        assert!(AttnShape::new(0, 1, 8).is_err());
        let k = [0.0f32; 10];
        assert!(KvBlock::new(&k, &k, 2, 4, 8).is_err());
        assert!(KvBlock::new(&k, &k, 2, 8, 8).is_err());
        assert!(KvBlock::new(&k, &k, 1, 8, 8).is_ok());
        let (c, _, _) = filled_cache(1, 4, 1, 8, 3);
        let shape = AttnShape::new(2, 1, 8).unwrap();
        let mut scratch = AttnScratch::new();
        let mut out = vec![0.0; 16];
        let src = CacheLayer::new(&c, 0);
        assert!(decode_attention(&src, &[0.0; 15], &shape, &mut out, &mut scratch).is_err());
        // Prefill needs rows for every query position.
        let q = vec![0.0; 2 * 16];
        let mut out2 = vec![0.0; 32];
        assert!(prefill_attention(&src, &q, 2, &shape, &mut out2, &mut scratch).is_err());
        assert!(prefill_attention(&src, &q, 1, &shape, &mut out2, &mut scratch).is_ok());
    }

    /// A source that claims rows but cannot produce its blocks.
    struct Broken;
    impl KvBlocks for Broken {
        fn num_rows(&self, _: usize) -> usize {
            600
        }
        fn num_blocks(&self, _: usize) -> usize {
            1
        }
        fn block(&self, _: usize, _: usize) -> Result<KvBlock<'_>, ModelError> {
            Err(ModelError::Shape("broken".into()))
        }
    }

    #[test]
    fn errors_do_not_leak_into_later_calls() {
        let shape = AttnShape::new(2, 1, 8).unwrap();
        let mut scratch = AttnScratch::new();
        let mut out = vec![0.0; 16];
        let q = vec![0.5; 16];
        assert!(decode_attention(&Broken, &q, &shape, &mut out, &mut scratch).is_err());
        let (c, _, _) = filled_cache(4, 4, 1, 8, 600);
        decode_attention(&CacheLayer::new(&c, 0), &q, &shape, &mut out, &mut scratch).unwrap();
        let mut q2 = vec![0.5; 2 * 16];
        assert!(prefill_attention(&Broken, &q2, 0, &shape, &mut q2.clone(), &mut scratch).is_err());
        let mut out2 = vec![0.0; 32];
        q2[0] = 1.0;
        prefill_attention(
            &CacheLayer::new(&c, 0),
            &q2,
            3,
            &shape,
            &mut out2,
            &mut scratch,
        )
        .unwrap();
    }

    #[test]
    fn empty_rows_give_zeros() {
        let lists: Vec<Vec<KvBlock<'_>>> = vec![Vec::new()];
        let shape = AttnShape::new(2, 1, 4).unwrap();
        let mut out = vec![1.0; 8];
        let mut scratch = AttnScratch::new();
        decode_attention(lists.as_slice(), &[1.0; 8], &shape, &mut out, &mut scratch).unwrap();
        assert_eq!(out, vec![0.0; 8]);
    }

    #[test]
    fn dense_policy_appends_then_attends() {
        let g = PageGeometry::new(4, 1, 4).unwrap();
        let mut c = PagedKvCache::new(g, 2, None).unwrap();
        let shape = AttnShape::new(2, 1, 4).unwrap();
        let mut p = DenseKv::new();
        let q = [1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let k = [0.5f32, 0.5, 0.5, 0.5];
        let v = [1.0f32, 2.0, 3.0, 4.0];
        let mut out = [0.0f32; 8];
        let step = LayerStep {
            layer: 1,
            position: 0,
            q: &q,
            k: &k,
            v: &v,
            shape,
        };
        p.attend(&step, &mut c, &mut out).unwrap();
        assert_eq!(c.len(1), 1);
        assert_eq!(c.len(0), 0);
        // One row: the output is that row's value for every head.
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(p.name(), "full");
    }
}
