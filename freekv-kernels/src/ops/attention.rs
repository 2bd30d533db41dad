//! Paged attention launchers: decode (flash-decoding split-K) and causal prefill.

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use freekv_layout::PageGeometry;
use half::bf16;

use crate::KernelError;
use crate::kernels::{
    ATTENTION_HEAD_DIMS, Kernels, MAX_DECODE_GROUP_TILE, Strided, check_align, check_len,
    decode_smem_bytes, grid_dim, masked_decode_compacts, mul, prefill_smem_bytes, u32_arg,
};
use crate::ops::select::HeadFilter;

const DECODE_TILE: usize = 64;
const DECODE_THREADS: u32 = 128;
const MIN_SPLIT_TOKENS: usize = 128;
/// Fixed cost of one decode block in tokens' worth of KV streaming (start-up, pipeline fill, the
/// final merge of its warps), for the planner.
const BLOCK_COST_TOKENS: usize = 128;
/// Cost of the split-K reduce launch in tokens' worth of one block's KV streaming.
const REDUCE_COST_TOKENS: usize = 64;
const PREFILL_ROWS: usize = 64;
const PREFILL_THREADS: u32 = 128;
const LOG2_E: f32 = std::f32::consts::LOG2_E;

/// Which KV heads a filtered decode attention computes: the pairs `(seq, h)` whose
/// `flags[seq · kv_heads + h]` passes `filter`, and optionally which pages each KV head attends
/// (see [`Kernels::decode_attention_heads`]).
#[derive(Clone, Copy)]
pub struct HeadMask<'a> {
    /// i32 `[batch][kv_heads]`, non-zero = flagged (the correction flags of a sparse layer).
    pub flags: &'a dyn DevicePtr<i32>,
    /// Which heads run.
    pub filter: HeadFilter,
    /// Optional i32 `[num_pages][kv_heads]` over the physical pages of `pages`: non-zero = the KV
    /// head skips that page (its tokens are masked exactly as those of an invalid page-table
    /// entry); all zeros attends everything.
    /// FreeKV's spare slots hold pages a head has cached but not selected.
    pub pages: Option<&'a dyn DevicePtr<i32>>,
}

impl std::fmt::Debug for HeadMask<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadMask")
            .field("flags_len", &self.flags.len())
            .field("filter", &self.filter)
            .field("pages_len", &self.pages.map(|p| p.len()))
            .finish()
    }
}

/// Shape of a paged attention call shared by decode and prefill.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    /// Query heads (a multiple of `geom.kv_heads`).
    pub q_heads: usize,
    /// Page geometry of the KV pool (page size, KV heads, head dim 64 or 128).
    pub geom: PageGeometry,
    /// Page ids per row of the page table (most pages one sequence can hold).
    pub table_stride: usize,
    /// Placement of the query rows (one row per token, `q_heads * head_dim` wide).
    pub q_rows: Strided,
    /// Softmax scale; `None` = `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
}

impl AttentionShape {
    fn validate(&self, kernel: &'static str) -> Result<(usize, usize), KernelError> {
        let g = &self.geom;
        let di = ATTENTION_HEAD_DIMS
            .iter()
            .position(|&d| d == g.head_dim)
            .ok_or_else(|| {
                KernelError::arg(
                    kernel,
                    format!("head_dim {} unsupported (64 or 128)", g.head_dim),
                )
            })?;
        if g.kv_heads == 0 || self.q_heads == 0 || !self.q_heads.is_multiple_of(g.kv_heads) {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "q_heads {} must be a non-zero multiple of kv_heads {}",
                    self.q_heads, g.kv_heads
                ),
            ));
        }
        if g.page_size == 0 || self.table_stride == 0 {
            return Err(KernelError::arg(
                kernel,
                "page_size and table_stride must be non-zero",
            ));
        }
        let cap = mul(kernel, "table capacity", self.table_stride, g.page_size)?;
        if cap > i32::MAX as usize {
            return Err(KernelError::arg(
                kernel,
                "table_stride * page_size exceeds i32",
            ));
        }
        if !self.q_rows.stride.is_multiple_of(8) || !self.q_rows.offset.is_multiple_of(8) {
            return Err(KernelError::arg(
                kernel,
                format!(
                    "query offset {} and stride {} must be multiples of 8 elements (16-byte loads)",
                    self.q_rows.offset, self.q_rows.stride
                ),
            ));
        }
        if let Some(s) = self.scale
            && !s.is_finite()
        {
            return Err(KernelError::arg(
                kernel,
                format!("scale {s} must be finite"),
            ));
        }
        Ok((di, self.q_heads / g.kv_heads))
    }

    fn scale_log2(&self) -> f32 {
        self.scale
            .unwrap_or(1.0 / (self.geom.head_dim as f32).sqrt())
            * LOG2_E
    }
}

/// How a decode call is split over the KV length. Build with [`Kernels::plan_decode`]; keep it
/// (and its workspace) fixed while shapes are stable, e.g. for CUDA graph capture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodePlan {
    /// The attention shape.
    pub shape: AttentionShape,
    /// Sequences.
    pub batch: usize,
    /// Upper bound of the sequence lengths the plan was sized for (longer ones are still
    /// correct: the last split takes the rest).
    pub max_seq_len: usize,
    /// KV splits per (sequence, head group).
    pub splits: usize,
    /// Tokens per split (a multiple of 64).
    pub chunk: usize,
    /// Query heads each block serves from one K/V load.
    pub group_tile: usize,
}

impl DecodePlan {
    /// fp32 workspace elements needed (0 with a single split).
    pub fn workspace_len(&self) -> usize {
        if self.splits <= 1 {
            0
        } else {
            self.batch * self.shape.q_heads * self.splits * (self.shape.geom.head_dim + 2)
        }
    }

    /// The same plan with a fixed number of tokens per split (rounded up to a multiple of 64);
    /// useful to force split-K in tests.
    pub fn with_chunk(mut self, chunk: usize) -> Self {
        let chunk = chunk.max(1).div_ceil(DECODE_TILE) * DECODE_TILE;
        self.chunk = chunk;
        self.splits = self.max_seq_len.max(1).div_ceil(chunk);
        self
    }
}

/// Shape of a prefill call: `batch` sequences whose new query tokens are packed one after another
/// (`q_start[b]..q_start[b+1]`, `total_q` in all, at most `max_q` per sequence).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillPlan {
    /// The attention shape.
    pub shape: AttentionShape,
    /// Sequences.
    pub batch: usize,
    /// Query tokens over all sequences.
    pub total_q: usize,
    /// Most query tokens of one sequence.
    pub max_q: usize,
}

fn group_tile(group: usize) -> usize {
    (1..=MAX_DECODE_GROUP_TILE.min(group))
        .rev()
        .find(|g| group.is_multiple_of(*g))
        .unwrap_or(1)
}

/// Splits and tokens per split for `base` blocks per split (sequences × head groups), `resident`
/// blocks running at once, sequences of up to `max_seq_len` tokens: the cheapest of every split
/// count (chunks of at least [`MIN_SPLIT_TOKENS`], multiples of [`DECODE_TILE`]) under the model
/// waves × (chunk + [`BLOCK_COST_TOKENS`]) (+ [`REDUCE_COST_TOKENS`] with several splits); ties
/// keep fewer splits.
fn plan_splits(base: usize, resident: usize, max_seq_len: usize) -> (usize, usize) {
    let (base, resident, len) = (base.max(1), resident.max(1), max_seq_len.max(1));
    let by_len = len.div_ceil(MIN_SPLIT_TOKENS).max(1);
    let mut best = (usize::MAX, 1, len.div_ceil(DECODE_TILE) * DECODE_TILE);
    for s in 1..=by_len.min(4 * resident) {
        let chunk = len.div_ceil(s).div_ceil(DECODE_TILE) * DECODE_TILE;
        let splits = len.div_ceil(chunk);
        let waves = base.saturating_mul(splits).div_ceil(resident);
        let reduce = if splits > 1 { REDUCE_COST_TOKENS } else { 0 };
        let cost = waves.saturating_mul(chunk + BLOCK_COST_TOKENS) + reduce;
        if cost < best.0 {
            best = (cost, splits, chunk);
        }
    }
    (best.1, best.2)
}

impl Kernels {
    /// Plans a decode call: picks the group tile, then the number of KV splits (at least 128
    /// tokens each, a multiple of 64) that minimises the modelled time of the slowest SM:
    /// (waves of resident blocks) × (tokens per split + a fixed per-block cost, plus the reduce
    /// launch when there are several splits), preferring fewer splits on ties.
    pub fn plan_decode(
        &self,
        shape: AttentionShape,
        batch: usize,
        max_seq_len: usize,
    ) -> Result<DecodePlan, KernelError> {
        const K: &str = "decode_attention";
        let _s = tracing::debug_span!("plan_decode").entered();
        let (di, group) = shape.validate(K)?;
        let gt = group_tile(group);
        let base = batch.max(1) * shape.geom.kv_heads * (group / gt);
        let occ = self.decode_occupancy[di][gt - 1].max(1) as usize;
        let resident = occ * self.sm_count.max(1) as usize;
        let (splits, chunk) = plan_splits(base, resident, max_seq_len);
        Ok(DecodePlan {
            shape,
            batch,
            max_seq_len,
            splits,
            chunk,
            group_tile: gt,
        })
    }

    /// Paged decode attention: one query token per sequence (`q` rows per `plan.shape.q_rows`),
    /// sequence `b` attends to its first `seq_lens[b]` tokens, whose pages are
    /// `page_table[b · table_stride ..]` in the NHD pool `pages`. `out` is `[batch, q_heads,
    /// head_dim]`. `workspace` must hold [`DecodePlan::workspace_len`] floats.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention(
        &self,
        stream: &CudaStream,
        plan: &DecodePlan,
        q: &impl DevicePtr<bf16>,
        pages: &impl DevicePtr<bf16>,
        page_table: &impl DevicePtr<i32>,
        seq_lens: &impl DevicePtr<i32>,
        out: &mut impl DevicePtrMut<bf16>,
        workspace: &mut impl DevicePtrMut<f32>,
    ) -> Result<(), KernelError> {
        self.decode_attention_heads(
            stream, plan, q, pages, page_table, seq_lens, out, workspace, None,
        )
    }

    /// [`Kernels::decode_attention`] restricted to the KV heads that `heads` selects: with
    /// `Some(mask)`, the (sequence, KV head) pairs the mask's filter rejects are not computed and
    /// their output rows are left as they are (`mask.flags` is i32 `[batch][kv_heads]`, non-zero =
    /// flagged). Two launches with [`HeadFilter::Unflagged`] and [`HeadFilter::Flagged`] write
    /// exactly what one unfiltered launch writes (they share the workspace, so they must be
    /// ordered on one stream); this lets the unflagged heads attend while the flagged heads' pages
    /// are still being recalled. `mask.pages`, when given, masks per KV head the physical pages
    /// it does not attend (with [`HeadFilter::All`] it applies to every head).
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_heads(
        &self,
        stream: &CudaStream,
        plan: &DecodePlan,
        q: &impl DevicePtr<bf16>,
        pages: &impl DevicePtr<bf16>,
        page_table: &impl DevicePtr<i32>,
        seq_lens: &impl DevicePtr<i32>,
        out: &mut impl DevicePtrMut<bf16>,
        workspace: &mut impl DevicePtrMut<f32>,
        heads: Option<HeadMask<'_>>,
    ) -> Result<(), KernelError> {
        const K: &str = "decode_attention";
        let _s = tracing::debug_span!("decode_attention").entered();
        let shape = &plan.shape;
        let (di, group) = shape.validate(K)?;
        let g = &shape.geom;
        let gt = plan.group_tile;
        if gt == 0 || gt > MAX_DECODE_GROUP_TILE || group % gt != 0 {
            return Err(KernelError::arg(
                K,
                format!("group tile {gt} does not divide the group {group}"),
            ));
        }
        if plan.splits == 0 || plan.chunk == 0 || !plan.chunk.is_multiple_of(DECODE_TILE) {
            return Err(KernelError::arg(
                K,
                "plan has no splits or a chunk not a multiple of 64",
            ));
        }
        let page_elems = g.page_elems();
        let num_pages = pages.len() / page_elems;
        if num_pages == 0 {
            return Err(KernelError::arg(K, "pages buffer holds no whole page"));
        }
        let width = mul(K, "q width", shape.q_heads, g.head_dim)?;
        shape.q_rows.check(K, "q", plan.batch, width, q.len())?;
        check_len(
            K,
            "page_table",
            page_table.len(),
            mul(K, "page_table", plan.batch, shape.table_stride)?,
        )?;
        check_len(K, "seq_lens", seq_lens.len(), plan.batch)?;
        check_len(K, "out", out.len(), mul(K, "out", plan.batch, width)?)?;
        let ws_need = plan.workspace_len();
        check_len(K, "workspace", workspace.len(), ws_need)?;
        if plan.batch == 0 {
            return Ok(());
        }
        let gz = grid_dim(K, "batch", plan.batch, 65_535)?;
        let gy = grid_dim(
            K,
            "kv_heads * group / tile",
            g.kv_heads * (group / gt),
            65_535,
        )?;
        let gx = grid_dim(K, "splits", plan.splits, i32::MAX as u32)?;
        let q_stride = shape.q_rows.stride as u64;
        let table_stride = u32_arg(K, "table_stride", shape.table_stride)?;
        let q_heads = u32_arg(K, "q_heads", shape.q_heads)?;
        let kv_heads = g.kv_heads as u32;
        let group_u = group as u32;
        let page_size = u32_arg(K, "page_size", g.page_size)?;
        let num_pages_u = u32_arg(K, "num_pages", num_pages)?;
        let chunk = u32_arg(K, "chunk", plan.chunk)?;
        let splits = gx;
        let scale_log2 = shape.scale_log2();

        let (qp, _gq) = q.device_ptr(stream);
        let qp = qp + 2 * shape.q_rows.offset as u64;
        let (pp, _gp) = pages.device_ptr(stream);
        check_align(K, "q", qp, 16)?;
        check_align(K, "pages", pp, 16)?;
        let (tp, _gt) = page_table.device_ptr(stream);
        let (lp, _gl) = seq_lens.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        let (wp, _gw) = workspace.device_ptr_mut(stream);
        let mut _gh = None;
        let (hfp, hfilter): (u64, u32) = match heads {
            None
            | Some(HeadMask {
                filter: HeadFilter::All,
                ..
            }) => (0, 0),
            Some(m) => {
                check_len(
                    K,
                    "head flags",
                    m.flags.len(),
                    mul(K, "head flags", plan.batch, g.kv_heads)?,
                )?;
                let (p, guard) = m.flags.device_ptr(stream);
                _gh = Some(guard);
                (p, m.filter.code() as u32)
            }
        };
        let mut _gm = None;
        let pmp: u64 = match heads.and_then(|m| m.pages) {
            None => 0,
            Some(pm) => {
                check_len(
                    K,
                    "page mask",
                    pm.len(),
                    mul(K, "page mask", num_pages, g.kv_heads)?,
                )?;
                let (p, guard) = pm.device_ptr(stream);
                _gm = Some(guard);
                p
            }
        };
        let acc_len = (plan.batch * shape.q_heads * plan.splits * g.head_dim) as u64;
        let ws_acc = wp;
        let ws_ml = if ws_need > 0 { wp + 4 * acc_len } else { wp };
        let f = &self.decode[di][gt - 1];
        // A masked launch compacts each KV head's attended pages (shared memory, one i32 per
        // table entry) when the table is short enough.
        let compact: u32 = u32::from(pmp != 0 && masked_decode_compacts(shape.table_stride));
        let smem = decode_smem_bytes(g.head_dim) + 4 * compact as usize * shape.table_stride;
        let cfg = LaunchConfig {
            grid_dim: (gx, gy, gz),
            block_dim: (DECODE_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = stream.launch_builder(f);
        b.arg(&qp)
            .arg(&q_stride)
            .arg(&pp)
            .arg(&tp)
            .arg(&table_stride)
            .arg(&lp)
            .arg(&op)
            .arg(&ws_acc)
            .arg(&ws_ml);
        b.arg(&q_heads)
            .arg(&kv_heads)
            .arg(&group_u)
            .arg(&page_size)
            .arg(&num_pages_u)
            .arg(&chunk)
            .arg(&splits);
        b.arg(&scale_log2)
            .arg(&hfp)
            .arg(&hfilter)
            .arg(&pmp)
            .arg(&compact);
        // SAFETY: argument types match the kernel; sizes and alignment checked above (the head
        // flags, when given, hold batch · kv_heads entries; null with filter 0 is never read;
        // the page mask, when given, num_pages · kv_heads entries, null is never read);
        // device-side page ids and lengths are bounds-checked by the kernel.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        if plan.splits > 1 {
            let hd = g.head_dim as u32;
            let rcfg = LaunchConfig {
                grid_dim: (q_heads, gz, 1),
                block_dim: (hd, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut r = stream.launch_builder(&self.decode_reduce);
            r.arg(&op)
                .arg(&ws_acc)
                .arg(&ws_ml)
                .arg(&q_heads)
                .arg(&splits)
                .arg(&hd)
                .arg(&hfp)
                .arg(&hfilter)
                .arg(&kv_heads)
                .arg(&group_u);
            // SAFETY: as above; the workspace was sized by workspace_len.
            unsafe { r.launch(rcfg) }.map_err(KernelError::driver("decode_reduce"))?;
        }
        Ok(())
    }

    /// Causal prefill attention over paged KV: the query tokens of sequence `b` are rows
    /// `q_start[b]..q_start[b+1]` of `q` (`q_start`: `batch + 1` device `i32`), the last
    /// `n_q` of its `seq_lens[b]` tokens (already appended to the pages), each attending to the
    /// keys at positions up to its own. `out` is `[total_q, q_heads, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        &self,
        stream: &CudaStream,
        plan: &PrefillPlan,
        q: &impl DevicePtr<bf16>,
        q_start: &impl DevicePtr<i32>,
        pages: &impl DevicePtr<bf16>,
        page_table: &impl DevicePtr<i32>,
        seq_lens: &impl DevicePtr<i32>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<(), KernelError> {
        const K: &str = "prefill_attention";
        let _s = tracing::debug_span!("prefill_attention").entered();
        let shape = &plan.shape;
        let (di, group) = shape.validate(K)?;
        let g = &shape.geom;
        let page_elems = g.page_elems();
        let num_pages = pages.len() / page_elems;
        if num_pages == 0 {
            return Err(KernelError::arg(K, "pages buffer holds no whole page"));
        }
        if plan.max_q > plan.total_q {
            return Err(KernelError::arg(K, "max_q exceeds total_q"));
        }
        let width = mul(K, "q width", shape.q_heads, g.head_dim)?;
        shape.q_rows.check(K, "q", plan.total_q, width, q.len())?;
        check_len(K, "q_start", q_start.len(), plan.batch + 1)?;
        check_len(
            K,
            "page_table",
            page_table.len(),
            mul(K, "page_table", plan.batch, shape.table_stride)?,
        )?;
        check_len(K, "seq_lens", seq_lens.len(), plan.batch)?;
        check_len(K, "out", out.len(), mul(K, "out", plan.total_q, width)?)?;
        if plan.batch == 0 || plan.max_q == 0 {
            return Ok(());
        }
        let rows = mul(K, "rows", plan.max_q, group)?;
        let gx = grid_dim(K, "row tiles", rows.div_ceil(PREFILL_ROWS), i32::MAX as u32)?;
        let gy = grid_dim(K, "kv_heads", g.kv_heads, 65_535)?;
        let gz = grid_dim(K, "batch", plan.batch, 65_535)?;
        let q_stride = shape.q_rows.stride as u64;
        let table_stride = u32_arg(K, "table_stride", shape.table_stride)?;
        let q_heads = u32_arg(K, "q_heads", shape.q_heads)?;
        let kv_heads = g.kv_heads as u32;
        let page_size = u32_arg(K, "page_size", g.page_size)?;
        let num_pages_u = u32_arg(K, "num_pages", num_pages)?;
        let scale_log2 = shape.scale_log2();
        let total_q = u32_arg(K, "total_q", plan.total_q)?;

        let (qp, _gq) = q.device_ptr(stream);
        let qp = qp + 2 * shape.q_rows.offset as u64;
        let (pp, _gp) = pages.device_ptr(stream);
        check_align(K, "q", qp, 16)?;
        check_align(K, "pages", pp, 16)?;
        let (sp, _gs) = q_start.device_ptr(stream);
        let (tp, _gt) = page_table.device_ptr(stream);
        let (lp, _gl) = seq_lens.device_ptr(stream);
        let (op, _go) = out.device_ptr_mut(stream);
        check_align(K, "out", op, 4)?;
        let cfg = LaunchConfig {
            grid_dim: (gx, gy, gz),
            block_dim: (PREFILL_THREADS, 1, 1),
            shared_mem_bytes: prefill_smem_bytes(g.head_dim) as u32,
        };
        let mut b = stream.launch_builder(&self.prefill[di]);
        b.arg(&qp)
            .arg(&q_stride)
            .arg(&sp)
            .arg(&pp)
            .arg(&tp)
            .arg(&table_stride)
            .arg(&lp)
            .arg(&op);
        b.arg(&q_heads)
            .arg(&kv_heads)
            .arg(&page_size)
            .arg(&num_pages_u)
            .arg(&total_q)
            .arg(&scale_log2);
        // SAFETY: argument types match the kernel; sizes and alignment checked above; device-side
        // offsets, page ids and lengths are bounds-checked by the kernel.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver(K))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_tile_divides() {
        for g in 1..=64 {
            let t = group_tile(g);
            assert!((1..=8).contains(&t) && g % t == 0, "group {g} -> {t}");
        }
        assert_eq!(group_tile(4), 4);
        assert_eq!(group_tile(3), 3);
        assert_eq!(group_tile(16), 8);
        assert_eq!(group_tile(7), 7);
        assert_eq!(group_tile(9), 3);
    }

    #[test]
    fn plan_splits_fills_the_machine_and_covers_the_length() {
        // 132 SMs × 2 resident blocks, Llama-3.1-8B heads (8 KV groups of 4).
        let resident = 264;
        for (batch, len) in [
            (1usize, 4096usize),
            (1, 32768),
            (8, 4096),
            (8, 32768),
            (32, 4096),
        ] {
            let base = batch * 8;
            let (splits, chunk) = plan_splits(base, resident, len);
            assert!(chunk.is_multiple_of(DECODE_TILE) && chunk >= MIN_SPLIT_TOKENS.min(len));
            assert!(
                splits * chunk >= len && (splits - 1) * chunk < len,
                "{batch}x{len}"
            );
            // One wave at least nine tenths full, or several.
            let blocks = base * splits;
            assert!(
                blocks > resident || blocks * 10 >= resident * 9,
                "{batch}x{len}: {blocks}"
            );
        }
        // Batch 1 at 32K: 32 splits of 1024 fill 256 of the 264 slots in one wave.
        assert_eq!(plan_splits(8, resident, 32768), (32, 1024));
        // Enough sequences to fill the machine: one split, no reduce.
        assert_eq!(plan_splits(256, resident, 4096), (1, 4096));
        // Short sequences: a single split of whole 64-token steps.
        assert_eq!(plan_splits(8, resident, 100), (1, 128));
        assert_eq!(plan_splits(8, resident, 0), (1, 64));
    }
}
