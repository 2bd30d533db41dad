//! FreeKV selection launchers (correction flags, fused selection) and the geometry shared by the
//! GPU FreeKV kernels ([`FreeKvShape`]).

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaModule, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use freekv_select::{CorrectionAggregate, GroupPolicy, SummaryKind};
use half::bf16;

use crate::KernelError;
use crate::kernels::{Kernels, Strided, check_len, func, grid_dim, mul};

/// Columns of one row of the per-step `seq_info` table (`i32 [bs][4]`): N, mode, fill slot,
/// fill page.
pub const SEQ_INFO_WIDTH: usize = 4;

/// Geometry of one sparse layer of GPU FreeKV (all counts; see the GPU FreeKV contract).
///
/// Slots of a (sequence, layer): `0..ns` sinks, `ns..ns+k` middle (retrieved) pages,
/// `ns+k..nb` the recent-window ring, `nb = ns + k + nw` ([`FreeKvShape::slots`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FreeKvShape {
    /// Sequences in the batch (`bs`).
    pub seqs: usize,
    /// KV heads (`Hkv`).
    pub kv_heads: usize,
    /// Query heads per KV head (`G = Hq / Hkv`).
    pub group: usize,
    /// Head dimension (`d`).
    pub head_dim: usize,
    /// Tokens per page (`P`).
    pub page_size: usize,
    /// Sink pages (`ns`, may be 0).
    pub sink_pages: usize,
    /// Retrieved (middle) pages (`k`, ≥ 1).
    pub top_k: usize,
    /// Recent-window pages, partial page included (`nw`, ≥ 1).
    pub window_pages: usize,
    /// Largest number of logical pages of one sequence (`MP`).
    pub max_pages: usize,
    /// Spare middle slots per (sequence, KV head) (`x`, may be 0): a cache of pages beyond the
    /// top-k. The speculative selection fills them with the next-ranked pages, so a corrected
    /// head finds most of its new top-k already resident; they are never attended. They sit
    /// after the window ring: slots `ns + k + nw .. ns + k + nw + x`.
    pub spare_pages: usize,
}

/// Largest supported head dimension.
pub const FREEKV_MAX_HEAD_DIM: usize = 256;

impl FreeKvShape {
    /// The shape of a layer with `budget`'s sink / retrieved / window pages and page size.
    pub fn from_budget(
        seqs: usize,
        kv_heads: usize,
        group: usize,
        head_dim: usize,
        budget: &freekv_layout::Budget,
        max_pages: usize,
    ) -> Self {
        Self {
            seqs,
            kv_heads,
            group,
            head_dim,
            page_size: budget.page_size(),
            sink_pages: budget.sink_pages(),
            top_k: budget.retrieved_pages(),
            window_pages: budget.window_pages(),
            max_pages,
            spare_pages: 0,
        }
    }

    /// The same shape with `spare` spare middle slots (see [`Self::spare_pages`]).
    pub fn with_spare_pages(mut self, spare: usize) -> Self {
        self.spare_pages = spare;
        self
    }

    /// Middle slots per (sequence, KV head): `k + x` (saturating). The stride of `mid_page`
    /// and of the recall lists.
    pub fn cache_pages(&self) -> usize {
        self.top_k.saturating_add(self.spare_pages)
    }

    /// Resident slots per (sequence, layer): `nb = ns + k + nw + x` (saturating;
    /// [`Self::validate`] rejects overflow).
    pub fn slots(&self) -> usize {
        self.sink_pages
            .saturating_add(self.top_k)
            .saturating_add(self.window_pages)
            .saturating_add(self.spare_pages)
    }

    /// The slot of middle index `i` (`0 .. k + x`): `ns + i` for the top-k part, after the
    /// window ring for the spare part.
    pub fn middle_slot(&self, i: usize) -> usize {
        if i < self.top_k {
            self.sink_pages + i
        } else {
            self.sink_pages + self.window_pages + i
        }
    }

    /// Query heads `Hq = Hkv * G` (saturating).
    pub fn q_heads(&self) -> usize {
        self.kv_heads.saturating_mul(self.group)
    }

    /// (sequence, KV head) rows: `bs * Hkv` (saturating).
    pub fn rows(&self) -> usize {
        self.seqs.saturating_mul(self.kv_heads)
    }

    /// Checks the shape: every count non-zero except `sink_pages`, `head_dim` a multiple of 8 and
    /// at most [`FREEKV_MAX_HEAD_DIM`], and every page / slot / row index (`bs * nb` physical
    /// pages, `bs * Hkv * MP` table entries, `bs * Hq * d` query elements) fitting in `i32`.
    /// Errors name `kernel`.
    pub fn validate(&self, kernel: &'static str) -> Result<(), KernelError> {
        let nonzero = [
            ("seqs", self.seqs),
            ("kv_heads", self.kv_heads),
            ("group", self.group),
            ("head_dim", self.head_dim),
            ("page_size", self.page_size),
            ("top_k", self.top_k),
            ("window_pages", self.window_pages),
            ("max_pages", self.max_pages),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(KernelError::arg(
                    kernel,
                    format!("FreeKvShape::{name} must be non-zero"),
                ));
            }
        }
        if !self.head_dim.is_multiple_of(8) || self.head_dim > FREEKV_MAX_HEAD_DIM {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "head_dim {} must be a multiple of 8 and at most {FREEKV_MAX_HEAD_DIM}",
                    self.head_dim
                ),
            ));
        }
        let lim = i32::MAX as usize;
        let nb = self
            .sink_pages
            .checked_add(self.top_k)
            .and_then(|x| x.checked_add(self.window_pages))
            .and_then(|x| x.checked_add(self.spare_pages));
        let checks = [
            ("slots (ns + k + nw + spare)", nb),
            (
                "physical pages (seqs * slots)",
                nb.and_then(|nb| nb.checked_mul(self.seqs)),
            ),
            (
                "page mask entries (seqs * slots * kv_heads)",
                nb.and_then(|nb| nb.checked_mul(self.seqs))
                    .and_then(|x| x.checked_mul(self.kv_heads)),
            ),
            (
                "page table entries (seqs * kv_heads * max_pages)",
                self.seqs
                    .checked_mul(self.kv_heads)
                    .and_then(|x| x.checked_mul(self.max_pages)),
            ),
            (
                "query elements (seqs * kv_heads * group * head_dim)",
                self.seqs
                    .checked_mul(self.kv_heads)
                    .and_then(|x| x.checked_mul(self.group))
                    .and_then(|x| x.checked_mul(self.head_dim)),
            ),
            (
                "page elements (2 * page_size * kv_heads * head_dim)",
                self.page_size
                    .checked_mul(self.kv_heads)
                    .and_then(|x| x.checked_mul(self.head_dim))
                    .and_then(|x| x.checked_mul(2)),
            ),
        ];
        for (what, v) in checks {
            match v {
                Some(v) if v <= lim => {}
                _ => {
                    return Err(KernelError::arg(
                        kernel,
                        format!("{what} does not fit in i32 for {self:?}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Which (sequence, KV head) rows a launcher touches, by the correction flag of the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadFilter {
    /// Every row.
    All,
    /// Only rows whose flag is non-zero (the corrective, synchronous path).
    Flagged,
    /// Only rows whose flag is zero (the speculative path).
    Unflagged,
}

impl HeadFilter {
    /// The kernel argument: 0 = all, 1 = flagged, 2 = unflagged.
    pub fn code(self) -> i32 {
        match self {
            HeadFilter::All => 0,
            HeadFilter::Flagged => 1,
            HeadFilter::Unflagged => 2,
        }
    }
}

/// Largest GQA group (`G`) the selection kernels support.
pub const FREEKV_MAX_GROUP: usize = 32;

/// Head dimensions the scoring kernel is compiled for.
pub const FREEKV_SELECT_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Threads of the scoring kernel (`FKS_SCORE_THREADS` in freekv_select.cu).
const SCORE_THREADS: u32 = 256;
/// Scoring blocks per streaming multiprocessor the launcher aims for (the pages per block adapt
/// so that small batches still spread over the whole device).
const SCORE_BLOCKS_PER_SM: usize = 8;
/// Bounds of the pages one scoring block handles (multiples of the 32 pages of one pass).
const SCORE_MIN_PAGES: usize = 32;
const SCORE_MAX_PAGES: usize = 512;
/// Shared-memory tile of the softmax sums, in floats (`FKS_SOFTMAX_TILE`).
const SOFTMAX_TILE: usize = 4096;
/// Threads of the per-row selection kernel (`FKS_SELECT_THREADS`).
const SELECT_THREADS: u32 = 512;
/// Threads of the correction kernel (`FKS_CORR_THREADS`).
const CORR_THREADS: u32 = 128;
/// Static shared-memory limit every kernel of the module stays under.
const SMEM_LIMIT: usize = 48 * 1024;
const MAX_GRID_YZ: u32 = 65_535;

impl FreeKvShape {
    /// `f32` elements of the global scratch of [`Kernels::freekv_select`]:
    /// `bs * Hkv * G * MP` (per (sequence, KV head) row, one score per candidate page and query
    /// head). Saturating; [`Self::validate`] plus the launcher's checks reject overflow.
    pub fn select_scratch_len(&self) -> usize {
        self.rows()
            .saturating_mul(self.group)
            .saturating_mul(self.max_pages)
    }

    /// Dynamic shared memory of the per-row selection kernel, in bytes.
    fn select_smem_bytes(&self) -> usize {
        // ints: sel[C] free[C] res[C] att[k] key[C] order[C] hist[2][256] tmp[32]; floats: max[G]
        // parts[9G] sum[G] tile
        self.cache_pages()
            .saturating_mul(5)
            .saturating_add(self.top_k)
            .saturating_add(512 + 32 + SOFTMAX_TILE)
            .saturating_add(self.group.saturating_mul(11))
            .saturating_mul(4)
    }
}

/// The kernel argument of a [`GroupPolicy`] (`FKS_POLICY_*` in freekv_select.cu).
fn policy_code(p: GroupPolicy) -> i32 {
    match p {
        GroupPolicy::MeanSoftmax => 0,
        GroupPolicy::MaxScore => 1,
        GroupPolicy::MeanScore => 2,
        GroupPolicy::MaxSoftmax => 3,
        GroupPolicy::PooledQuery => 4,
        GroupPolicy::PooledMaxQuery => 5,
    }
}

/// The functions of the `freekv_select` module.
#[derive(Debug)]
pub struct SelectKernels {
    correction: CudaFunction,
    /// Indexed like [`FREEKV_SELECT_HEAD_DIMS`].
    score: [CudaFunction; 3],
    select_rows: CudaFunction,
}

impl SelectKernels {
    /// Resolve every function of the loaded module.
    pub(crate) fn resolve(m: &Arc<CudaModule>) -> Result<Self, KernelError> {
        Ok(Self {
            correction: func(m, "freekv_correction")?,
            score: [
                func(m, "freekv_score_d64")?,
                func(m, "freekv_score_d128")?,
                func(m, "freekv_score_d256")?,
            ],
            select_rows: func(m, "freekv_select_rows")?,
        })
    }
}

fn i32_arg(kernel: &'static str, what: &str, v: usize) -> Result<i32, KernelError> {
    i32::try_from(v).map_err(|_| KernelError::arg(kernel, format!("{what} = {v} exceeds i32")))
}

/// Checks shared by both launchers: the shape, and `G` within [`FREEKV_MAX_GROUP`].
fn check_shape(kernel: &'static str, shape: &FreeKvShape) -> Result<(), KernelError> {
    shape.validate(kernel)?;
    if shape.group > FREEKV_MAX_GROUP {
        return Err(KernelError::arg(
            kernel,
            format!(
                "group {} exceeds the supported {FREEKV_MAX_GROUP} query heads per KV head",
                shape.group
            ),
        ));
    }
    Ok(())
}

/// Element counts of the buffers given to [`Kernels::freekv_correction`].
#[derive(Debug, Clone, Copy)]
struct CorrectionLens {
    q: usize,
    q_prev: usize,
    seq_info: usize,
    flags: usize,
    group_cosines: Option<usize>,
}

/// Validated scalar arguments of the correction kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CorrectionPlan {
    grid: u32,
    smem: u32,
    always: i32,
    tau: f32,
    kv_heads: i32,
    group: i32,
    head_dim: i32,
}

/// Host-side checks of [`Kernels::freekv_correction`] (no device needed).
fn plan_correction(
    shape: &FreeKvShape,
    q_rows: Strided,
    trigger: Option<f32>,
    lens: &CorrectionLens,
) -> Result<CorrectionPlan, KernelError> {
    const K: &str = "freekv_correction";
    check_shape(K, shape)?;
    let (always, tau) = match trigger {
        None => (1i32, 1.0f32),
        Some(t) if t.is_finite() && (-1.0..=1.0).contains(&t) => (i32::from(t == 1.0), t),
        Some(t) => {
            return Err(KernelError::arg(
                K,
                format!("threshold {t} must be a finite number in [-1, 1]"),
            ));
        }
    };
    let rows = shape.rows();
    let row_elems = mul(K, "q row", shape.q_heads(), shape.head_dim)?;
    q_rows.check(K, "q", shape.seqs, row_elems, lens.q)?;
    check_len(
        K,
        "q_prev",
        lens.q_prev,
        mul(K, "q_prev", shape.seqs, row_elems)?,
    )?;
    check_len(
        K,
        "seq_info",
        lens.seq_info,
        mul(K, "seq_info", shape.seqs, SEQ_INFO_WIDTH)?,
    )?;
    check_len(K, "flags", lens.flags, rows)?;
    if let Some(c) = lens.group_cosines {
        check_len(K, "group_cosines", c, rows)?;
    }
    // q_prev (f32) and q (bf16) of one group staged in shared memory
    let smem = mul(K, "group staging", shape.group * shape.head_dim, 6)?;
    if smem > SMEM_LIMIT {
        return Err(KernelError::arg(
            K,
            format!(
                "group of {} heads of {} needs {smem} B of shared memory (> {SMEM_LIMIT} B)",
                shape.group, shape.head_dim
            ),
        ));
    }
    Ok(CorrectionPlan {
        grid: grid_dim(K, "seqs * kv_heads", rows, i32::MAX as u32)?,
        smem: smem as u32,
        always,
        tau,
        kv_heads: i32_arg(K, "kv_heads", shape.kv_heads)?,
        group: i32_arg(K, "group", shape.group)?,
        head_dim: i32_arg(K, "head_dim", shape.head_dim)?,
    })
}

/// Element counts of the buffers given to [`Kernels::freekv_select`].
#[derive(Debug, Clone, Copy)]
struct SelectLens {
    q_prev: usize,
    summaries: usize,
    seq_info: usize,
    flags: usize,
    mid_page: usize,
    page_mid: usize,
    recall_count: usize,
    recall_list: usize,
    selected: Option<usize>,
    scratch: usize,
    /// `want` and the page mask's length, with [`SelectCache`].
    cache: Option<(usize, usize)>,
}

/// Validated launch parameters of the two selection kernels.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SelectPlan {
    /// Index into [`FREEKV_SELECT_HEAD_DIMS`].
    dim_index: usize,
    score_smem: u32,
    select_smem: u32,
    grid: u32,
    chunks: u32,
    pages_per_block: i32,
    kv_heads: i32,
    group: i32,
    max_pages: i32,
    sink_pages: i32,
    top_k: i32,
    window_pages: i32,
    cache: i32,
    want: i32,
    slots: i32,
}

/// What a selection does with [`FreeKvShape::spare_pages`] (see [`Kernels::freekv_select`]).
pub struct SelectCache<'a> {
    /// Pages the selection makes resident, `top_k ..= top_k + spare_pages`: the speculative
    /// selection fills the spare slots with the pages ranked after the top-k; a corrective one
    /// wants only the top-k (and leaves cached pages in place where it can).
    pub want: usize,
    /// i32 `[bs · slots][Hkv]`, the decode attention's page mask
    /// ([`crate::HeadMask::pages`]): written for the middle slots of every processed row, 0
    /// where the slot holds one of the row's top-k pages, 1 (skip) otherwise. Entries of the
    /// sink and window slots are never written (the caller keeps them at 0).
    pub page_mask: &'a mut dyn DevicePtrMut<i32>,
}

impl std::fmt::Debug for SelectCache<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelectCache")
            .field("want", &self.want)
            .field("page_mask_len", &self.page_mask.len())
            .finish()
    }
}

/// Candidate pages per scoring block: enough blocks for about [`SCORE_BLOCKS_PER_SM`] per SM
/// over all rows, within [`SCORE_MIN_PAGES`]..=[`SCORE_MAX_PAGES`], a multiple of 32.
fn score_pages_per_block(rows: usize, max_pages: usize, sm_count: u32) -> usize {
    let target = (sm_count as usize).max(1) * SCORE_BLOCKS_PER_SM;
    let per = rows.saturating_mul(max_pages).div_ceil(target);
    per.div_ceil(32)
        .saturating_mul(32)
        .clamp(SCORE_MIN_PAGES, SCORE_MAX_PAGES)
}

/// Host-side checks of [`Kernels::freekv_select`] (no device needed).
fn plan_select(
    shape: &FreeKvShape,
    lens: &SelectLens,
    sm_count: u32,
) -> Result<SelectPlan, KernelError> {
    const K: &str = "freekv_select";
    check_shape(K, shape)?;
    let Some(dim_index) = FREEKV_SELECT_HEAD_DIMS
        .iter()
        .position(|&d| d == shape.head_dim)
    else {
        return Err(KernelError::arg(
            K,
            format!(
                "head_dim {} is not one of the compiled {FREEKV_SELECT_HEAD_DIMS:?}",
                shape.head_dim
            ),
        ));
    };
    let score_smem = mul(K, "query tile", shape.group, shape.head_dim * 4)?;
    let select_smem = shape.select_smem_bytes();
    if score_smem > SMEM_LIMIT || select_smem > SMEM_LIMIT {
        return Err(KernelError::arg(
            K,
            format!(
                "shared memory ({score_smem} B for the query tile, {select_smem} B for top_k {}) exceeds {SMEM_LIMIT} B: lower top_k or the group",
                shape.top_k
            ),
        ));
    }
    let rows = shape.rows();
    let (k, mp, c) = (shape.top_k, shape.max_pages, shape.cache_pages());
    let q_len = mul(K, "q_prev", shape.seqs, shape.q_heads() * shape.head_dim)?;
    check_len(K, "q_prev", lens.q_prev, q_len)?;
    let sum_len =
        mul(K, "summaries", rows, mp).and_then(|x| mul(K, "summaries", x, 2 * shape.head_dim))?;
    check_len(K, "summaries", lens.summaries, sum_len)?;
    check_len(
        K,
        "seq_info",
        lens.seq_info,
        mul(K, "seq_info", shape.seqs, SEQ_INFO_WIDTH)?,
    )?;
    check_len(K, "flags", lens.flags, rows)?;
    check_len(K, "mid_page", lens.mid_page, mul(K, "mid_page", rows, c)?)?;
    check_len(K, "page_mid", lens.page_mid, mul(K, "page_mid", rows, mp)?)?;
    check_len(K, "recall_count", lens.recall_count, rows)?;
    check_len(
        K,
        "recall_list",
        lens.recall_list,
        mul(K, "recall_list", rows, 2 * c)?,
    )?;
    if let Some(s) = lens.selected {
        check_len(K, "selected", s, mul(K, "selected", rows, k)?)?;
    }
    check_len(K, "scratch", lens.scratch, shape.select_scratch_len())?;
    let want = match lens.cache {
        None => k,
        Some((want, mask_len)) => {
            if want < k || want > c {
                return Err(KernelError::arg(
                    K,
                    format!("want {want} must be within top_k {k} ..= top_k + spare_pages {c}"),
                ));
            }
            let need = mul(K, "page mask", shape.seqs, shape.slots())
                .and_then(|x| mul(K, "page mask", x, shape.kv_heads))?;
            check_len(K, "page_mask", mask_len, need)?;
            want
        }
    };
    let ppb = score_pages_per_block(rows, mp, sm_count);
    Ok(SelectPlan {
        dim_index,
        score_smem: score_smem as u32,
        select_smem: select_smem as u32,
        grid: grid_dim(K, "seqs * kv_heads", rows, i32::MAX as u32)?,
        chunks: grid_dim(
            K,
            "candidate chunks (max_pages / pages per scoring block)",
            mp.div_ceil(ppb),
            MAX_GRID_YZ,
        )?,
        pages_per_block: i32_arg(K, "pages per block", ppb)?,
        kv_heads: i32_arg(K, "kv_heads", shape.kv_heads)?,
        group: i32_arg(K, "group", shape.group)?,
        max_pages: i32_arg(K, "max_pages", mp)?,
        sink_pages: i32_arg(K, "sink_pages", shape.sink_pages)?,
        top_k: i32_arg(K, "top_k", k)?,
        window_pages: i32_arg(K, "window_pages", shape.window_pages)?,
        cache: i32_arg(K, "top_k + spare_pages", c)?,
        want: i32_arg(K, "want", want)?,
        slots: i32_arg(K, "slots", shape.slots())?,
    })
}

impl Kernels {
    /// The correction check of one sparse layer (one block per (sequence, KV head)).
    ///
    /// `q`: the current post-RoPE queries, bf16; row `seq` holds the `Hq` heads of `d` elements
    /// at `q_rows.offset + seq * q_rows.stride`. `q_prev`: f32 `[bs][Hq][d]`, the layer's last
    /// stored query. `seq_info`: i32 `[bs][`[`SEQ_INFO_WIDTH`]`]` (mode in column 1).
    /// `trigger`: `Some(τ)` flags a KV head when its group cosine is below τ (τ finite in
    /// [−1, 1]; τ = 1 means always, as `freekv_select::CorrectionPolicy::from_tau`), `None`
    /// flags every KV head. Per (seq, KV head):
    ///
    /// * mode 0 (or any value other than 1 and 2): flag 0, `q_prev` untouched, cosine NaN;
    /// * mode 1: flag 1, cosine NaN, `q_prev ← q`;
    /// * mode 2: `C` = `aggregate` over the group of `cos(q_prev_j, q_j)` — bit-identical with
    ///   `CorrectionPolicy::evaluate` on the same f32 inputs (`q` widened from bf16) — flag =
    ///   always ∨ NaN ∨ `C < τ`, then `q_prev ← q`.
    ///
    /// `flags`: i32 `[bs][Hkv]`; `group_cosines` (optional): f32 `[bs][Hkv]`, `C`.
    #[allow(clippy::too_many_arguments)]
    pub fn freekv_correction(
        &self,
        stream: &CudaStream,
        shape: &FreeKvShape,
        q: &impl DevicePtr<bf16>,
        q_rows: Strided,
        q_prev: &mut impl DevicePtrMut<f32>,
        seq_info: &impl DevicePtr<i32>,
        trigger: Option<f32>,
        aggregate: CorrectionAggregate,
        flags: &mut impl DevicePtrMut<i32>,
        group_cosines: Option<&mut dyn DevicePtrMut<f32>>,
    ) -> Result<(), KernelError> {
        const K: &str = "freekv_correction";
        let _s = tracing::debug_span!("freekv_correction", seqs = shape.seqs).entered();
        let lens = CorrectionLens {
            q: q.len(),
            q_prev: q_prev.len(),
            seq_info: seq_info.len(),
            flags: flags.len(),
            group_cosines: group_cosines.as_ref().map(|c| c.len()),
        };
        let plan = plan_correction(shape, q_rows, trigger, &lens)?;
        let agg_max = i32::from(aggregate == CorrectionAggregate::Max);
        let q_stride = q_rows.stride as u64;
        let (qp, _gq) = q.device_ptr(stream);
        let qp = qp + 2 * q_rows.offset as u64;
        let (pp, _gp) = q_prev.device_ptr_mut(stream);
        let (sp, _gs) = seq_info.device_ptr(stream);
        let (fp, _gf) = flags.device_ptr_mut(stream);
        let mut cos_guard = None;
        let cp: u64 = match group_cosines {
            Some(c) => {
                let (p, g) = c.device_ptr_mut(stream);
                cos_guard = Some(g);
                p
            }
            None => 0,
        };
        let cfg = LaunchConfig {
            grid_dim: (plan.grid, 1, 1),
            block_dim: (CORR_THREADS, 1, 1),
            shared_mem_bytes: plan.smem,
        };
        let mut b = stream.launch_builder(&self.select.correction);
        b.arg(&qp).arg(&q_stride).arg(&pp).arg(&sp);
        b.arg(&plan.always).arg(&plan.tau).arg(&agg_max);
        b.arg(&fp).arg(&cp);
        b.arg(&plan.kv_heads).arg(&plan.group).arg(&plan.head_dim);
        // SAFETY: argument types and order match the kernel; every buffer was size-checked by
        // plan_correction (the optional cosine output is null when absent, which the kernel
        // tests).
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        drop(cos_guard);
        Ok(())
    }

    /// The page selection of one sparse layer: scores → group aggregation → top-k → slot diff,
    /// entirely on the device (two launches, no host synchronisation: capturable in a graph).
    ///
    /// Buffers (see the GPU FreeKV contract): `q_prev` f32 `[bs][Hq][d]` (the query to select
    /// with), `summaries` f32 `[bs][Hkv][MP][2][d]`, `seq_info` i32 `[bs][4]`, `flags` i32
    /// `[bs][Hkv]`, `mid_page` i32 `[bs][Hkv][C]`, `page_mid` i32 `[bs][Hkv][MP]`,
    /// `recall_count` i32 `[bs][Hkv]`, `recall_list` i32 `[bs][Hkv][C][2]`, `selected`
    /// (optional) i32 `[bs][Hkv][k]`, `scratch` f32 of
    /// [`FreeKvShape::select_scratch_len`] elements, where `C` = [`FreeKvShape::cache_pages`]
    /// (`k` without spare slots). `summary` is the kind the summaries were built with (the
    /// kernels score whatever (U, L) they are given; it is recorded in the tracing span). Head
    /// dims: [`FREEKV_SELECT_HEAD_DIMS`]; `G` ≤ [`FREEKV_MAX_GROUP`]. After the launch,
    /// `scratch[row · G · MP + i]` (`row = seq · Hkv + h`) holds the fp32 group score of
    /// candidate page `ns + i` of every processed row, bit-identical with
    /// `freekv_select::Selection::scores`.
    ///
    /// Per (seq, KV head) row:
    ///
    /// * mode 0, a mode other than 1 and 2, `N` outside `1..=MP`, or filtered out by `filter`
    ///   against `flags`: `recall_count = 0` and nothing else changes;
    /// * mode 1: the row's `mid_page` and `page_mid` are first reset to −1 (the whole middle is
    ///   evicted, no prior state is needed), then as mode 2;
    /// * mode 2: the candidates `ns .. N − nw` are scored and combined exactly as
    ///   `freekv_select::Selector::select` (bit-identical group scores); by `rank_key` (ties →
    ///   lower page) the `min(k, n)` best form the selection S and the `min(w, n)` best the
    ///   wanted set W ⊇ S (`w` = `cache.want`, `k` without `cache`); middle slots `i = 0..C`
    ///   ascending that are empty or hold a page not in W are free (with spare slots ordered by
    ///   the group score of the page they hold, lowest first, empty slots and pages no longer
    ///   candidates before any candidate, ties to the lower slot); the pages of W ascending
    ///   that are not resident take the free slots in order (the page they overwrite is
    ///   evicted: `page_mid[victim] = −1`; then `mid_page[i] = page`, `page_mid[page] = i`,
    ///   `(page, slot(i))` appended to `recall_list`, `slot(i)` =
    ///   [`FreeKvShape::middle_slot`]). Free slots no page takes keep their page. Without spare
    ///   slots and with a full middle this is exactly `freekv_layout::SlotTable::diff`.
    ///   `selected` receives S ascending, padded with −1; `cache.page_mask` (if given) 0 for
    ///   the middle slots that hold a page of S, 1 for the others.
    #[allow(clippy::too_many_arguments)]
    pub fn freekv_select(
        &self,
        stream: &CudaStream,
        shape: &FreeKvShape,
        policy: GroupPolicy,
        summary: SummaryKind,
        q_prev: &impl DevicePtr<f32>,
        summaries: &impl DevicePtr<f32>,
        seq_info: &impl DevicePtr<i32>,
        flags: &impl DevicePtr<i32>,
        filter: HeadFilter,
        mid_page: &mut impl DevicePtrMut<i32>,
        page_mid: &mut impl DevicePtrMut<i32>,
        recall_count: &mut impl DevicePtrMut<i32>,
        recall_list: &mut impl DevicePtrMut<i32>,
        selected: Option<&mut dyn DevicePtrMut<i32>>,
        scratch: &mut impl DevicePtrMut<f32>,
        cache: Option<SelectCache<'_>>,
    ) -> Result<(), KernelError> {
        let _s = tracing::debug_span!(
            "freekv_select",
            seqs = shape.seqs,
            policy = policy.name(),
            summary = summary.name()
        )
        .entered();
        let lens = SelectLens {
            q_prev: q_prev.len(),
            summaries: summaries.len(),
            seq_info: seq_info.len(),
            flags: flags.len(),
            mid_page: mid_page.len(),
            page_mid: page_mid.len(),
            recall_count: recall_count.len(),
            recall_list: recall_list.len(),
            selected: selected.as_ref().map(|s| s.len()),
            scratch: scratch.len(),
            cache: cache.as_ref().map(|c| (c.want, c.page_mask.len())),
        };
        let plan = plan_select(shape, &lens, self.sm_count)?;
        let filt = filter.code();
        let pol = policy_code(policy);

        let (qp, _gq) = q_prev.device_ptr(stream);
        let (smp, _gsm) = summaries.device_ptr(stream);
        let (sip, _gsi) = seq_info.device_ptr(stream);
        let (fp, _gf) = flags.device_ptr(stream);
        let (mpp, _gmp) = mid_page.device_ptr_mut(stream);
        let (pmp, _gpm) = page_mid.device_ptr_mut(stream);
        let (rcp, _grc) = recall_count.device_ptr_mut(stream);
        let (rlp, _grl) = recall_list.device_ptr_mut(stream);
        let (scp, _gsc) = scratch.device_ptr_mut(stream);
        let mut sel_guard = None;
        let selp: u64 = match selected {
            Some(s) => {
                let (p, g) = s.device_ptr_mut(stream);
                sel_guard = Some(g);
                p
            }
            None => 0,
        };
        let mut mask_guard = None;
        let maskp: u64 = match cache {
            Some(c) => {
                let (p, g) = c.page_mask.device_ptr_mut(stream);
                mask_guard = Some(g);
                p
            }
            None => 0,
        };

        let cfg = LaunchConfig {
            grid_dim: (plan.grid, plan.chunks, 1),
            block_dim: (SCORE_THREADS, 1, 1),
            shared_mem_bytes: plan.score_smem,
        };
        let mut b = stream.launch_builder(&self.select.score[plan.dim_index]);
        b.arg(&smp).arg(&qp).arg(&sip).arg(&fp).arg(&filt).arg(&pol);
        b.arg(&scp)
            .arg(&plan.kv_heads)
            .arg(&plan.group)
            .arg(&plan.max_pages);
        b.arg(&plan.sink_pages)
            .arg(&plan.window_pages)
            .arg(&plan.pages_per_block);
        // SAFETY: argument types and order match freekv_score_d*; buffers size-checked by
        // plan_select.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver("freekv_score"))?;

        let cfg = LaunchConfig {
            grid_dim: (plan.grid, 1, 1),
            block_dim: (SELECT_THREADS, 1, 1),
            shared_mem_bytes: plan.select_smem,
        };
        let mut b = stream.launch_builder(&self.select.select_rows);
        b.arg(&sip).arg(&fp).arg(&filt).arg(&pol).arg(&scp);
        b.arg(&mpp).arg(&pmp).arg(&rcp).arg(&rlp).arg(&selp);
        b.arg(&plan.kv_heads).arg(&plan.group).arg(&plan.max_pages);
        b.arg(&plan.sink_pages)
            .arg(&plan.top_k)
            .arg(&plan.window_pages);
        b.arg(&plan.cache)
            .arg(&plan.want)
            .arg(&plan.slots)
            .arg(&maskp);
        // SAFETY: argument types and order match freekv_select_rows; buffers size-checked by
        // plan_select (a null `selected` or page mask is tested by the kernel).
        unsafe { b.launch(cfg) }.map_err(KernelError::driver("freekv_select_rows"))?;
        drop(sel_guard);
        drop(mask_guard);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A named change that must make a check fail, with the word the error must contain.
    type Mutation<T> = (&'static str, fn(&mut T));

    fn shape() -> FreeKvShape {
        FreeKvShape {
            seqs: 2,
            kv_heads: 3,
            group: 4,
            head_dim: 128,
            page_size: 16,
            sink_pages: 2,
            top_k: 8,
            window_pages: 3,
            max_pages: 100,
            spare_pages: 0,
        }
    }

    fn select_lens(s: &FreeKvShape) -> SelectLens {
        let rows = s.rows();
        SelectLens {
            q_prev: s.seqs * s.q_heads() * s.head_dim,
            summaries: rows * s.max_pages * 2 * s.head_dim,
            seq_info: s.seqs * SEQ_INFO_WIDTH,
            flags: rows,
            mid_page: rows * s.cache_pages(),
            page_mid: rows * s.max_pages,
            recall_count: rows,
            recall_list: rows * s.cache_pages() * 2,
            selected: Some(rows * s.top_k),
            scratch: s.select_scratch_len(),
            cache: None,
        }
    }

    fn msg(e: KernelError) -> String {
        assert!(
            matches!(e, KernelError::InvalidArgument { .. }),
            "not an argument error: {e}"
        );
        e.to_string()
    }

    #[test]
    fn shape_accessors_and_validation() {
        let s = shape();
        assert_eq!(s.slots(), 13);
        assert_eq!(s.q_heads(), 12);
        assert_eq!(s.rows(), 6);
        assert_eq!(s.select_scratch_len(), 6 * 4 * 100);
        s.validate("t").unwrap();
        let b = freekv_layout::Budget::from_tokens(2048, 512, 512, 32).unwrap();
        let f = FreeKvShape::from_budget(4, 8, 4, 128, &b, 128);
        assert_eq!(
            (f.sink_pages, f.top_k, f.window_pages, f.page_size),
            (16, 32, 16, 32)
        );
        assert_eq!(f.slots(), 64);
        let cases: [Mutation<FreeKvShape>; 7] = [
            ("seqs", |s| s.seqs = 0),
            ("top_k", |s| s.top_k = 0),
            ("window_pages", |s| s.window_pages = 0),
            ("max_pages", |s| s.max_pages = 0),
            ("head_dim", |s| s.head_dim = 100),
            ("head_dim", |s| s.head_dim = 512),
            ("page table entries", |s| s.max_pages = 1 << 30),
        ];
        for (what, f) in cases {
            let mut s = shape();
            f(&mut s);
            let m = msg(s.validate("kern").unwrap_err());
            assert!(m.contains(what) && m.starts_with("kern:"), "{m}");
        }
        let mut s = shape();
        s.sink_pages = 0;
        s.validate("t").unwrap();
        s.sink_pages = usize::MAX;
        assert!(msg(s.validate("t").unwrap_err()).contains("slots"));
        assert_eq!(
            [HeadFilter::All, HeadFilter::Flagged, HeadFilter::Unflagged].map(HeadFilter::code),
            [0, 1, 2]
        );
    }

    #[test]
    fn select_plan_checks_every_buffer() {
        let s = shape();
        let good = select_lens(&s);
        let p = plan_select(&s, &good, 132).unwrap();
        assert_eq!(p.dim_index, 1);
        assert_eq!(p.grid, 6);
        assert_eq!((p.chunks, p.pages_per_block), (4, 32));
        assert_eq!(p.score_smem, 4 * 128 * 4);
        assert!(
            plan_select(
                &s,
                &SelectLens {
                    selected: None,
                    ..good
                },
                132
            )
            .is_ok()
        );
        let cases: [Mutation<SelectLens>; 10] = [
            ("q_prev", |l| l.q_prev -= 1),
            ("summaries", |l| l.summaries -= 1),
            ("seq_info", |l| l.seq_info -= 1),
            ("flags", |l| l.flags -= 1),
            ("mid_page", |l| l.mid_page -= 1),
            ("page_mid", |l| l.page_mid -= 1),
            ("recall_count", |l| l.recall_count -= 1),
            ("recall_list", |l| l.recall_list -= 1),
            ("selected", |l| l.selected = Some(1)),
            ("scratch", |l| l.scratch -= 1),
        ];
        for (what, f) in cases {
            let mut l = good;
            f(&mut l);
            let m = msg(plan_select(&s, &l, 132).unwrap_err());
            assert!(m.starts_with("freekv_select:") && m.contains(what), "{m}");
        }
        // unsupported geometry
        let mut d = shape();
        d.head_dim = 96;
        assert!(msg(plan_select(&d, &select_lens(&d), 132).unwrap_err()).contains("head_dim 96"));
        let mut g = shape();
        g.group = FREEKV_MAX_GROUP + 1;
        assert!(msg(plan_select(&g, &select_lens(&g), 132).unwrap_err()).contains("group"));
        let mut k = shape();
        k.top_k = 5000;
        assert!(msg(plan_select(&k, &select_lens(&k), 132).unwrap_err()).contains("shared memory"));
        let mut c = shape();
        c.max_pages = 512 * 65_535 + 1;
        c.seqs = 1;
        c.kv_heads = 1;
        c.group = 1;
        assert!(msg(plan_select(&c, &select_lens(&c), 1).unwrap_err()).contains("chunks"));
        // spare slots: lists and the middle grow to k + spare, the page mask is checked, and
        // `want` must lie within top_k ..= k + spare
        let sp = shape().with_spare_pages(5);
        assert_eq!((sp.cache_pages(), sp.slots()), (13, 18));
        assert_eq!(
            (0..13).map(|i| sp.middle_slot(i)).collect::<Vec<_>>(),
            [2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 15, 16, 17]
        );
        assert!(plan_select(&sp, &select_lens(&shape()), 132).is_err());
        let mask = sp.seqs * sp.slots() * sp.kv_heads;
        let lens = SelectLens {
            cache: Some((13, mask)),
            ..select_lens(&sp)
        };
        let p = plan_select(&sp, &lens, 132).unwrap();
        assert_eq!((p.top_k, p.cache, p.want, p.slots), (8, 13, 13, 18));
        for (cache, what) in [
            (Some((13, mask - 1)), "page_mask"),
            (Some((7, mask)), "want 7"),
            (Some((14, mask)), "want 14"),
        ] {
            let m = msg(plan_select(&sp, &SelectLens { cache, ..lens }, 132).unwrap_err());
            assert!(m.contains(what), "{m}");
        }
        // pages per scoring block: ~8 blocks per SM, multiples of 32 in 32..=512
        assert_eq!(score_pages_per_block(8, 4096, 132), 32);
        assert_eq!(score_pages_per_block(128, 4096, 132), 512);
        assert_eq!(score_pages_per_block(32, 4096, 132), 128);
        assert_eq!(score_pages_per_block(1, 10, 0), 32);
    }

    #[test]
    fn correction_plan_checks() {
        let s = shape();
        let row = s.q_heads() * s.head_dim;
        let good = CorrectionLens {
            q: s.seqs * row,
            q_prev: s.seqs * row,
            seq_info: s.seqs * SEQ_INFO_WIDTH,
            flags: s.rows(),
            group_cosines: Some(s.rows()),
        };
        let dense = Strided::contiguous(row);
        let p = plan_correction(&s, dense, Some(0.9), &good).unwrap();
        assert_eq!((p.always, p.tau, p.grid), (0, 0.9, 6));
        assert_eq!(plan_correction(&s, dense, None, &good).unwrap().always, 1);
        assert_eq!(
            plan_correction(&s, dense, Some(1.0), &good).unwrap().always,
            1
        );
        assert_eq!(
            plan_correction(&s, dense, Some(-1.0), &good)
                .unwrap()
                .always,
            0
        );
        for bad in [1.5, -1.01, f32::NAN, f32::INFINITY] {
            let m = msg(plan_correction(&s, dense, Some(bad), &good).unwrap_err());
            assert!(m.contains("threshold"), "{m}");
        }
        // fused QKV rows: stride (Hq + 2 Hkv) d, offset 0
        let fused = Strided {
            offset: 0,
            stride: (s.q_heads() + 2 * s.kv_heads) * s.head_dim,
        };
        let l = CorrectionLens {
            q: fused.stride * s.seqs,
            ..good
        };
        plan_correction(&s, fused, Some(0.5), &l).unwrap();
        let m = msg(plan_correction(&s, fused, Some(0.5), &good).unwrap_err());
        assert!(m.contains("q:"), "{m}");
        let cases: [Mutation<CorrectionLens>; 5] = [
            ("q:", |l| l.q -= 1),
            ("q_prev", |l| l.q_prev -= 1),
            ("seq_info", |l| l.seq_info -= 1),
            ("flags", |l| l.flags -= 1),
            ("group_cosines", |l| l.group_cosines = Some(1)),
        ];
        for (what, f) in cases {
            let mut l = good;
            f(&mut l);
            let m = msg(plan_correction(&s, dense, Some(0.5), &l).unwrap_err());
            assert!(
                m.starts_with("freekv_correction:") && m.contains(what),
                "{m}"
            );
        }
        let mut g = shape();
        g.group = 33;
        assert!(plan_correction(&g, dense, None, &good).is_err());
    }
}
