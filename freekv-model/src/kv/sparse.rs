//! The sparse KV policies — `quest`, `arkvale` and `freekv` — on the CPU backend.
//!
//! # Memory model
//!
//! * The session's [`PagedKvCache`] is the full history (every policy appends to it). The sparse
//!   policies read the **sink pages and the recent window** (the current page included) straight
//!   from it: on the CPU those pages are "resident" by definition, and reading them in place
//!   keeps the data path short. Only the **retrieved (middle) pages** go through selection,
//!   recall and the resident slots.
//! * `arkvale` and `freekv` keep a **host mirror**: their own [`PagedKvCache`] behind an
//!   `Arc<RwLock<…>>` that every new token of a sparse-capable layer is appended to (the
//!   "offload" of the spec, §5.3). The recall executors read the mirror (never the session's
//!   cache, which the policy only borrows per call), so a speculative recall can run on the
//!   executor's worker threads while the model goes on: the workers take short read locks on
//!   the mirror, the model a short write lock per (layer, step) to append.
//! * Per sparse layer, a [`SlotPool`] (`nb` NHD slots, `Arc<RwLock<…>>`) holds the recalled
//!   middle pages, and a [`LayerResidency`] maps slots ↔ logical pages per KV head.
//!
//! # One sparse layer, one decode step
//!
//! A layer is sparse when it holds more pages than the budget `nb`; below that every policy runs
//! full attention over the cache (so with a budget at least the context, every policy equals
//! `full` exactly). Dense layers (`--dense-layers`) always run full attention.
//!
//! * `quest`: select with `q_t` (per KV head), attend sinks + selected + window, all read from
//!   the cache. No recall.
//! * `arkvale`: select with `q_t`, synchronously recall the missing pages into the slots, attend.
//!   A layer's first sparse step evicts the middle slots (their data were never written), so it
//!   recalls the whole selection.
//! * `freekv`: wait for the speculative recall issued after this layer's attention at the
//!   previous step (selected with `q_{t−1}`). Correction: per KV group, the mean cosine of
//!   `q_t` and `q_{t−1}`; the flagged KV heads (cosine < τ, or all of them for τ = `always`)
//!   re-select with `q_t` and recall synchronously. Attention. Then select with `q_t` for every
//!   KV head (the flagged heads reuse their fresh selection, a no-op diff) and submit the recall
//!   of the differences, to be waited for before this layer's next attention. The first sparse
//!   step of a layer is synchronous (select with `q_t`, recall everything).
//!
//! Attention visits the attended pages in **ascending logical order** (sinks, middle pages sorted
//! by page, window), and the attention kernel's result depends only on the sequence of rows;
//! so `quest` and `arkvale` are bitwise equal, and so are `freekv` with τ = `always` and
//! `arkvale`.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use freekv_layout::{Budget, LayerResidency, PageGeometry, PagedKvCache, SlotPool};
use freekv_recall::{
    CpuRecallConfig, CpuRecallExecutor, CpuTarget, CpuTicket, RecallExecutor, RecallPlan,
    RecallStats, SharedHost, SharedSlots, SyncMode, SyncRecallExecutor,
};
use freekv_select::{PageSummaries, QueryHistory, Selection, Selector, SelectorConfig};

use crate::ModelError;
use crate::attention::{AttnScratch, CacheLayer, KvBlock, KvPolicy, LayerStep, decode_attention};
use crate::kv::{KvConfig, KvKind, KvStats, SpecRecall};

/// The middle pages one KV head attended at one (step, layer), ascending (for tests and traces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttendedPages {
    /// Decode step (0-based, counted by `end_step` since the policy was built).
    pub step: u64,
    /// Layer.
    pub layer: usize,
    /// KV head.
    pub kv_head: usize,
    /// Retrieved pages attended besides sinks and window, ascending.
    pub pages: Vec<usize>,
}

/// Per KV head, the attended middle pages `(page, Some(slot))` (resident) or `(page, None)` (read
/// from the cache), ascending page.
type MiddlePages = Vec<Vec<(usize, Option<usize>)>>;

/// A shared recorder of [`AttendedPages`] (see [`SparseKv::with_trace`]).
pub type SelectionTrace = Arc<Mutex<Vec<AttendedPages>>>;

fn poisoned(what: &str) -> ModelError {
    ModelError::Config(format!(
        "{what}: lock poisoned by a panic in another thread"
    ))
}

/// Per-layer state of a sparse policy.
struct LayerState {
    summaries: PageSummaries,
    /// Slot tables (`arkvale`, `freekv`).
    residency: Option<LayerResidency>,
    /// Resident NHD slots and the recall target over them (`arkvale`, `freekv`).
    slots: Option<(SharedSlots<f32>, CpuTarget<f32>)>,
    /// The speculative recall to wait for before the next attention (`freekv`, threads).
    pending: Option<CpuTicket>,
    /// Whether the layer has had its first (synchronous) sparse step.
    sparse_started: bool,
    /// Tokens of this layer appended to the host mirror.
    mirrored: usize,
    /// Per KV head, the previous selection (for the overlap statistic).
    last_sel: Vec<Option<Vec<usize>>>,
}

/// The sparse policies `quest`, `arkvale` and `freekv` (see the module docs).
pub struct SparseKv {
    kind: KvKind,
    budget: Budget,
    selector: Selector,
    cfg: KvConfig,
    layers: Vec<LayerState>,
    geom: Option<PageGeometry>,
    /// The host mirror (`arkvale`, `freekv`), created at the first call.
    host: Option<Arc<RwLock<PagedKvCache>>>,
    sync_exec: SyncRecallExecutor<f32>,
    async_exec: Option<CpuRecallExecutor<f32>>,
    queries: QueryHistory,
    scratch: AttnScratch,
    stats: KvStats,
    trace: Option<SelectionTrace>,
}

impl std::fmt::Debug for SparseKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseKv")
            .field("kind", &self.kind)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl SparseKv {
    /// A sparse policy for `cfg.kind` (`quest`, `arkvale` or `freekv`); `n_layers` is the model's
    /// layer count (for validation). Errors on an invalid configuration or on `full`.
    pub fn new(cfg: &KvConfig, n_layers: usize) -> Result<Self, ModelError> {
        cfg.validate(n_layers)?;
        if cfg.kind == KvKind::Full {
            return Err(ModelError::Config(
                "SparseKv implements quest, arkvale and freekv; use DenseKv for full".into(),
            ));
        }
        let budget = cfg.budget_pages()?;
        let selector = Selector::new(SelectorConfig {
            top_k: budget.retrieved_pages(),
            sink_pages: budget.sink_pages(),
            window_pages: budget.window_pages(),
            policy: cfg.group_policy,
            summary: cfg.summary,
        })?;
        let async_exec = match (cfg.kind, cfg.spec_recall) {
            (KvKind::FreeKv, SpecRecall::Threads) => {
                Some(CpuRecallExecutor::new(CpuRecallConfig::default())?)
            }
            _ => None,
        };
        Ok(Self {
            kind: cfg.kind,
            budget,
            selector,
            cfg: cfg.clone(),
            layers: Vec::new(),
            geom: None,
            host: None,
            sync_exec: SyncRecallExecutor::new(SyncMode::Direct, 8)?,
            async_exec,
            queries: QueryHistory::new(n_layers),
            scratch: AttnScratch::new(),
            stats: KvStats::new(cfg.kind.name()),
            trace: None,
        })
    }

    /// Record the attended middle pages of every sparse (step, layer, KV head) into `trace`.
    pub fn with_trace(mut self, trace: SelectionTrace) -> Self {
        self.trace = Some(trace);
        self
    }

    /// The run statistics so far.
    pub fn kv_stats(&self) -> &KvStats {
        &self.stats
    }

    /// The per-layer budget.
    pub fn budget(&self) -> Budget {
        self.budget
    }

    fn uses_slots(&self) -> bool {
        self.kind != KvKind::Quest
    }

    fn is_dense_layer(&self, layer: usize) -> bool {
        self.cfg.dense_layers.contains(&layer)
    }

    /// Create the per-layer state (and the host mirror) for `cache`'s geometry.
    fn ensure_init(&mut self, cache: &PagedKvCache) -> Result<(), ModelError> {
        let g = cache.geometry();
        if self.geom == Some(g) && self.layers.len() == cache.layers() {
            return Ok(());
        }
        if g.page_size != self.budget.page_size() {
            return Err(ModelError::Config(format!(
                "the session's page size {} differs from the KV policy's {}",
                g.page_size,
                self.budget.page_size()
            )));
        }
        self.wait_all();
        let n = cache.layers();
        self.geom = Some(g);
        let host = if self.uses_slots() {
            // A mirror of the same shape (kept by `reset`) is emptied and reused: its pages go
            // back to its pool instead of being freed and allocated again for every sequence.
            let reusable = self.host.as_ref().and_then(|h| {
                let mut m = h.write().ok()?;
                (m.geometry() == g && m.layers() == n).then(|| {
                    m.clear();
                    Arc::clone(h)
                })
            });
            let mirror = match reusable {
                Some(m) => m,
                None => Arc::new(RwLock::new(PagedKvCache::new(g, n, None)?)),
            };
            self.host = Some(Arc::clone(&mirror));
            Some(mirror)
        } else {
            self.host = None;
            None
        };
        self.layers.clear();
        for _ in 0..n {
            let (residency, slots) = match &host {
                Some(h) => {
                    let pool = Arc::new(RwLock::new(SlotPool::<f32>::new(
                        g,
                        self.budget.total_pages(),
                    )?));
                    let shared: SharedHost<f32> = h.clone();
                    let target = CpuTarget::single(shared, Arc::clone(&pool));
                    (
                        Some(LayerResidency::new(self.budget, g.kv_heads)?),
                        Some((pool, target)),
                    )
                }
                None => (None, None),
            };
            self.layers.push(LayerState {
                summaries: self.selector.new_summaries(g),
                residency,
                slots,
                pending: None,
                sparse_started: false,
                mirrored: 0,
                last_sel: vec![None; g.kv_heads],
            });
        }
        Ok(())
    }

    /// Wait for every pending speculative recall (errors are dropped: the state is being reset).
    fn wait_all(&mut self) {
        if let Some(exec) = &self.async_exec {
            for st in &mut self.layers {
                if let Some(t) = st.pending.take() {
                    let _ = exec.wait(t);
                }
            }
        }
    }

    /// Bring the mirror, the slot tables and the summaries of `layer` up to the cache.
    fn sync_layer(&mut self, layer: usize, cache: &PagedKvCache) -> Result<(), ModelError> {
        let len = cache.len(layer);
        let g = cache.geometry();
        let st = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| ModelError::Config(format!("no KV state for layer {layer}")))?;
        if let Some(host) = &self.host
            && st.mirrored < len
        {
            let (p, hk, d) = (g.page_size, g.kv_heads, g.head_dim);
            let mut kb = vec![0.0f32; hk * d];
            let mut vb = vec![0.0f32; hk * d];
            let mut h = host.write().map_err(|_| poisoned("host mirror"))?;
            if h.len(layer) != st.mirrored {
                return Err(ModelError::Config(format!(
                    "host mirror of layer {layer} holds {} tokens, expected {}",
                    h.len(layer),
                    st.mirrored
                )));
            }
            for t in st.mirrored..len {
                let (page, row) = (t / p, t % p);
                for head in 0..hk {
                    let ks = cache.keys(layer, page, head)?;
                    let vs = cache.values(layer, page, head)?;
                    let (Some(kr), Some(vr)) = (
                        ks.get(row * d..(row + 1) * d),
                        vs.get(row * d..(row + 1) * d),
                    ) else {
                        return Err(ModelError::Shape(format!(
                            "cache page {page} of layer {layer} is shorter than row {row}"
                        )));
                    };
                    kb[head * d..(head + 1) * d].copy_from_slice(kr);
                    vb[head * d..(head + 1) * d].copy_from_slice(vr);
                }
                h.append(layer, &kb, &vb)?;
            }
            st.mirrored = len;
        }
        if let Some(res) = &mut st.residency {
            let have = res.len_tokens();
            if have > len {
                return Err(ModelError::Config(format!(
                    "slot tables of layer {layer} are ahead of the cache ({have} > {len} tokens)"
                )));
            }
            if have < len {
                res.append_tokens(len - have)?;
            }
        }
        st.summaries.update_from_cache(cache, layer)?;
        Ok(())
    }

    /// Full attention over every page of `layer` of the cache.
    fn dense_attend(
        &mut self,
        step: &LayerStep<'_>,
        cache: &PagedKvCache,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        decode_attention(
            &CacheLayer::new(cache, step.layer),
            step.q,
            &step.shape,
            out,
            &mut self.scratch,
        )
    }

    /// Count a new selection of (layer, head) for the overlap statistic.
    fn note_selection(stats: &mut KvStats, st: &mut LayerState, head: usize, pages: &[usize]) {
        stats.selections += 1;
        if let Some(slot) = st.last_sel.get_mut(head) {
            if let Some(prev) = slot.as_deref()
                && let Some(o) = freekv_select::selection_overlap(prev, pages)
            {
                stats.overlap_sum += o;
                stats.overlap_pairs += 1;
            }
            *slot = Some(pages.to_vec());
        }
    }

    /// Plan the recall of one selection per KV head of layer `l` and record every selection in
    /// the statistics (the plan's error, if any, is returned after the statistics are updated).
    fn plan_layer_selection(
        &mut self,
        l: usize,
        sels: &[Selection],
    ) -> Result<RecallPlan, ModelError> {
        let lists: Vec<(usize, &[usize])> = sels
            .iter()
            .enumerate()
            .map(|(h, s)| (h, s.pages()))
            .collect();
        let st = &mut self.layers[l];
        let plan = Self::plan_selections(self.host.as_ref(), l, st, &lists);
        for (h, s) in sels.iter().enumerate() {
            Self::note_selection(&mut self.stats, st, h, s.pages());
        }
        plan
    }

    /// Apply `sels` (one per listed head) to the slot tables and build the recall plan.
    fn plan_selections(
        host: Option<&Arc<RwLock<PagedKvCache>>>,
        layer: usize,
        st: &mut LayerState,
        sels: &[(usize, &[usize])],
    ) -> Result<RecallPlan, ModelError> {
        let mut plan = RecallPlan::new(layer);
        let host = host.ok_or_else(|| ModelError::Config("no host mirror".into()))?;
        let h = host.read().map_err(|_| poisoned("host mirror"))?;
        let table = h.page_table(layer)?;
        let res = st
            .residency
            .as_mut()
            .ok_or_else(|| ModelError::Config("no slot tables".into()))?;
        for &(head, pages) in sels {
            let diff = res.head_mut(head)?.select(pages)?;
            plan.push_diff(0, head, &diff, table)?;
        }
        Ok(plan)
    }

    fn recall_sync(&mut self, layer: usize, plan: RecallPlan) -> Result<(), ModelError> {
        if plan.is_empty() {
            return Ok(());
        }
        let target = self.target(layer)?;
        let t0 = Instant::now();
        let rs: RecallStats = self.sync_exec.recall(plan, &target)?;
        self.stats.recall_sync_s += t0.elapsed().as_secs_f64();
        self.stats.units_sync += rs.units;
        self.stats.bytes_sync += rs.bytes;
        Ok(())
    }

    fn target(&self, layer: usize) -> Result<CpuTarget<f32>, ModelError> {
        self.layers
            .get(layer)
            .and_then(|st| st.slots.as_ref())
            .map(|(_, t)| t.clone())
            .ok_or_else(|| ModelError::Config(format!("no resident slots for layer {layer}")))
    }

    /// Queries of KV head `head`'s group.
    fn group_q(q: &[f32], head: usize, hkv: usize) -> Result<&[f32], ModelError> {
        let g = q.len() / hkv.max(1);
        q.get(head * g..(head + 1) * g)
            .ok_or_else(|| ModelError::Shape(format!("no queries for KV head {head}")))
    }

    /// Select every KV head of `layer` with `q`.
    fn select_all(
        &mut self,
        layer: usize,
        q: &[f32],
        n_pages: usize,
    ) -> Result<Vec<Selection>, ModelError> {
        let t0 = Instant::now();
        let st = &self.layers[layer];
        let sels = self.selector.select_layer(q, &st.summaries, n_pages)?;
        self.stats.select_s += t0.elapsed().as_secs_f64();
        Ok(sels)
    }

    /// Attention over sinks + the middle pages + window, pages ascending. `middle[h]` lists
    /// `(page, Some(slot))` for resident slots or `(page, None)` to read the page from the cache.
    fn sparse_attention(
        &mut self,
        step: &LayerStep<'_>,
        cache: &PagedKvCache,
        middle: &[Vec<(usize, Option<usize>)>],
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let t0 = Instant::now();
        let layer = step.layer;
        let g = cache.geometry();
        let (p, hk, d) = (g.page_size, g.kv_heads, g.head_dim);
        let n_pages = cache.num_pages(layer);
        let ns = self.budget.sink_pages().min(n_pages);
        let win0 = n_pages.saturating_sub(self.budget.window_pages()).max(ns);
        let pool_guard = match self.layers.get(layer).and_then(|s| s.slots.as_ref()) {
            Some((pool, _)) => Some(pool.read().map_err(|_| poisoned("resident slots"))?),
            None => None,
        };
        let cache_block = |page: usize, head: usize| -> Result<KvBlock<'_>, ModelError> {
            KvBlock::new(
                cache.keys(layer, page, head)?,
                cache.values(layer, page, head)?,
                cache.page_len(layer, page),
                d,
                d,
            )
        };
        let mut lists: Vec<Vec<KvBlock<'_>>> = Vec::with_capacity(hk);
        for (head, mid) in middle.iter().enumerate().take(hk) {
            let mut blocks = Vec::with_capacity(ns + mid.len() + n_pages - win0);
            for page in 0..ns {
                blocks.push(cache_block(page, head)?);
            }
            for &(page, slot) in mid {
                match (slot, pool_guard.as_deref()) {
                    (Some(slot), Some(pool)) => {
                        let off = head * d;
                        let (Some(k), Some(v)) =
                            (pool.keys(slot)?.get(off..), pool.values(slot)?.get(off..))
                        else {
                            return Err(ModelError::Shape(format!("slot {slot} too short")));
                        };
                        blocks.push(KvBlock::new(k, v, p, hk * d, d)?);
                    }
                    _ => blocks.push(cache_block(page, head)?),
                }
            }
            for page in win0..n_pages {
                blocks.push(cache_block(page, head)?);
            }
            lists.push(blocks);
        }
        decode_attention(
            lists.as_slice(),
            step.q,
            &step.shape,
            out,
            &mut self.scratch,
        )?;
        drop(lists);
        drop(pool_guard);
        self.stats.attention_s += t0.elapsed().as_secs_f64();
        if let Some(trace) = &self.trace {
            let mut t = trace.lock().map_err(|_| poisoned("selection trace"))?;
            for (head, mid) in middle.iter().enumerate() {
                t.push(AttendedPages {
                    step: self.stats.steps,
                    layer,
                    kv_head: head,
                    pages: mid.iter().map(|&(pg, _)| pg).collect(),
                });
            }
        }
        Ok(())
    }

    /// The resident middle pages of every KV head, ascending page, with their slots.
    fn resident_middle(&self, layer: usize) -> Result<MiddlePages, ModelError> {
        let res = self
            .layers
            .get(layer)
            .and_then(|s| s.residency.as_ref())
            .ok_or_else(|| ModelError::Config("no slot tables".into()))?;
        Ok(res
            .heads()
            .iter()
            .map(|t| {
                let mut v: Vec<(usize, Option<usize>)> =
                    t.middle().map(|sp| (sp.page, Some(sp.slot))).collect();
                v.sort_unstable();
                v
            })
            .collect())
    }

    /// Debug check: tables consistent, every resident middle slot equal to the host page.
    fn check_resident(&self, layer: usize, cache: &PagedKvCache) -> Result<(), ModelError> {
        let Some(st) = self.layers.get(layer) else {
            return Ok(());
        };
        let (Some(res), Some((pool, _))) = (&st.residency, &st.slots) else {
            return Ok(());
        };
        res.check_consistency()?;
        let pool = pool.read().map_err(|_| poisoned("resident slots"))?;
        let g = cache.geometry();
        let d = g.head_dim;
        for (head, t) in res.heads().iter().enumerate() {
            for sp in t.middle() {
                let keys = cache.keys(layer, sp.page, head)?;
                let vals = cache.values(layer, sp.page, head)?;
                for row in 0..g.page_size {
                    let (kr, vr) = (&keys[row * d..(row + 1) * d], &vals[row * d..(row + 1) * d]);
                    if pool.key_row(sp.slot, row, head)? != kr
                        || pool.value_row(sp.slot, row, head)? != vr
                    {
                        return Err(ModelError::Config(format!(
                            "invariant violated: layer {layer} KV head {head} slot {} should hold \
                             page {} (row {row} differs)",
                            sp.slot, sp.page
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    fn attend_quest(
        &mut self,
        step: &LayerStep<'_>,
        cache: &PagedKvCache,
        n_pages: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let l = step.layer;
        let sels = self.select_all(l, step.q, n_pages)?;
        let st = &mut self.layers[l];
        for (h, s) in sels.iter().enumerate() {
            Self::note_selection(&mut self.stats, st, h, s.pages());
        }
        let middle: MiddlePages = sels
            .iter()
            .map(|s| s.pages().iter().map(|&p| (p, None)).collect())
            .collect();
        self.sparse_attention(step, cache, &middle, out)
    }

    /// First sparse step of a layer (or a layer whose slots were never filled): empty the middle
    /// slots, so the next selection recalls all of its pages.
    fn start_sparse(&mut self, layer: usize) -> Result<(), ModelError> {
        let st = &mut self.layers[layer];
        if let Some(res) = &mut st.residency {
            for h in 0..res.kv_heads() {
                res.head_mut(h)?.evict_middle();
            }
        }
        st.sparse_started = true;
        self.stats.first_sparse_steps += 1;
        Ok(())
    }

    fn attend_arkvale(
        &mut self,
        step: &LayerStep<'_>,
        cache: &PagedKvCache,
        n_pages: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let l = step.layer;
        if !self.layers[l].sparse_started {
            self.start_sparse(l)?;
        }
        let sels = self.select_all(l, step.q, n_pages)?;
        let t0 = Instant::now();
        let plan = self.plan_layer_selection(l, &sels);
        self.stats.select_s += t0.elapsed().as_secs_f64();
        self.recall_sync(l, plan?)?;
        if self.cfg.debug_checks {
            self.check_resident(l, cache)?;
        }
        let middle = self.resident_middle(l)?;
        self.sparse_attention(step, cache, &middle, out)
    }

    fn attend_freekv(
        &mut self,
        step: &LayerStep<'_>,
        cache: &PagedKvCache,
        n_pages: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let l = step.layer;
        let hkv = cache.geometry().kv_heads;
        // 1. The speculative recall issued after this layer's previous attention.
        if let (Some(exec), Some(ticket)) = (&self.async_exec, self.layers[l].pending.take()) {
            let t0 = Instant::now();
            let rs = exec.wait(ticket)?;
            self.stats.recall_wait_s += t0.elapsed().as_secs_f64();
            self.stats.recall_async_exec_s += rs.elapsed.as_secs_f64();
            self.stats.units_async += rs.units;
            self.stats.bytes_async += rs.bytes;
        }
        // 2. First sparse step: synchronous; later: correction of the flagged KV heads.
        let mut fresh: Vec<Option<Selection>> = vec![None; hkv];
        let prev_q = if self.layers[l].sparse_started {
            self.queries.previous(l).map(<[f32]>::to_vec)
        } else {
            None
        };
        match prev_q {
            None => {
                self.start_sparse(l)?;
                for (h, s) in self.select_all(l, step.q, n_pages)?.into_iter().enumerate() {
                    if let Some(f) = fresh.get_mut(h) {
                        *f = Some(s);
                    }
                }
            }
            Some(prev) => {
                let flags =
                    self.cfg
                        .correction
                        .evaluate(&prev, step.q, step.shape.head_dim, hkv)?;
                self.stats.correction_checks += 1;
                self.stats.heads_checked += hkv as u64;
                self.stats.heads_flagged += flags.count() as u64;
                self.stats.cosine_sum += flags
                    .group_cosines
                    .iter()
                    .map(|&c| if c.is_finite() { c as f64 } else { 0.0 })
                    .sum::<f64>();
                if flags.any() {
                    self.stats.corrected_layer_steps += 1;
                    let t0 = Instant::now();
                    for h in flags.flagged_heads() {
                        let qg = Self::group_q(step.q, h, hkv)?;
                        let s =
                            self.selector
                                .select(qg, self.layers[l].summaries.head(h)?, n_pages)?;
                        if let Some(f) = fresh.get_mut(h) {
                            *f = Some(s);
                        }
                    }
                    self.stats.select_s += t0.elapsed().as_secs_f64();
                }
            }
        }
        if fresh.iter().any(Option::is_some) {
            let lists: Vec<(usize, &[usize])> = fresh
                .iter()
                .enumerate()
                .filter_map(|(h, s)| s.as_ref().map(|s| (h, s.pages())))
                .collect();
            let plan = Self::plan_selections(self.host.as_ref(), l, &mut self.layers[l], &lists);
            self.recall_sync(l, plan?)?;
        }
        if self.cfg.debug_checks {
            self.check_resident(l, cache)?;
        }
        // 3. Attention over what is resident.
        let middle = self.resident_middle(l)?;
        self.sparse_attention(step, cache, &middle, out)?;
        self.queries.record(l, step.q)?;
        // 4. Speculative selection with q_t for the next step, recalled off the critical path.
        let t0 = Instant::now();
        let mut sels: Vec<Selection> = Vec::with_capacity(hkv);
        for (h, f) in fresh.into_iter().enumerate() {
            let s = match f {
                Some(s) => s,
                None => {
                    let qg = Self::group_q(step.q, h, hkv)?;
                    self.selector
                        .select(qg, self.layers[l].summaries.head(h)?, n_pages)?
                }
            };
            sels.push(s);
        }
        let plan = self.plan_layer_selection(l, &sels)?;
        self.stats.select_s += t0.elapsed().as_secs_f64();
        if plan.is_empty() {
            return Ok(());
        }
        let target = self.target(l)?;
        match &self.async_exec {
            Some(exec) => {
                let ticket = exec.submit(plan, &target)?;
                self.layers[l].pending = Some(ticket);
            }
            None => {
                let t0 = Instant::now();
                let rs = self.sync_exec.recall(plan, &target)?;
                self.stats.recall_sync_s += t0.elapsed().as_secs_f64();
                self.stats.recall_async_exec_s += rs.elapsed.as_secs_f64();
                self.stats.units_async += rs.units;
                self.stats.bytes_async += rs.bytes;
            }
        }
        Ok(())
    }
}

impl KvPolicy for SparseKv {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn reset(&mut self) {
        self.wait_all();
        self.layers.clear();
        self.geom = None;
        // The host mirror is kept (emptied and reused by the next `ensure_init` of the same
        // shape); every recall that could read it has been waited for above.
        self.queries.reset();
    }

    fn after_prefill(&mut self, cache: &PagedKvCache) -> Result<(), ModelError> {
        // Build summaries and the host mirror now rather than at the first decode step.
        self.ensure_init(cache)?;
        for l in 0..cache.layers() {
            if !self.is_dense_layer(l) {
                self.sync_layer(l, cache)?;
            }
        }
        Ok(())
    }

    fn attend(
        &mut self,
        step: &LayerStep<'_>,
        cache: &mut PagedKvCache,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let _span = tracing::trace_span!("sparse_attend", layer = step.layer).entered();
        cache.append(step.layer, step.k, step.v)?;
        let cache: &PagedKvCache = cache;
        self.stats.layer_steps += 1;
        if self.is_dense_layer(step.layer) {
            return self.dense_attend(step, cache, out);
        }
        self.ensure_init(cache)?;
        self.sync_layer(step.layer, cache)?;
        let n_pages = cache.num_pages(step.layer);
        if !self.budget.is_sparse(n_pages) {
            return self.dense_attend(step, cache, out);
        }
        self.stats.sparse_layer_steps += 1;
        match self.kind {
            KvKind::Quest => self.attend_quest(step, cache, n_pages, out),
            KvKind::ArkVale => self.attend_arkvale(step, cache, n_pages, out),
            KvKind::FreeKv => self.attend_freekv(step, cache, n_pages, out),
            KvKind::Full => self.dense_attend(step, cache, out),
        }
    }

    fn end_step(&mut self) {
        self.stats.steps += 1;
    }

    fn stats(&self) -> Option<serde_json::Value> {
        let mut v = self.stats.to_json();
        if let serde_json::Value::Object(m) = &mut v {
            m.insert("config".into(), serde_json::json!(self.cfg.describe()));
            m.insert(
                "budget_pages".into(),
                serde_json::json!({
                    "page_size": self.budget.page_size(),
                    "sink": self.budget.sink_pages(),
                    "retrieved": self.budget.retrieved_pages(),
                    "window": self.budget.window_pages(),
                }),
            );
        }
        Some(v)
    }
}

impl Drop for SparseKv {
    fn drop(&mut self) {
        self.wait_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::{AttnShape, DenseKv};
    use freekv_layout::PageGeometry;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Drive one policy through `steps` decode steps of 2 layers (layer 0 dense) with random
    /// q/k/v; returns the outputs of layer 1.
    fn drive(policy: &mut dyn KvPolicy, steps: usize, seed: u64) -> Vec<Vec<f32>> {
        let shape = AttnShape::new(4, 2, 8).unwrap();
        let geom = PageGeometry::new(4, 2, 8).unwrap();
        let mut cache = PagedKvCache::new(geom, 2, None).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut outs = Vec::new();
        for pos in 0..steps {
            for layer in 0..2 {
                let r = |rng: &mut StdRng, n: usize| -> Vec<f32> {
                    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
                };
                let (q, k, v) = (r(&mut rng, 32), r(&mut rng, 16), r(&mut rng, 16));
                let step = LayerStep {
                    layer,
                    position: pos,
                    q: &q,
                    k: &k,
                    v: &v,
                    shape,
                };
                let mut out = vec![0.0; 32];
                policy.attend(&step, &mut cache, &mut out).unwrap();
                if layer == 1 {
                    outs.push(out);
                }
            }
            policy.end_step();
        }
        outs
    }

    fn cfg(kind: KvKind) -> KvConfig {
        KvConfig {
            kind,
            budget: 20,
            sink: 4,
            window: 8,
            page_size: 4,
            debug_checks: true,
            ..KvConfig::default()
        }
    }

    #[test]
    fn below_budget_is_dense_and_quest_equals_arkvale() {
        let dense = drive(&mut DenseKv::new(), 80, 1);
        let quest = drive(&mut SparseKv::new(&cfg(KvKind::Quest), 2).unwrap(), 80, 1);
        let mut ark = SparseKv::new(&cfg(KvKind::ArkVale), 2).unwrap();
        let arkv = drive(&mut ark, 80, 1);
        // 5 budget pages of 4 tokens: dense for the first 20 tokens, sparse afterwards.
        assert_eq!(dense[..20], quest[..20]);
        assert_ne!(dense[20..], quest[20..]);
        assert_eq!(quest, arkv);
        let st = ark.kv_stats();
        assert_eq!(st.sparse_layer_steps, 60);
        assert_eq!(st.layer_steps, 160);
        assert_eq!(st.first_sparse_steps, 1);
        assert!(st.units_sync > 0);
        assert!(SparseKv::new(&KvConfig::new(KvKind::Full), 2).is_err());
    }

    #[test]
    fn reset_forgets_the_sequence() {
        let mut p = SparseKv::new(&cfg(KvKind::FreeKv), 2).unwrap();
        let a = drive(&mut p, 50, 3);
        p.reset();
        let b = drive(&mut p, 50, 3);
        assert_eq!(a, b);
        assert_eq!(
            p.kv_stats().steps,
            100,
            "statistics are kept across requests"
        );
    }

    #[test]
    fn reset_reuses_the_host_mirror() {
        let mut p = SparseKv::new(&cfg(KvKind::FreeKv), 2).unwrap();
        let a = drive(&mut p, 40, 5);
        let first = Arc::clone(p.host.as_ref().unwrap());
        let pages_after_first = first.read().unwrap().pool().capacity_pages();
        p.reset();
        let b = drive(&mut p, 40, 5);
        let second = p.host.as_ref().unwrap();
        assert!(
            Arc::ptr_eq(&first, second),
            "a mirror of the same shape is reused"
        );
        assert_eq!(a, b, "the reused mirror holds only the new sequence");
        assert_eq!(
            second.read().unwrap().pool().capacity_pages(),
            pages_after_first,
            "the second sequence reused the pages of the first"
        );
    }
}
