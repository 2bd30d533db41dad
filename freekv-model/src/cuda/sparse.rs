//! FreeKV on the CUDA backend: the sparse KV policies `oracle`, `arkvale` and `freekv` of a
//! [`CudaBatch`](super::CudaBatch).
//!
//! # Memory
//!
//! * Host: the full KV history of every sparse layer in a [`HostKvPool`] (pinned, mapped, HND
//!   pages `[Hkv][2][P][d]`, grown in chunks, bounded by [`GpuKvOptions::host_max_bytes`]). Pages
//!   are written by the GPU (the offload kernel transposes NHD → HND and writes through the mapped
//!   pointer when a page fills), never by a CPU core.
//! * Device, per sparse layer: the resident slots `[bs·nb][2][P][Hkv][d]` (sinks, retrieved
//!   pages, the recent-window ring, then `freekv`'s spare slots: a per-head victim cache of
//!   pages that left the top-k, skipped by the attention through a page mask written by the
//!   selection; [`GpuKvOptions::spare_pages`]), the page summaries `[bs][Hkv][MP][2][d]` f32, the slot
//!   tables of the middle, the recall lists and the last query. Apart from the summaries nothing
//!   grows with the context. Prefill runs layer by layer over the whole prompt (in chunks):
//!   a sparse layer writes its prompt KV into one of two shared scratch pools (`max_prompt`
//!   tokens each), and when the layer is done its full pages are offloaded and summarised on the
//!   recall stream while the next layer runs on the other pool. A prompt never has more than
//!   two layers' KV on the device, whatever the number of layers.
//! * Dense layers (`dense_layers`) keep their full KV on the device, as with `full`.
//!
//! # One decode step of a sparse layer
//!
//! QKV → RoPE → append into the current page's ring slot → offload + summary of a page that
//! filled → per policy:
//!
//! * `oracle` (`KvKind::Quest`): select with `q_t` and gather the missing pages from a
//!   device-resident copy of the history — attention over the budget the current query picks,
//!   with no PCIe cost (the lower bound).
//! * `arkvale`: select with `q_t`, then the published recall: the recall list read back, one
//!   copy per (page, head) into the slots, the host waiting, then attention.
//! * `freekv`: (wait for the speculative recall of the previous step) → correction: per KV
//!   head the mean cosine of `q_t` and `q_{t−1}` on the device; the flagged heads select with
//!   `q_t` and their missing pages are recalled (kernels launched unconditionally, exiting at
//!   once when nothing is flagged: no host read-back), then every head attends (with
//!   [`GpuKvOptions::overlap_correction`] on and the gather recall: the corrective path on the
//!   correction stream while the unflagged heads attend, the flagged heads after it) → on the
//!   recall stream, after an event recorded behind the attention: select with `q_t` the heads
//!   not flagged at this step (a flagged head has just selected with the same query over the
//!   same summaries; see [`GpuKvOptions::speculate_corrected`]) and recall the differences
//!   (zero-copy gather kernel, or the double-buffered streamed copy), to be waited for before
//!   this layer's next attention.
//!
//! Events order everything the original code raced on (spec §9 items 10–14): the speculative
//! selection and recall start only after the layer's attention has read the slots; the next
//! attention waits for them; per-step metadata is double-buffered in eager mode; a prefill joins
//! every pending recall first.

use std::str::FromStr;
use std::sync::Arc;

use freekv_kernels::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, CudaView, DriverError, PinnedHostSlice,
};
use freekv_kernels::half::bf16;
use freekv_kernels::{
    DecodePlan, FreeKvShape, Gpu, HeadFilter, KernelError, Kernels, SelectCache, Strided,
};
use freekv_layout::Budget;
use freekv_recall::cuda::{
    Backing, GatherRecall, HostKvPool, HostPoolConfig, PerPageRecall, StreamedRecall,
    StreamedTicket,
};

use super::sparse_plan::{MODE_FIRST, MODE_SPARSE, SEQ_INFO_WIDTH, StepPlan};
use crate::ModelError;
use crate::kv::{KvConfig, KvKind};

/// How `freekv`'s recall moves pages on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GpuRecall {
    /// One zero-copy gather kernel per layer reading the mapped host pages (few SMs, no host
    /// round trip, graph-capturable). The default: the faster one on the H200.
    #[default]
    Gather,
    /// The paper's double-buffered streamed copy: the recall list read back by a worker thread,
    /// one `cuMemcpyHtoDAsync` per (page, head) into two staging buffers on two streams, the
    /// scatter of row i−1 overlapping the copy of row i. Eager only.
    Streamed,
}

impl GpuRecall {
    /// `gather` or `streamed`.
    pub fn name(self) -> &'static str {
        match self {
            GpuRecall::Gather => "gather",
            GpuRecall::Streamed => "streamed",
        }
    }
}

impl FromStr for GpuRecall {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gather" | "zero-copy" | "zerocopy" => Ok(GpuRecall::Gather),
            "streamed" | "copy" | "double-buffered" => Ok(GpuRecall::Streamed),
            _ => Err(ModelError::Config(format!(
                "unknown GPU recall `{s}` (expected gather or streamed)"
            ))),
        }
    }
}

/// The KV policy of a CUDA batch.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuKvOptions {
    /// Policy and its parameters (the same as the CPU backend's; `quest` runs as `oracle`).
    pub kv: KvConfig,
    /// How `freekv` recalls.
    pub recall: GpuRecall,
    /// Thread blocks of the speculative gather kernel (the link saturates with ~8 SMs).
    pub gather_blocks: usize,
    /// Thread blocks of the corrective gather (the flagged heads' recall, on the critical path;
    /// more blocks than the speculative gather so that it takes most of the link while the
    /// other layer's speculative recall shares it, and fewer round trips when it is small).
    pub correction_gather_blocks: usize,
    /// `freekv` with the gather recall: the unflagged heads attend on the compute stream while
    /// the flagged heads' corrective selection and recall run on a second stream; the flagged
    /// heads attend after both (the same results, bit for bit). Off (the default): the
    /// corrective path, then one attention of every head. The overlap pays only when the
    /// corrective recall is large (no spare slots); with them the second attention launch
    /// costs more than it hides.
    pub overlap_correction: bool,
    /// `freekv`: spare middle slots per (sequence, KV head) beyond the `k` retrieved pages, a
    /// cache the attention does not read (a per-head page mask skips it). Pages that leave a
    /// head's top-k stay in their slot until a missing page needs it, and the missing pages
    /// overwrite the lowest-scored cached pages first, so a head whose selection changes back
    /// (a corrected head, above all) finds pages still on the device and fewer bytes cross
    /// PCIe. The same pages are attended as without spare slots (the selections are the CPU
    /// reference's); it costs `spare` pages of device memory per sequence and layer. `None`
    /// (the default): as many as the retrieved pages `k`. Ignored by the other policies.
    pub spare_pages: Option<usize>,
    /// With spare slots: the speculative selection also recalls the pages ranked after the
    /// top-k into them (top-`(k + spare)` by `q_{t−1}`). More speculative recall; it pays only
    /// where the spare slots hold most of the candidates.
    pub spare_prefetch: bool,
    /// `freekv`: the speculative selection after the attention also covers the heads the
    /// correction flagged at this step (a flagged head then selects twice per step, as this
    /// engine did before session 13). Off (the default): only the unflagged heads select
    /// speculatively, so every head selects once per step, as in the published code. A flagged
    /// head has just selected with the same query `q_t` over the same page summaries, so its
    /// speculative selection would pick the same pages, find them resident and recall nothing:
    /// skipping it changes no result and takes the scoring of every summary of those heads off
    /// the recall stream, where it competes with the next layers for memory bandwidth (the CPU
    /// policy likewise reuses a flagged head's fresh selection). With [`Self::spare_prefetch`] the speculative selection
    /// wants more pages than the corrective one, and every head selects.
    pub speculate_corrected: bool,
    /// Longest prompt one sequence is prefilled with (sizes the prefill scratch; default: the
    /// batch's `max_seq_len`).
    pub max_prompt: Option<usize>,
    /// Bound on the pinned host memory of the KV history (`None`: unbounded).
    pub host_max_bytes: Option<usize>,
    /// Read back the correction flags after every step for [`GpuKvStats`] (one small copy).
    pub collect_stats: bool,
    /// `freekv`: multiprocessors the decode step's cuBLAS products leave free (they are sized
    /// for the device's SMs minus these), so that the speculative branch on the recall stream
    /// does not hold an SM a one-wave product waits for. 0: products sized for every SM.
    /// Below the device's SM count (checked when the batch is made). Ignored by the other
    /// policies and by the native GEMM.
    pub reserve_sms: usize,
}

/// Default thread blocks of the gather kernel.
pub const DEFAULT_GATHER_BLOCKS: usize = freekv_recall::cuda::DEFAULT_GATHER_BLOCKS;

/// Default thread blocks of the corrective gather.
pub const DEFAULT_CORRECTION_GATHER_BLOCKS: usize = 32;

impl GpuKvOptions {
    /// `kv` with the GPU defaults (gather recall, [`DEFAULT_GATHER_BLOCKS`] blocks, statistics
    /// on).
    pub fn new(kv: KvConfig) -> Self {
        Self {
            kv,
            recall: GpuRecall::Gather,
            gather_blocks: DEFAULT_GATHER_BLOCKS,
            correction_gather_blocks: DEFAULT_CORRECTION_GATHER_BLOCKS,
            overlap_correction: false,
            spare_pages: None,
            spare_prefetch: false,
            speculate_corrected: false,
            max_prompt: None,
            host_max_bytes: None,
            collect_stats: true,
            reserve_sms: 0,
        }
    }

    /// `oracle` for `quest`, otherwise the policy's own name.
    pub fn policy_name(&self) -> &'static str {
        match self.kv.kind {
            KvKind::Quest => "oracle",
            k => k.name(),
        }
    }

    /// Spare middle slots this policy uses: [`Self::spare_pages`] (by default the budget's
    /// retrieved pages) for `freekv`, 0 for the other policies.
    pub fn effective_spare_pages(&self) -> Result<usize, ModelError> {
        if self.kv.kind != KvKind::FreeKv {
            return Ok(0);
        }
        match self.spare_pages {
            Some(n) => Ok(n),
            None => Ok(self.kv.budget_pages()?.retrieved_pages()),
        }
    }

    /// Rejects options no batch can run with (checked before anything is allocated).
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.gather_blocks == 0 || self.correction_gather_blocks == 0 {
            return Err(ModelError::Config(format!(
                "gather blocks must be at least 1 (speculative {}, corrective {})",
                self.gather_blocks, self.correction_gather_blocks
            )));
        }
        Ok(())
    }

    /// The heads `freekv`'s speculative selection covers: the unflagged ones, unless
    /// [`Self::speculate_corrected`] or [`Self::spare_prefetch`] asks for every head.
    pub fn speculative_heads(&self) -> HeadFilter {
        if self.speculate_corrected || self.spare_prefetch {
            HeadFilter::All
        } else {
            HeadFilter::Unflagged
        }
    }

    /// Whether the decode step can be captured as a CUDA graph (everything but the host-driven
    /// recalls).
    pub fn graph_capturable(&self) -> bool {
        match self.kv.kind {
            KvKind::ArkVale => false,
            KvKind::FreeKv => self.recall == GpuRecall::Gather,
            _ => true,
        }
    }
}

/// Statistics of a sparse CUDA batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuKvStats {
    /// Decode steps.
    pub steps: u64,
    /// (step, sparse layer, sequence) triples in the sparse phase.
    pub sparse_seq_layer_steps: u64,
    /// Of those, first sparse steps (full synchronous selection).
    pub first_sparse: u64,
    /// KV heads checked by the correction (sparse, non-first steps).
    pub heads_checked: u64,
    /// KV heads flagged by it (recalled synchronously).
    pub heads_flagged: u64,
    /// (step, layer, sequence) triples with at least one flagged head.
    pub corrected_seq_layer_steps: u64,
}

impl GpuKvStats {
    /// Flagged heads ÷ checked heads.
    pub fn head_correction_rate(&self) -> f64 {
        if self.heads_checked == 0 {
            0.0
        } else {
            self.heads_flagged as f64 / self.heads_checked as f64
        }
    }

    /// As JSON (for `--json` and the benches).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "steps": self.steps,
            "sparse_seq_layer_steps": self.sparse_seq_layer_steps,
            "first_sparse": self.first_sparse,
            "heads_checked": self.heads_checked,
            "heads_flagged": self.heads_flagged,
            "head_correction_rate": self.head_correction_rate(),
            "corrected_seq_layer_steps": self.corrected_seq_layer_steps,
        })
    }
}

pub(crate) fn drv(what: impl Into<String>) -> impl FnOnce(DriverError) -> ModelError {
    let what = what.into();
    move |source| ModelError::Kernel(KernelError::Driver { what, source })
}

fn oom(what: String) -> impl FnOnce(DriverError) -> ModelError {
    move |source| {
        ModelError::Kernel(KernelError::Driver {
            what: format!("{what} (lower the batch size, the budget or --max-prompt)"),
            source,
        })
    }
}

/// Device state of one sparse layer.
pub(crate) struct SparseLayer {
    pub(crate) slots: CudaSlice<bf16>,
    pub(crate) summaries: CudaSlice<f32>,
    pub(crate) mid_page: CudaSlice<i32>,
    pub(crate) page_mid: CudaSlice<i32>,
    pub(crate) recall_count: CudaSlice<i32>,
    pub(crate) recall_list: CudaSlice<i32>,
    pub(crate) selected: CudaSlice<i32>,
    pub(crate) q_prev: CudaSlice<f32>,
    pub(crate) flags: CudaSlice<i32>,
    /// With spare slots: the attention's per-head page skip mask `[bs · nb][Hkv]` (1 = a cached
    /// page outside the head's top-k), written by the selections.
    pub(crate) page_mask: Option<CudaSlice<i32>>,
}

impl SparseLayer {
    /// The fused selection of this layer on `stream` for the rows of `info` that pass `filter`
    /// (`q_prev` against the page summaries; `want` middle pages kept with a page mask): it
    /// updates the slot tables and writes the recall lists.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn select(
        &mut self,
        k: &Kernels,
        stream: &CudaStream,
        shape: &FreeKvShape,
        kv: &KvConfig,
        info: &CudaView<'_, i32>,
        filter: HeadFilter,
        scratch: &mut CudaSlice<f32>,
        want: usize,
    ) -> Result<(), ModelError> {
        k.freekv_select(
            stream,
            shape,
            kv.group_policy,
            kv.summary,
            &self.q_prev,
            &self.summaries,
            info,
            &self.flags,
            filter,
            &mut self.mid_page,
            &mut self.page_mid,
            &mut self.recall_count,
            &mut self.recall_list,
            Some(&mut self.selected),
            scratch,
            self.page_mask
                .as_mut()
                .map(|page_mask| SelectCache { want, page_mask }),
        )?;
        Ok(())
    }
}

/// The sparse part of a CUDA batch.
pub(crate) struct SparseState {
    pub(crate) opts: GpuKvOptions,
    pub(crate) budget: Budget,
    pub(crate) shape: FreeKvShape,
    /// Model layer → sparse layer index.
    pub(crate) layer_of: Vec<Option<usize>>,
    pub(crate) layers: Vec<SparseLayer>,
    pub(crate) pool: HostKvPool,
    pub(crate) gather: GatherRecall,
    /// The corrective gather (flagged heads, on the critical path): its own block count
    /// ([`GpuKvOptions::correction_gather_blocks`]) and counters.
    pub(crate) corr_gather: GatherRecall,
    /// Pages of one sequence's prompt a prefill scratch holds.
    pub(crate) prefill_pages: usize,
    /// The prefill scratch pools (NHD, `prefill_pages` pages each): sparse layer `si` writes
    /// its prompt KV into `prefill_kv[si % 2]` (one pool when there is one sparse layer).
    pub(crate) prefill_kv: Vec<CudaSlice<bf16>>,
    /// Recorded on the compute stream when a layer's prefill is done (its offload waits).
    pub(crate) prefill_ready: CudaEvent,
    /// Recorded on the recall stream when the offload out of scratch `i` is done (the next
    /// layer that writes scratch `i` waits).
    pub(crate) scratch_free: Vec<CudaEvent>,
    /// `0..prefill_pages` (the page table of a prefill).
    pub(crate) prefill_table: CudaSlice<i32>,
    /// `0..bs·nb` (the page table of the KV append into the slots).
    pub(crate) slot_table: CudaSlice<i32>,
    /// Per-step metadata ([`StepPlan::flatten`]), double-buffered for eager steps.
    pub(crate) smeta: [CudaSlice<i32>; 2],
    pub(crate) parity: usize,
    /// The metadata buffer of the step being run.
    pub(crate) cur: usize,
    /// Offload entries of the step (`[bs][3]`), double-buffered like `smeta`.
    pub(crate) fill: [CudaSlice<i32>; 2],
    /// Correction flags of every sparse layer gathered at the end of a step, `[layer][bs][Hkv]`
    /// (one read-back per step for the statistics).
    pub(crate) flags_all: CudaSlice<i32>,
    /// Where `flags_all` is copied after a step for the statistics (`freekv` with statistics
    /// on): the host counts the flags at the next step or when the statistics are read, so a
    /// step does not wait for itself.
    pub(crate) flags_host: Option<FlagsReadback>,
    pub(crate) streamed: Option<StreamedRecall>,
    pub(crate) tickets: Vec<Option<StreamedTicket>>,
    pub(crate) per_page: Option<PerPageRecall>,
    /// Split-K plan of the attention over `nb` slots.
    pub(crate) plan: DecodePlan,
    pub(crate) scratch: [CudaSlice<f32>; 2],
    pub(crate) recall_stream: Arc<CudaStream>,
    /// The stream of the corrective selection and recall when they overlap the unflagged
    /// heads' attention ([`GpuKvOptions::overlap_correction`]).
    pub(crate) correction_stream: Arc<CudaStream>,
    /// Recorded on the compute stream when a layer's correction flags are written (the
    /// correction stream waits), and on the correction stream when the corrective recall is
    /// done (the flagged heads' attention waits). Reused by every layer: each wait is enqueued
    /// right after its record.
    pub(crate) flags_ready: CudaEvent,
    pub(crate) correction_done: CudaEvent,
    pub(crate) attn_done: Vec<CudaEvent>,
    pub(crate) recall_done: Vec<CudaEvent>,
    pub(crate) started: Vec<bool>,
    /// Sequences restarted since their page-mask rows were last cleared (cleared before the
    /// next decode step: a dense phase attends every slot).
    pub(crate) mask_stale: Vec<bool>,
    /// Whether the batch replays captured steps (then every step joins its recalls).
    pub(crate) use_graph: bool,
    pub(crate) stats: GpuKvStats,
    /// Host copy of the last step's plan (statistics).
    pub(crate) last_plan: Option<StepPlan>,
    /// The last step's `seq_info` rows (snapshots).
    pub(crate) last_plan_info: Option<Vec<i32>>,
}

impl std::fmt::Debug for SparseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseState")
            .field("policy", &self.opts.policy_name())
            .field("budget", &self.budget)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// Sizes the sparse state needs from the batch.
pub(crate) struct SparseDims {
    pub(crate) n_layers: usize,
    pub(crate) q_heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) max_seqs: usize,
    pub(crate) max_seq_len: usize,
    pub(crate) use_graph: bool,
}

impl SparseState {
    /// The sparse state of a batch; `plan_shape` is the model's attention shape (its
    /// `table_stride` is set here to the physical slots of a sequence).
    pub(crate) fn new(
        gpu: &Arc<Gpu>,
        opts: GpuKvOptions,
        dims: &SparseDims,
        plan_shape: freekv_kernels::AttentionShape,
    ) -> Result<Self, ModelError> {
        opts.validate()?;
        let kernels = gpu.kernels();
        let s = gpu.stream();
        let kv = &opts.kv;
        if kv.kind == KvKind::Full {
            return Err(ModelError::Config(
                "the sparse CUDA state is for oracle, arkvale and freekv".into(),
            ));
        }
        kv.validate(dims.n_layers)?;
        let budget = kv.budget_pages()?;
        let p = budget.page_size();
        let bs = dims.max_seqs;
        let max_pages = dims.max_seq_len.div_ceil(p).max(1);
        if dims.kv_heads == 0 || !dims.q_heads.is_multiple_of(dims.kv_heads) {
            return Err(ModelError::Config(format!(
                "{} query heads do not form groups over {} KV heads",
                dims.q_heads, dims.kv_heads
            )));
        }
        let shape = FreeKvShape::from_budget(
            bs,
            dims.kv_heads,
            dims.q_heads / dims.kv_heads,
            dims.head_dim,
            &budget,
            max_pages,
        )
        .with_spare_pages(opts.effective_spare_pages()?);
        shape.validate("freekv batch")?;
        let nb = shape.slots();
        let max_prompt = opts
            .max_prompt
            .unwrap_or(dims.max_seq_len)
            .clamp(1, dims.max_seq_len);
        let prefill_pages = max_prompt.div_ceil(p);
        let mut layer_of = vec![None; dims.n_layers];
        let mut n_sparse = 0;
        for (l, slot) in layer_of.iter_mut().enumerate() {
            if !kv.dense_layers.contains(&l) {
                *slot = Some(n_sparse);
                n_sparse += 1;
            }
        }
        let (hkv, d, hq) = (dims.kv_heads, dims.head_dim, dims.q_heads);
        let page_elems = 2 * p * hkv * d;
        let c = shape.cache_pages();
        let spare = shape.spare_pages > 0;
        let mut layers = Vec::with_capacity(n_sparse);
        let neg = |n: usize| vec![-1i32; n];
        for l in 0..n_sparse {
            let what = |x: &str| format!("allocating the {x} of sparse layer {l}");
            layers.push(SparseLayer {
                slots: s
                    .alloc_zeros::<bf16>(bs * nb * page_elems)
                    .map_err(oom(what("resident slots")))?,
                summaries: s
                    .alloc_zeros::<f32>(bs * hkv * max_pages * 2 * d)
                    .map_err(oom(what("page summaries")))?,
                mid_page: s
                    .clone_htod(&neg(bs * hkv * c))
                    .map_err(oom(what("slot table")))?,
                page_mid: s
                    .clone_htod(&neg(bs * hkv * max_pages))
                    .map_err(oom(what("page table")))?,
                recall_count: s
                    .alloc_zeros::<i32>(bs * hkv)
                    .map_err(oom(what("recall counts")))?,
                recall_list: s
                    .alloc_zeros::<i32>(bs * hkv * c * 2)
                    .map_err(oom(what("recall list")))?,
                selected: s
                    .clone_htod(&neg(bs * hkv * shape.top_k))
                    .map_err(oom(what("selection")))?,
                q_prev: s
                    .alloc_zeros::<f32>(bs * hq * d)
                    .map_err(oom(what("query history")))?,
                flags: s
                    .alloc_zeros::<i32>(bs * hkv)
                    .map_err(oom(what("correction flags")))?,
                page_mask: if spare {
                    Some(
                        s.alloc_zeros::<i32>(bs * nb * hkv)
                            .map_err(oom(what("page mask")))?,
                    )
                } else {
                    None
                },
            });
        }
        let backing = if kv.kind == KvKind::Quest {
            Backing::Device
        } else {
            Backing::MappedHost
        };
        let pool = HostKvPool::new(
            s,
            HostPoolConfig {
                layers: n_sparse,
                seqs: bs,
                max_pages,
                kv_heads: hkv,
                page_elems,
                chunk_pages: 1024,
                max_bytes: opts.host_max_bytes,
                backing,
                // Pinning a 128 MiB chunk (Llama-3.1-8B pages) takes ~75 ms: not in a step.
                grow_ahead: true,
            },
        )?;
        let prefill_table: Vec<i32> = (0..prefill_pages as i32).collect();
        let mut prefill_kv = Vec::with_capacity(2);
        for i in 0..n_sparse.min(2) {
            prefill_kv.push(s.alloc_zeros::<bf16>(prefill_pages * page_elems).map_err(oom(
                format!(
                    "allocating prefill scratch {i} ({} tokens × {:.1} KiB; lower --max-prompt)",
                    prefill_pages * p,
                    (2 * page_elems / p) as f64 / 1024.0
                ),
            ))?);
        }
        let slot_table: Vec<i32> = (0..(bs * nb) as i32).collect();
        let meta_len = StepPlan::offsets(bs, nb)[6];
        // The attention's table holds every physical slot of a sequence (spare ones included).
        // With spare slots each KV head attends only its budget's pages (the page mask skips
        // the rest, and the kernel compacts each head's pages when the table is short enough):
        // the splits are planned for the budget's length.
        let plan_shape = freekv_kernels::AttentionShape {
            table_stride: nb,
            ..plan_shape
        };
        let plan = kernels.plan_decode(
            plan_shape,
            bs,
            attended_pages(budget.total_pages(), nb, spare) * p,
        )?;
        let scratch_len = shape.select_scratch_len().max(1);
        let ctx = s.context();
        let mut attn_done = Vec::with_capacity(n_sparse);
        let mut recall_done = Vec::with_capacity(n_sparse);
        for _ in 0..n_sparse {
            attn_done.push(ctx.new_event(None).map_err(drv("creating an event"))?);
            recall_done.push(ctx.new_event(None).map_err(drv("creating an event"))?);
        }
        let scratch_free = (0..n_sparse.min(2))
            .map(|_| ctx.new_event(None).map_err(drv("creating an event")))
            .collect::<Result<Vec<_>, _>>()?;
        let prefill_ready = ctx.new_event(None).map_err(drv("creating an event"))?;
        let gather = GatherRecall::new(opts.gather_blocks).with_counters(s)?;
        let corr_gather = GatherRecall::new(opts.correction_gather_blocks).with_counters(s)?;
        let streamed = if kv.kind == KvKind::FreeKv && opts.recall == GpuRecall::Streamed {
            Some(StreamedRecall::new(gpu, &shape)?)
        } else {
            None
        };
        let per_page = if kv.kind == KvKind::ArkVale {
            Some(PerPageRecall::new(s, &shape)?)
        } else {
            None
        };
        Ok(Self {
            budget,
            shape,
            layer_of,
            layers,
            pool,
            gather,
            corr_gather,
            prefill_pages,
            prefill_kv,
            prefill_ready,
            scratch_free,
            prefill_table: s
                .clone_htod(&prefill_table)
                .map_err(drv("uploading the prefill table"))?,
            slot_table: s
                .clone_htod(&slot_table)
                .map_err(drv("uploading the slot table"))?,
            smeta: [
                s.alloc_zeros::<i32>(meta_len)
                    .map_err(drv("allocating step metadata"))?,
                s.alloc_zeros::<i32>(meta_len)
                    .map_err(drv("allocating step metadata"))?,
            ],
            parity: 0,
            cur: 0,
            fill: [
                s.alloc_zeros::<i32>(3 * bs)
                    .map_err(drv("allocating offload entries"))?,
                s.alloc_zeros::<i32>(3 * bs)
                    .map_err(drv("allocating offload entries"))?,
            ],
            flags_all: s
                .alloc_zeros::<i32>((n_sparse * bs * hkv).max(1))
                .map_err(drv("allocating correction flags"))?,
            flags_host: if kv.kind == KvKind::FreeKv && opts.collect_stats {
                // Read by the host: plain page-locked memory, not write-combined.
                // SAFETY: the buffer is only read after a copy into all of it completed (its
                // event is recorded after the copy and synchronised before the read).
                let host =
                    unsafe { ctx.alloc_pinned_with_flags::<i32>((n_sparse * bs * hkv).max(1), 0) }
                        .map_err(drv("allocating the host copy of the correction flags"))?;
                Some(FlagsReadback {
                    host,
                    copied: ctx.new_event(None).map_err(drv("creating an event"))?,
                    pending: None,
                })
            } else {
                None
            },
            streamed,
            tickets: (0..n_sparse).map(|_| None).collect(),
            per_page,
            plan,
            scratch: [
                s.alloc_zeros::<f32>(scratch_len)
                    .map_err(oom("allocating selection scratch".into()))?,
                s.alloc_zeros::<f32>(scratch_len)
                    .map_err(oom("allocating selection scratch".into()))?,
            ],
            recall_stream: s.fork().map_err(drv("creating the recall stream"))?,
            // On the critical path (the flagged heads' attention waits for it): as urgent as
            // the compute stream, unlike the speculative recall stream.
            correction_stream: gpu.urgent_stream()?,
            flags_ready: ctx.new_event(None).map_err(drv("creating an event"))?,
            correction_done: ctx.new_event(None).map_err(drv("creating an event"))?,
            attn_done,
            recall_done,
            started: vec![false; bs],
            mask_stale: vec![false; bs],
            use_graph: dims.use_graph,
            stats: GpuKvStats::default(),
            last_plan: None,
            last_plan_info: None,
            opts,
        })
    }

    /// Whether every sequence of the step being run is dense (mode "skip": its whole context
    /// fits the budget; false outside a decode step). Such a step launches no selection or
    /// recall, corrective or speculative, and is captured into a graph of its own: those
    /// launches would only write zero recall counts, which the next selection overwrites
    /// before any recall reads them.
    pub(crate) fn all_dense(&self) -> bool {
        self.last_plan.as_ref().is_some_and(StepPlan::all_dense)
    }

    /// Sequence `seq` starts over (a prefill, a truncation to 0): its next sparse step selects
    /// from scratch, and its page-mask rows are cleared before the next decode step.
    pub(crate) fn restart(&mut self, seq: usize) {
        if let Some(x) = self.started.get_mut(seq) {
            *x = false;
        }
        if let Some(x) = self.mask_stale.get_mut(seq) {
            *x = true;
        }
    }

    /// Clear the page-mask rows of the restarted sequences on `s` (every slot attended again,
    /// as the dense phase needs). Called before a decode step, outside any capture.
    pub(crate) fn clear_stale_masks(&mut self, s: &Arc<CudaStream>) -> Result<(), ModelError> {
        if !self.mask_stale.iter().any(|&x| x) || self.layers.iter().all(|l| l.page_mask.is_none())
        {
            self.mask_stale.fill(false);
            return Ok(());
        }
        // An eager step's speculative selections may still be writing these rows (a sequence
        // truncated right after a step): the clear comes after them.
        self.join_recalls(s)?;
        let row = self.shape.slots() * self.shape.kv_heads;
        for (seq, stale) in self.mask_stale.iter_mut().enumerate() {
            if !*stale {
                continue;
            }
            for l in &mut self.layers {
                if let Some(m) = l.page_mask.as_mut() {
                    let mut v = m.slice_mut(seq * row..(seq + 1) * row);
                    s.memset_zeros(&mut v)
                        .map_err(drv("clearing a page mask"))?;
                }
            }
            *stale = false;
        }
        Ok(())
    }

    /// Make `s` wait for every recall issued so far (before touching slots or tables from the
    /// host side, and at the end of a captured step).
    pub(crate) fn join_recalls(&mut self, s: &Arc<CudaStream>) -> Result<(), ModelError> {
        // Captured steps (and the eager steps of a batch that captures) join their recalls
        // before they end; their events were last recorded inside a capture and cannot be
        // waited for from outside one.
        if self.opts.graph_capturable() && self.use_graph {
            return Ok(());
        }
        self.join_recalls_in_step(s)
    }

    /// Make `s` wait for every recall issued so far, from inside a step (also under capture).
    pub(crate) fn join_recalls_in_step(&mut self, s: &Arc<CudaStream>) -> Result<(), ModelError> {
        if self.opts.kv.kind != KvKind::FreeKv {
            return Ok(());
        }
        if let Some(st) = &self.streamed {
            for t in &mut self.tickets {
                if let Some(t) = t.take() {
                    st.wait(t, s)?;
                }
            }
        }
        for e in &self.recall_done {
            s.wait(e).map_err(drv("waiting for a recall"))?;
        }
        Ok(())
    }

    /// The event that frees the prefill scratch sparse layer `si` writes (`prefill_kv[si % 2]`).
    pub(crate) fn scratch_free_of(&self, si: usize) -> Result<&CudaEvent, ModelError> {
        self.scratch_free
            .get(si % 2)
            .ok_or_else(|| ModelError::Config(format!("no prefill scratch event for layer {si}")))
    }

    /// Counters of the corrective gathers alone (the flagged heads' recalls on the critical
    /// path; zero with the streamed or per-page recall, which are not split); synchronises `s`
    /// and the other streams.
    pub(crate) fn corrective_counters(
        &mut self,
        s: &Arc<CudaStream>,
    ) -> Result<freekv_recall::cuda::CudaRecallCounters, ModelError> {
        self.join_recalls(s)?;
        Ok(self
            .corr_gather
            .counters(s, &self.shape)?
            .unwrap_or_default())
    }

    /// Recall counters of every executor so far (units, bytes); synchronises `s` and the recall
    /// stream.
    pub(crate) fn recall_counters(
        &mut self,
        s: &Arc<CudaStream>,
    ) -> Result<freekv_recall::cuda::CudaRecallCounters, ModelError> {
        self.join_recalls(s)?;
        let mut c = self.gather.counters(s, &self.shape)?.unwrap_or_default();
        if let Some(corr) = self.corr_gather.counters(s, &self.shape)? {
            c.accumulate(&corr);
        }
        if let Some(st) = &self.streamed {
            c.accumulate(&st.totals());
        }
        if let Some(pp) = &self.per_page {
            c.accumulate(&pp.totals());
        }
        Ok(c)
    }

    /// Offsets of the plan's parts in the metadata buffer.
    pub(crate) fn meta_offsets(&self) -> [usize; 7] {
        StepPlan::offsets(self.shape.seqs, self.shape.slots())
    }

    /// After a decode step was launched, account it: counts the previous step's correction
    /// flags (their copy is done by now, or soon) and starts the copy of this step's, which the
    /// next step or [`SparseState::settle_stats`] counts. No host wait on the step itself.
    pub(crate) fn account_step(&mut self, s: &Arc<CudaStream>) -> Result<(), ModelError> {
        self.settle_stats()?;
        self.stats.steps += 1;
        let Some(plan) = self.last_plan.take() else {
            return Ok(());
        };
        let n_sparse = self.layers.len() as u64;
        // The flags count for the sequences in the sparse phase (not at their first sparse
        // step): a step without one copies nothing back (the all-dense steps do not even
        // gather the flags).
        let checked = plan
            .seq_info
            .chunks(SEQ_INFO_WIDTH)
            .any(|r| r.get(1) == Some(&MODE_SPARSE));
        if checked && let Some(rb) = self.flags_host.as_mut() {
            s.memcpy_dtoh(&self.flags_all, &mut rb.host)
                .map_err(drv("reading correction flags"))?;
            rb.copied
                .record(s)
                .map_err(drv("recording the flags read-back"))?;
            rb.pending = Some(plan.seq_info.clone());
        }
        for r in plan.seq_info.chunks(SEQ_INFO_WIDTH) {
            match r.get(1).copied().unwrap_or(0) {
                0 => {}
                m => {
                    self.stats.sparse_seq_layer_steps += n_sparse;
                    if m == MODE_FIRST {
                        self.stats.first_sparse += n_sparse;
                    }
                }
            }
        }
        self.last_plan_info = Some(plan.seq_info);
        Ok(())
    }

    /// Count the correction flags copied back after the last step, if not counted yet (waits
    /// for that copy, not for later work): the statistics are complete after this.
    pub(crate) fn settle_stats(&mut self) -> Result<(), ModelError> {
        let Some(rb) = self.flags_host.as_mut() else {
            return Ok(());
        };
        let Some(info) = rb.pending.take() else {
            return Ok(());
        };
        rb.copied
            .synchronize()
            .map_err(drv("waiting for the flags read-back"))?;
        // The copy into the buffer completed (synchronised above), and no other is enqueued
        // before the next `account_step`, which needs `&mut self`.
        let flags = rb
            .host
            .as_slice()
            .map_err(drv("reading correction flags"))?;
        let bs = self.shape.seqs;
        let hkv = self.shape.kv_heads;
        for layer_flags in flags.chunks_exact(bs * hkv) {
            for (seq, f) in layer_flags.chunks_exact(hkv).enumerate() {
                if info.get(SEQ_INFO_WIDTH * seq + 1) != Some(&MODE_SPARSE) {
                    continue;
                }
                let n = f.iter().filter(|&&x| x != 0).count() as u64;
                self.stats.heads_checked += hkv as u64;
                self.stats.heads_flagged += n;
                if n > 0 {
                    self.stats.corrected_seq_layer_steps += 1;
                }
            }
        }
        Ok(())
    }

    /// Device bytes held by the sparse layers (slots, summaries, tables, queries) and the two
    /// prefill scratch pools.
    pub(crate) fn device_bytes(&self) -> usize {
        self.prefill_kv.iter().map(|p| 2 * p.len()).sum::<usize>()
            + self
                .layers
                .iter()
                .map(|l| {
                    2 * l.slots.len()
                        + 4 * (l.summaries.len()
                            + l.mid_page.len()
                            + l.page_mid.len()
                            + l.recall_count.len()
                            + l.recall_list.len()
                            + l.selected.len()
                            + l.q_prev.len()
                            + l.flags.len()
                            + l.page_mask.as_ref().map_or(0, |m| m.len()))
                })
                .sum::<usize>()
            + 4 * self.flags_all.len()
    }

    /// The query rows for the correction kernel.
    pub(crate) fn q_rows(qkv_width: usize) -> Strided {
        Strided {
            offset: 0,
            stride: qkv_width,
        }
    }
}

/// The page-locked host copy of a step's correction flags, the event recorded after the copy
/// into it, and that step's `seq_info` rows while its flags are not counted yet.
pub(crate) struct FlagsReadback {
    host: PinnedHostSlice<i32>,
    copied: CudaEvent,
    pending: Option<Vec<i32>>,
}

impl Drop for FlagsReadback {
    /// A copy into the buffer may still be in flight: wait for it before the buffer is freed.
    fn drop(&mut self) {
        if let Err(e) = self.copied.synchronize() {
            tracing::warn!("waiting for the flags read-back before freeing its buffer: {e}");
        }
    }
}

/// Pages per sequence the decode attention of a sparse layer is planned for: with spare slots
/// (a page mask) each KV head attends only its budget's pages, which the kernel compacts when
/// the table of `slots` entries is short enough; otherwise it walks every slot.
fn attended_pages(budget_pages: usize, slots: usize, masked: bool) -> usize {
    if masked && freekv_kernels::masked_decode_compacts(slots) {
        budget_pages.min(slots)
    } else {
        slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_is_planned_for_the_attended_pages() {
        // The paper's budget (16 + 32 + 16 pages) with 32 spare slots: planned for 64 pages.
        assert_eq!(attended_pages(64, 96, true), 64);
        // No spare slots, no mask: every slot.
        assert_eq!(attended_pages(64, 64, false), 64);
        // A table past the kernel's compaction limit is walked whole.
        let big = freekv_kernels::DECODE_COMPACT_PAGES + 1;
        assert_eq!(attended_pages(64, big, true), big);
        assert_eq!(
            attended_pages(64, freekv_kernels::DECODE_COMPACT_PAGES, true),
            64
        );
    }

    #[test]
    fn options_reject_zero_block_counts() {
        let o = GpuKvOptions::new(KvConfig {
            kind: KvKind::FreeKv,
            ..KvConfig::default()
        });
        assert!(o.validate().is_ok());
        // Defaults: the serial corrective path, as many spare slots as retrieved pages for
        // freekv, none for the other policies.
        assert!(!o.overlap_correction);
        // The speculative selection skips the flagged heads unless asked, or unless it
        // prefetches (then it wants more pages than the corrective selection).
        assert_eq!(o.speculative_heads(), HeadFilter::Unflagged);
        let mut all = o.clone();
        all.speculate_corrected = true;
        assert_eq!(all.speculative_heads(), HeadFilter::All);
        all.speculate_corrected = false;
        all.spare_prefetch = true;
        assert_eq!(all.speculative_heads(), HeadFilter::All);
        let k = o.kv.budget_pages().unwrap().retrieved_pages();
        assert_eq!(o.effective_spare_pages().unwrap(), k);
        let mut off = o.clone();
        off.spare_pages = Some(0);
        assert_eq!(off.effective_spare_pages().unwrap(), 0);
        let oracle = GpuKvOptions::new(KvConfig {
            kind: KvKind::Quest,
            ..KvConfig::default()
        });
        assert_eq!(oracle.effective_spare_pages().unwrap(), 0);
        type Mutation = (&'static str, fn(&mut GpuKvOptions));
        let bad: [Mutation; 2] = [
            ("gather blocks", |o| o.gather_blocks = 0),
            ("gather blocks", |o| o.correction_gather_blocks = 0),
        ];
        for (word, m) in bad {
            let mut x = o.clone();
            m(&mut x);
            let e = x.validate().unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }
}
