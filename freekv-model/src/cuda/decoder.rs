//! The CUDA Llama decoder: bf16 weights, a paged NHD KV cache on the device, chunked prefill,
//! batched decode over ragged sequences, and the decode step of a fixed batch replayed as a CUDA
//! graph.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use freekv_kernels::cudarc::driver::sys::CUstreamCaptureMode;
use freekv_kernels::cudarc::driver::{CudaGraph, CudaSlice, CudaView, DevicePtr, DriverError};
use freekv_kernels::half::bf16;
use freekv_kernels::ops::gemv::QkvRows;
use freekv_kernels::ops::init::InitKernels;
use freekv_kernels::{
    AttentionShape, DecodePlan, Gpu, HeadFilter, HeadMask, KernelError, KvSource, LinearDims,
    PageTableLayout, PrefillPlan, RopeConfig, RopeLayout, RopeStyle, SamplingInputs, Strided,
};
use freekv_layout::PageGeometry;

use super::blas::Blas;
use super::sparse::{GpuKvOptions, GpuKvStats, SparseDims, SparseState};
use super::sparse_plan::{home_slot, plan_step};
use super::synthetic::{SyntheticSpec, synthetic_config, synthetic_name};
use super::weights::{Weights, dims};
use crate::ModelError;
use crate::config::LlamaConfig;
use crate::gguf::GgufFile;
use crate::kv::KvKind;
use crate::sampling::SamplingParams;
use freekv_recall::cuda::RecallLists;

/// Where a [`CudaLlama`]'s weights came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// Dequantized from a GGUF file.
    Gguf(PathBuf),
    /// Seeded random weights of a known shape (see [`super::SYNTHETIC_MODELS`]).
    Synthetic {
        /// Shape name, e.g. `llama-3.1-8b`.
        name: String,
        /// Seed of the weights.
        seed: u64,
    },
}

impl ModelSource {
    /// True for synthetic (random) weights: every output must say so.
    pub fn is_synthetic(&self) -> bool {
        matches!(self, ModelSource::Synthetic { .. })
    }

    /// A one-line label: the file name, or `synthetic:NAME (random weights, seed S)`.
    pub fn label(&self) -> String {
        match self {
            ModelSource::Gguf(p) => p.display().to_string(),
            ModelSource::Synthetic { name, seed } => {
                format!("synthetic:{name} (random weights, seed {seed})")
            }
        }
    }
}

/// Sizes of a [`CudaBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Sequences decoded together (every decode step runs all of them).
    pub max_seqs: usize,
    /// Most tokens one sequence can hold (prompt + generated); KV pages for this many tokens are
    /// allocated per sequence up front.
    pub max_seq_len: usize,
    /// Tokens per KV page.
    pub page_size: usize,
    /// Prompt tokens per prefill chunk.
    pub prefill_chunk: usize,
    /// Replay the decode step as a CUDA graph once it has run eagerly once.
    pub use_graph: bool,
}

impl Default for BatchOptions {
    /// One sequence of up to 4096 tokens, pages of 32, prefill chunks of 256, graphs on.
    fn default() -> Self {
        Self {
            max_seqs: 1,
            max_seq_len: 4096,
            page_size: 32,
            prefill_chunk: 256,
            use_graph: true,
        }
    }
}

/// The device state of one sparse layer after a step (see [`CudaLlama::sparse_snapshot`]).
#[derive(Debug, Clone)]
pub struct SparseSnapshot {
    /// The geometry (`seqs`, `kv_heads`, `group`, `head_dim`, budget pages, `max_pages`).
    pub shape: freekv_kernels::FreeKvShape,
    /// The last step's `[bs][4]` info rows: pages, mode, filled slot, filled page.
    pub seq_info: Vec<i32>,
    /// The stored query (the last step's `q_t`), `[bs][Hq][d]` f32.
    pub q: Vec<f32>,
    /// Page summaries `[bs][Hkv][MP][2][d]` (upper, lower).
    pub summaries: Vec<f32>,
    /// The last selection with `q_t`, `[bs][Hkv][k]` ascending, padded with −1.
    pub selected: Vec<i32>,
    /// The middle slots' pages `[bs][Hkv][C]` (−1 empty; `C` = `shape.cache_pages()`, the
    /// spare slots after the first `k`).
    pub mid_page: Vec<i32>,
    /// The last correction flags `[bs][Hkv]`.
    pub flags: Vec<i32>,
    /// With spare slots: the attention's page skip mask `[bs · nb][Hkv]` (1 = skipped).
    pub page_mask: Option<Vec<i32>>,
}

/// How the last decode step ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    /// Kernel by kernel from the host.
    Eager,
    /// Captured into a CUDA graph now and launched.
    Captured,
    /// Replay of the graph captured earlier.
    Replayed,
}

/// A Llama-family decoder on one CUDA device.
pub struct CudaLlama {
    gpu: Arc<Gpu>,
    cfg: LlamaConfig,
    weights: Weights,
    blas: Blas,
    source: ModelSource,
}

impl std::fmt::Debug for CudaLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLlama")
            .field("source", &self.source)
            .field("config", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn drv(what: impl Into<String>) -> impl FnOnce(DriverError) -> ModelError {
    let what = what.into();
    move |source| ModelError::Kernel(KernelError::Driver { what, source })
}

/// Checks that the CUDA kernels support `cfg`.
fn check_config(cfg: &LlamaConfig) -> Result<(), ModelError> {
    let bad = |m: String| Err(ModelError::Config(format!("CUDA decoder: {m}")));
    if cfg.head_dim != 64 && cfg.head_dim != 128 {
        return bad(format!(
            "head dimension {} (supported: 64, 128)",
            cfg.head_dim
        ));
    }
    if cfg.rope_dim != cfg.head_dim {
        return bad(format!(
            "partial RoPE ({} of {} dimensions) is not supported",
            cfg.rope_dim, cfg.head_dim
        ));
    }
    let (h, qd, kvd, ff) = dims(cfg);
    if !(qd + 2 * kvd).is_multiple_of(8) || !h.is_multiple_of(8) || !ff.is_multiple_of(8) {
        return bad("hidden, head and FFN widths must be multiples of 8".into());
    }
    Ok(())
}

impl CudaLlama {
    /// Loads `gguf` onto `gpu`: every matrix dequantized on the host and uploaded once as bf16.
    pub fn from_gguf(gpu: Arc<Gpu>, gguf: &GgufFile) -> Result<Self, ModelError> {
        let cfg = LlamaConfig::from_gguf(gguf)?;
        check_config(&cfg)?;
        let weights = Weights::from_gguf(&gpu, gguf, &cfg)?;
        let blas = Blas::new(&gpu)?;
        Ok(Self {
            gpu,
            cfg,
            weights,
            blas,
            source: ModelSource::Gguf(gguf.path().to_path_buf()),
        })
    }

    /// Opens the GGUF file at `path` and loads it onto `gpu`.
    pub fn open(gpu: Arc<Gpu>, path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_gguf(gpu, &GgufFile::open(path)?)
    }

    /// A synthetic model (see [`super::SYNTHETIC_MODELS`], and [`SyntheticSpec`] for the
    /// `+persistent=S` option) with seeded random bf16 weights generated on the device.
    pub fn synthetic(gpu: Arc<Gpu>, name: &str, seed: u64) -> Result<Self, ModelError> {
        let spec = SyntheticSpec::parse(name)?;
        let cfg = synthetic_config(&spec.shape)?;
        check_config(&cfg)?;
        let weights = Weights::synthetic(&gpu, &cfg, seed, spec.persistent_value(cfg.hidden))?;
        Self::with_synthetic_weights(gpu, cfg, weights, name, seed)
    }

    /// A model of any supported shape `cfg` with seeded random weights (labelled synthetic).
    pub fn synthetic_with_config(
        gpu: Arc<Gpu>,
        cfg: LlamaConfig,
        name: &str,
        seed: u64,
    ) -> Result<Self, ModelError> {
        check_config(&cfg)?;
        let weights = Weights::synthetic(&gpu, &cfg, seed, None)?;
        Self::with_synthetic_weights(gpu, cfg, weights, name, seed)
    }

    fn with_synthetic_weights(
        gpu: Arc<Gpu>,
        cfg: LlamaConfig,
        weights: Weights,
        name: &str,
        seed: u64,
    ) -> Result<Self, ModelError> {
        let blas = Blas::new(&gpu)?;
        Ok(Self {
            gpu,
            cfg,
            weights,
            blas,
            source: ModelSource::Synthetic {
                name: name.to_string(),
                seed,
            },
        })
    }

    /// `synthetic:NAME` (seed `seed`) or a GGUF path.
    pub fn load(gpu: Arc<Gpu>, model: &str, seed: u64) -> Result<Self, ModelError> {
        match synthetic_name(model) {
            Some(name) => Self::synthetic(gpu, name, seed),
            None => Self::open(gpu, model),
        }
    }

    /// Hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Where the weights came from.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Device bytes taken by the weights.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// Allocates a batch: KV pages for `opts.max_seqs × opts.max_seq_len` tokens in every layer
    /// and the activations of one step.
    pub fn new_batch(&self, opts: BatchOptions) -> Result<CudaBatch, ModelError> {
        CudaBatch::new(self, opts, None)
    }

    /// Allocates a batch whose KV follows `kv`: `full` as [`new_batch`](Self::new_batch);
    /// `oracle` (`quest`), `arkvale` and `freekv` keep only the budget of every sparse layer on
    /// the device and the full history in pinned host memory (see the
    /// [`sparse`](super::sparse) module docs). A sparse batch prefills each sequence once, from
    /// empty.
    pub fn new_batch_with_kv(
        &self,
        opts: BatchOptions,
        kv: GpuKvOptions,
    ) -> Result<CudaBatch, ModelError> {
        if kv.kv.kind == KvKind::Full {
            return CudaBatch::new(self, opts, None);
        }
        if kv.kv.page_size != opts.page_size {
            return Err(ModelError::Config(format!(
                "the KV policy's page size {} differs from the batch's {}",
                kv.kv.page_size, opts.page_size
            )));
        }
        let sms = self.gpu.info().sm_count as usize;
        if kv.reserve_sms >= sms.max(1) {
            return Err(ModelError::Config(format!(
                "reserve_sms {} leaves none of the device's {sms} SMs to the products",
                kv.reserve_sms
            )));
        }
        CudaBatch::new(self, opts, Some(kv))
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        if let Some((i, &t)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= self.cfg.vocab_size)
        {
            return Err(ModelError::Prompt(format!(
                "token id {t} at index {i} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        Ok(())
    }

    fn check_batch(&self, b: &CudaBatch) -> Result<(), ModelError> {
        if b.model_key != model_key(&self.cfg) {
            return Err(ModelError::Config(
                "this CUDA batch was allocated for a model of another shape".into(),
            ));
        }
        Ok(())
    }

    /// Runs `tokens` through the model as the continuation of sequence `seq` (after the tokens it
    /// already holds), in chunks of `prefill_chunk`, with causal paged attention; leaves the
    /// logits of the last token in row `seq` of the batch's logits.
    pub fn prefill(&self, b: &mut CudaBatch, seq: usize, tokens: &[u32]) -> Result<(), ModelError> {
        let _span = tracing::debug_span!("cuda_prefill", seq, tokens = tokens.len()).entered();
        self.check_batch(b)?;
        if seq >= b.opts.max_seqs {
            return Err(ModelError::Config(format!(
                "sequence {seq} outside a batch of {}",
                b.opts.max_seqs
            )));
        }
        if tokens.is_empty() {
            return Err(ModelError::Prompt("the prompt is empty".into()));
        }
        self.check_tokens(tokens)?;
        let start = b.lens[seq];
        if start + tokens.len() > b.opts.max_seq_len {
            return Err(ModelError::Prompt(format!(
                "{} tokens after {start} cached ones exceed the batch's {} tokens per sequence",
                tokens.len(),
                b.opts.max_seq_len
            )));
        }
        if let Some(st) = b.sparse.as_mut() {
            if start != 0 {
                return Err(ModelError::Prompt(format!(
                    "sequence {seq} already holds {start} tokens: a batch with the {} KV policy \
                     prefills a sequence once, from empty (truncate it to 0 first)",
                    st.opts.policy_name()
                )));
            }
            if tokens.len() > st.prefill_pages * b.opts.page_size {
                return Err(ModelError::Prompt(format!(
                    "the prompt has {} tokens but the batch was sized for prompts of at most {} \
                     (raise max_prompt)",
                    tokens.len(),
                    st.prefill_pages * b.opts.page_size
                )));
            }
            // Nothing may still be reading this sequence's slots or tables.
            st.join_recalls(self.gpu.stream())?;
        }
        self.upload_prefill_meta(b, start, tokens)?;
        if b.sparse.is_some() {
            return self.prefill_layer_major(b, seq, tokens.len());
        }
        let c = b.chunk;
        let n_layers = self.weights.layers.len();
        let n_chunks = tokens.len().div_ceil(c);
        for (j, toks) in tokens.chunks(c).enumerate() {
            let n = toks.len();
            let phase = Phase::Prefill {
                seq,
                n,
                tok0: j * c,
                chunk: j,
                logits: j + 1 == n_chunks,
            };
            self.forward(b, phase, 0..n_layers)?;
            b.lens[seq] += n;
        }
        Ok(())
    }

    /// Uploads the metadata of a whole prompt that continues a sequence of `start` tokens (see
    /// [`CudaBatch::pmeta`]), growing the buffer when the prompt is longer than any before.
    fn upload_prefill_meta(
        &self,
        b: &mut CudaBatch,
        start: usize,
        tokens: &[u32],
    ) -> Result<(), ModelError> {
        let c = b.chunk;
        let n = tokens.len();
        let s = self.gpu.stream();
        if n > b.pmeta_cap {
            let cap = n.div_ceil(c) * c;
            b.pmeta = s
                .alloc_zeros::<i32>(pmeta_len(cap, c))
                .map_err(drv("allocating prefill metadata"))?;
            b.pmeta_cap = cap;
        }
        let cap = b.pmeta_cap;
        let mut meta = vec![0i32; 2 * cap + 3 * n.div_ceil(c)];
        for (i, &t) in tokens.iter().enumerate() {
            meta[i] = t as i32;
            meta[cap + i] = (start + i) as i32;
        }
        for j in 0..n.div_ceil(c) {
            let m = c.min(n - j * c);
            let at = 2 * cap + 3 * j;
            meta[at + 1] = m as i32;
            meta[at + 2] = (start + j * c + m) as i32;
        }
        let mut dst = b.pmeta.slice_mut(0..meta.len());
        s.memcpy_htod(&meta, &mut dst)
            .map_err(drv("uploading prefill metadata"))?;
        Ok(())
    }

    /// The prefill of a sparse batch, layer by layer: every chunk of the prompt goes through
    /// layer l before any goes through layer l + 1 (the residual stream of the whole prompt is
    /// kept in two `[n][hidden]` buffers between layers). A sparse layer's prompt KV is written
    /// into one of two shared scratch pools; once the layer is done, its full pages are
    /// offloaded to the host pool (NHD → HND, with summaries) and its sinks and window copied
    /// into the slots on the recall stream, overlapping the next layer, whose scratch is the
    /// other one. The device never holds more than two layers' prompt KV, whatever the number
    /// of layers; the result is the same as the chunk-by-chunk prefill (same kernels, same
    /// chunks, same order of operations within each layer).
    fn prefill_layer_major(
        &self,
        b: &mut CudaBatch,
        seq: usize,
        n_tok: usize,
    ) -> Result<(), ModelError> {
        let _span = tracing::debug_span!("cuda_prefill_layer_major", seq, tokens = n_tok).entered();
        let s = self.gpu.stream();
        let lists = {
            let st = b
                .sparse
                .as_mut()
                .ok_or_else(|| ModelError::Config("not a sparse batch".into()))?;
            SparsePrefillLists::new(st, s, seq, n_tok, None)?
        };
        let result = self.prefill_layers(b, seq, n_tok, &lists);
        // Whatever happened, the lists (and the scratch pools) may be released only after the
        // offloads that read them on the recall stream: the compute stream waits for them.
        let st = b
            .sparse
            .as_mut()
            .ok_or_else(|| ModelError::Config("not a sparse batch".into()))?;
        for e in &st.scratch_free {
            s.wait(e).map_err(drv("waiting for the prefill offloads"))?;
        }
        result?;
        st.restart(seq);
        b.lens[seq] += n_tok;
        drop(lists);
        Ok(())
    }

    /// The layer loop of [`CudaLlama::prefill_layer_major`].
    fn prefill_layers(
        &self,
        b: &mut CudaBatch,
        seq: usize,
        n_tok: usize,
        lists: &SparsePrefillLists,
    ) -> Result<(), ModelError> {
        let s = self.gpu.stream();
        let k = self.gpu.kernels();
        let c = b.chunk;
        let h = self.cfg.hidden;
        let n_layers = self.weights.layers.len();
        let n_chunks = n_tok.div_ceil(c);
        let oom = |what: &str| {
            let what = format!(
                "allocating the prefill's residual stream ({what}: {n_tok} tokens × {h}; \
                 lower the prompt length)"
            );
            move |e: DriverError| ModelError::Kernel(KernelError::Driver { what, source: e })
        };
        let carry = n_layers > 1;
        let (mut px, mut po) = if carry {
            (
                Some(s.alloc_zeros::<bf16>(n_tok * h).map_err(oom("x"))?),
                Some(s.alloc_zeros::<bf16>(n_tok * h).map_err(oom("o"))?),
            )
        } else {
            (None, None)
        };
        for l in 0..n_layers {
            let si = b
                .sparse
                .as_ref()
                .and_then(|st| st.layer_of.get(l).copied().flatten());
            if let (Some(si), Some(st)) = (si, b.sparse.as_ref()) {
                // The scratch this layer writes was last read by the offload of layer si − 2.
                s.wait(st.scratch_free_of(si)?)
                    .map_err(drv("waiting for a prefill offload"))?;
            }
            for j in 0..n_chunks {
                let r0 = j * c;
                let n = c.min(n_tok - r0);
                if let (true, Some(px), Some(po)) = (l > 0, px.as_ref(), po.as_ref()) {
                    let mut x = b.x.slice_mut(0..n * h);
                    s.memcpy_dtod(&px.slice(r0 * h..(r0 + n) * h), &mut x)
                        .map_err(drv("restoring the residual stream"))?;
                    let mut o = b.o.slice_mut(0..n * h);
                    s.memcpy_dtod(&po.slice(r0 * h..(r0 + n) * h), &mut o)
                        .map_err(drv("restoring the residual stream"))?;
                }
                let phase = Phase::Prefill {
                    seq,
                    n,
                    tok0: r0,
                    chunk: j,
                    logits: l + 1 == n_layers && j + 1 == n_chunks,
                };
                self.forward(b, phase, l..l + 1)?;
                if let (true, Some(px), Some(po)) = (l + 1 < n_layers, px.as_mut(), po.as_mut()) {
                    let mut dst = px.slice_mut(r0 * h..(r0 + n) * h);
                    s.memcpy_dtod(&b.x.slice(0..n * h), &mut dst)
                        .map_err(drv("saving the residual stream"))?;
                    let mut dst = po.slice_mut(r0 * h..(r0 + n) * h);
                    s.memcpy_dtod(&b.o.slice(0..n * h), &mut dst)
                        .map_err(drv("saving the residual stream"))?;
                }
            }
            if let (Some(si), Some(st)) = (si, b.sparse.as_mut()) {
                let r = st.recall_stream.clone();
                st.prefill_ready
                    .record(s)
                    .map_err(drv("recording a prefilled layer"))?;
                r.wait(&st.prefill_ready)
                    .map_err(drv("ordering a prefill offload"))?;
                Self::offload_sparse_layer(k, &r, st, si, si % 2, lists, &b.geom)?;
                st.scratch_free_of(si)?
                    .record(&r)
                    .map_err(drv("recording a prefill offload"))?;
            }
        }
        // px and po are freed in stream order after the kernels that read them.
        drop((px, po));
        Ok(())
    }

    /// Offloads the prompt of sparse layer `si` (written in prefill scratch `scratch`) on
    /// `stream`: every full page to the host pool with its summary, and the sinks and the
    /// recent window (or every page, below the budget) into the sequence's slots.
    fn offload_sparse_layer(
        k: &freekv_kernels::Kernels,
        stream: &Arc<freekv_kernels::cudarc::driver::CudaStream>,
        st: &mut SparseState,
        si: usize,
        scratch: usize,
        lists: &SparsePrefillLists,
        geom: &PageGeometry,
    ) -> Result<(), ModelError> {
        let kind = st.opts.kv.summary;
        let src = st
            .prefill_kv
            .get(scratch)
            .ok_or_else(|| ModelError::Config(format!("no prefill scratch {scratch}")))?;
        let layer = st
            .layers
            .get_mut(si)
            .ok_or_else(|| ModelError::Config(format!("no sparse state for layer {si}")))?;
        st.pool.offload(
            k,
            stream,
            si,
            &st.shape,
            src,
            &lists.entries,
            lists.full,
            &mut layer.summaries,
            kind,
        )?;
        k.copy_pages(
            stream,
            src,
            &mut layer.slots,
            &lists.pairs,
            lists.n_pairs,
            geom.page_elems(),
        )?;
        Ok(())
    }

    /// One decode step of every sequence of the batch: `tokens[i]` is fed to sequence `i` at its
    /// next position; the logits land in the batch's logits (row `i` for sequence `i`). The
    /// first step runs eagerly; with [`BatchOptions::use_graph`], the second is captured into a
    /// CUDA graph and later ones replay it (kernel arguments live in fixed device buffers).
    pub fn decode_step(&self, b: &mut CudaBatch, tokens: &[u32]) -> Result<StepMode, ModelError> {
        let _span = tracing::debug_span!("cuda_decode_step", batch = tokens.len()).entered();
        self.check_batch(b)?;
        let bs = b.opts.max_seqs;
        if tokens.len() != bs {
            return Err(ModelError::Config(format!(
                "a decode step of this batch takes {bs} tokens, got {}",
                tokens.len()
            )));
        }
        self.check_tokens(tokens)?;
        if let Some(i) = b.lens.iter().position(|&l| l >= b.opts.max_seq_len) {
            return Err(ModelError::Prompt(format!(
                "sequence {i} is full ({} tokens)",
                b.opts.max_seq_len
            )));
        }
        let mut meta = vec![0i32; 3 * bs];
        for i in 0..bs {
            meta[i] = tokens[i] as i32;
            meta[bs + i] = b.lens[i] as i32;
            meta[2 * bs + i] = (b.lens[i] + 1) as i32;
        }
        let s = self.gpu.stream();
        s.memcpy_htod(&meta, &mut b.dmeta)
            .map_err(drv("uploading decode metadata"))?;
        let graph_ok = b
            .sparse
            .as_ref()
            .is_none_or(|st| st.opts.graph_capturable());
        if let Some(st) = b.sparse.as_mut() {
            let p = b.opts.page_size;
            for (i, &len) in b.lens.iter().enumerate() {
                if len % p == 0 {
                    st.pool.ensure_pages(s, i, len / p + 1)?;
                }
            }
            st.clear_stale_masks(s)?;
            let active = vec![true; bs];
            let plan = plan_step(
                &st.budget,
                st.shape.spare_pages,
                &b.lens,
                &active,
                &mut st.started,
            )?;
            // Captured steps join their recalls at the end, so one buffer suffices; eager
            // freekv steps leave recalls running into the next step: alternate two buffers.
            st.cur = if b.opts.use_graph && graph_ok {
                0
            } else {
                st.parity ^= 1;
                st.parity
            };
            s.memcpy_htod(&plan.flatten(), &mut st.smeta[st.cur])
                .map_err(drv("uploading sparse step metadata"))?;
            s.memcpy_htod(&plan.fill, &mut st.fill[st.cur])
                .map_err(drv("uploading sparse step metadata"))?;
            st.last_plan = Some(plan);
        }
        // All-dense steps of a sparse batch launch no selection or recall: a graph of their own.
        let key = usize::from(b.sparse.as_ref().is_some_and(SparseState::all_dense));
        // freekv with reserved SMs: the products of an eager or captured step are sized for the
        // other SMs (a replayed graph keeps the sizes it was captured with).
        let reserve = b
            .sparse
            .as_ref()
            .filter(|st| st.opts.kv.kind == KvKind::FreeKv)
            .map_or(0, |st| st.opts.reserve_sms);
        let sized = reserve > 0 && b.graphs[key].is_none();
        if sized {
            // new_batch_with_kv checked that the reserve leaves SMs to the products.
            let sms = self.gpu.info().sm_count as usize;
            self.blas
                .set_sm_target(sms.saturating_sub(reserve).max(1))?;
        }
        let mode = self.run_decode(b, graph_ok, key);
        if sized {
            self.blas.set_sm_target(0)?;
        }
        let mode = mode?;
        for l in &mut b.lens {
            *l += 1;
        }
        if let Some(st) = b.sparse.as_mut() {
            st.account_step(s)?;
        }
        Ok(mode)
    }

    /// The forward pass of one decode step: graph `key` (1: the all-dense steps of a sparse
    /// batch, 0: the others) replayed, captured now (when `graph_ok`: the batch's KV policy is
    /// capturable), or eager.
    fn run_decode(
        &self,
        b: &mut CudaBatch,
        graph_ok: bool,
        key: usize,
    ) -> Result<StepMode, ModelError> {
        let mode = if let Some(g) = &b.graphs[key] {
            g.launch().map_err(drv("launching the decode graph"))?;
            StepMode::Replayed
        } else if b.opts.use_graph && graph_ok && b.graph_error.is_none() && b.eager_steps > 0 {
            match self.capture(b) {
                Ok(g) => {
                    g.launch().map_err(drv("launching the decode graph"))?;
                    b.graphs[key] = Some(g);
                    StepMode::Captured
                }
                Err(e) => {
                    tracing::warn!("CUDA graph capture failed, decoding eagerly: {e}");
                    b.graph_error = Some(e.to_string());
                    self.forward(b, Phase::Decode, 0..self.weights.layers.len())?;
                    StepMode::Eager
                }
            }
        } else {
            self.forward(b, Phase::Decode, 0..self.weights.layers.len())?;
            b.eager_steps += 1;
            StepMode::Eager
        };
        Ok(mode)
    }

    fn capture(&self, b: &mut CudaBatch) -> Result<CudaGraph, ModelError> {
        let s = self.gpu.stream();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv("beginning the graph capture"))?;
        let r = self.forward(b, Phase::Decode, 0..self.weights.layers.len());
        let g = s.end_capture(self.gpu.graph_flags());
        r?;
        g.map_err(drv("ending the graph capture"))?
            .ok_or_else(|| ModelError::Config("graph capture recorded nothing".into()))
    }

    /// Picks the most likely token of every row of the batch's logits on the device; only the
    /// ids come back.
    pub fn argmax(&self, b: &mut CudaBatch) -> Result<Vec<u32>, ModelError> {
        let s = self.gpu.stream();
        let rows = b.opts.max_seqs;
        self.gpu
            .kernels()
            .argmax(s, &b.logits, rows, self.cfg.vocab_size, &mut b.out_ids)?;
        self.read_ids(b)
    }

    /// Samples one token per row on the device with `params` (temperature, top-k, top-p) and one
    /// uniform number in `[0, 1)` per row; only the ids come back. Greedy parameters take the
    /// argmax.
    pub fn sample(
        &self,
        b: &mut CudaBatch,
        params: &SamplingParams,
        uniforms: &[f32],
    ) -> Result<Vec<u32>, ModelError> {
        params.validate()?;
        let rows = b.opts.max_seqs;
        if uniforms.len() != rows {
            return Err(ModelError::Config(format!(
                "{} uniform numbers for {rows} rows",
                uniforms.len()
            )));
        }
        if params.is_greedy() {
            return self.argmax(b);
        }
        let s = self.gpu.stream();
        let top_k = i32::try_from(params.top_k).unwrap_or(i32::MAX);
        let mut host = Vec::with_capacity(4 * rows);
        host.extend(std::iter::repeat_n(
            params.temperature.to_bits() as i32,
            rows,
        ));
        host.extend(std::iter::repeat_n(top_k, rows));
        host.extend(std::iter::repeat_n(params.top_p.to_bits() as i32, rows));
        host.extend(
            uniforms
                .iter()
                .map(|u| u.clamp(0.0, 0.999_999_9).to_bits() as i32),
        );
        s.memcpy_htod(&host, &mut b.samp)
            .map_err(drv("uploading sampling inputs"))?;
        let temperature = f32_view(b.samp.slice(0..rows), rows)?;
        let top_k_v = b.samp.slice(rows..2 * rows);
        let top_p = f32_view(b.samp.slice(2 * rows..3 * rows), rows)?;
        let uniform = f32_view(b.samp.slice(3 * rows..4 * rows), rows)?;
        let inputs = SamplingInputs {
            temperature: &temperature,
            top_k: &top_k_v,
            top_p: &top_p,
            uniform: &uniform,
        };
        self.gpu.kernels().sample(
            s,
            &b.logits,
            rows,
            self.cfg.vocab_size,
            &inputs,
            &mut b.out_ids,
        )?;
        self.read_ids(b)
    }

    fn read_ids(&self, b: &mut CudaBatch) -> Result<Vec<u32>, ModelError> {
        let s = self.gpu.stream();
        let mut ids = vec![0i32; b.opts.max_seqs];
        s.memcpy_dtoh(&b.out_ids, &mut ids)
            .map_err(drv("reading token ids"))?;
        s.synchronize().map_err(drv("stream synchronize"))?;
        ids.into_iter()
            .map(|i| {
                u32::try_from(i).map_err(|_| {
                    ModelError::Config(format!("the device picked an invalid token id {i}"))
                })
            })
            .collect()
    }

    /// The batch's logits (`max_seqs × vocab`, f32) copied to the host (for tests and tools).
    pub fn logits(&self, b: &CudaBatch) -> Result<Vec<f32>, ModelError> {
        let s = self.gpu.stream();
        let mut out = vec![0f32; b.logits.len()];
        s.memcpy_dtoh(&b.logits, &mut out)
            .map_err(drv("reading logits"))?;
        s.synchronize().map_err(drv("stream synchronize"))?;
        Ok(out)
    }

    /// Sets the lengths of the sequences to `lens` and fills their KV pages with seeded random
    /// values instead of running a prefill: a decode step reads the same bytes whatever their
    /// values, so this sets up long contexts for timing in milliseconds instead of minutes.
    /// The sequences' contents are meaningless afterwards.
    pub fn fill_random_context(
        &self,
        b: &mut CudaBatch,
        lens: &[usize],
        seed: u64,
    ) -> Result<(), ModelError> {
        self.check_batch(b)?;
        if lens.len() != b.opts.max_seqs || lens.iter().any(|&l| l > b.opts.max_seq_len) {
            return Err(ModelError::Config(format!(
                "fill_random_context: {} lengths (at most {}) for {} sequences",
                lens.len(),
                b.opts.max_seq_len,
                b.opts.max_seqs
            )));
        }
        let init = InitKernels::load(&self.gpu)?;
        let s = self.gpu.stream();
        if let Some(st) = b.sparse.as_mut() {
            st.join_recalls(s)?;
        }
        for (l, pages) in b.kv.iter_mut().enumerate() {
            if let Some(pages) = pages {
                init.uniform_bf16(s, pages, seed.wrapping_add(l as u64), 1.0, 0.0)?;
            }
        }
        b.lens.copy_from_slice(lens);
        if let Some(st) = b.sparse.as_mut() {
            // The history of every sequence: random pages of a prefill scratch offloaded (with
            // their summaries) as the host pages, sinks and window copied into the slots.
            for (i, layer) in st.layers.iter_mut().enumerate() {
                init.uniform_bf16(
                    s,
                    &mut layer.slots,
                    seed.wrapping_add(1000 + i as u64),
                    1.0,
                    0.0,
                )?;
            }
            let scratch = st.prefill_pages.max(1);
            let mut lists = Vec::with_capacity(lens.len());
            for (seq, &n) in lens.iter().enumerate() {
                lists.push(SparsePrefillLists::new(
                    st,
                    s,
                    seq,
                    n,
                    Some(&|p| p % scratch),
                )?);
            }
            let k = self.gpu.kernels();
            let layer_of = st.layer_of.clone();
            for (l, si) in layer_of.iter().enumerate() {
                let Some(si) = *si else { continue };
                let src = st
                    .prefill_kv
                    .get_mut(si % 2)
                    .ok_or_else(|| ModelError::Config("no prefill scratch".into()))?;
                init.uniform_bf16(s, src, seed.wrapping_add(l as u64), 1.0, 0.0)?;
                for li in &lists {
                    Self::offload_sparse_layer(k, s, st, si, si % 2, li, &b.geom)?;
                }
            }
            for seq in 0..st.started.len() {
                st.restart(seq);
            }
        }
        self.gpu.synchronize()?;
        Ok(())
    }

    /// The device state of model layer `layer` of a sparse batch, read back after the last
    /// step (every pending recall joined first): for tests that check the GPU selection against
    /// the CPU reference. `None` for dense layers and `full` batches.
    pub fn sparse_snapshot(
        &self,
        b: &mut CudaBatch,
        layer: usize,
    ) -> Result<Option<SparseSnapshot>, ModelError> {
        let Some(st) = b.sparse.as_mut() else {
            return Ok(None);
        };
        let Some(si) = st.layer_of.get(layer).copied().flatten() else {
            return Ok(None);
        };
        let s = self.gpu.stream();
        st.join_recalls(s)?;
        let l = st
            .layers
            .get(si)
            .ok_or_else(|| ModelError::Config(format!("no sparse layer {si}")))?;
        let read_i = |v: &CudaSlice<i32>| -> Result<Vec<i32>, ModelError> {
            let mut h = vec![0i32; v.len()];
            s.memcpy_dtoh(v, &mut h)
                .map_err(drv("reading sparse state"))?;
            Ok(h)
        };
        let read_f = |v: &CudaSlice<f32>| -> Result<Vec<f32>, ModelError> {
            let mut h = vec![0f32; v.len()];
            s.memcpy_dtoh(v, &mut h)
                .map_err(drv("reading sparse state"))?;
            Ok(h)
        };
        let snap = SparseSnapshot {
            seq_info: st
                .last_plan_info
                .clone()
                .unwrap_or_else(|| vec![0; st.shape.seqs * super::sparse_plan::SEQ_INFO_WIDTH]),
            q: read_f(&l.q_prev)?,
            summaries: read_f(&l.summaries)?,
            selected: read_i(&l.selected)?,
            mid_page: read_i(&l.mid_page)?,
            flags: read_i(&l.flags)?,
            page_mask: l.page_mask.as_ref().map(read_i).transpose()?,
            shape: st.shape,
        };
        s.synchronize().map_err(drv("stream synchronize"))?;
        Ok(Some(snap))
    }

    /// What the recalls of a sparse batch moved so far: (units, bytes) — `None` for `full`.
    /// Joins every pending recall and synchronises.
    pub fn kv_recall_totals(&self, b: &mut CudaBatch) -> Result<Option<(u64, u64)>, ModelError> {
        let Some(st) = b.sparse.as_mut() else {
            return Ok(None);
        };
        let c = st.recall_counters(self.gpu.stream())?;
        Ok(Some((c.units, c.bytes)))
    }

    /// What the corrective recalls alone moved so far (the flagged heads' pages recalled on the
    /// critical path; a part of [`CudaLlama::kv_recall_totals`]): (units, bytes) — `None` for
    /// `full`. Joins every pending recall and synchronises.
    pub fn kv_corrective_totals(
        &self,
        b: &mut CudaBatch,
    ) -> Result<Option<(u64, u64)>, ModelError> {
        let Some(st) = b.sparse.as_mut() else {
            return Ok(None);
        };
        let c = st.corrective_counters(self.gpu.stream())?;
        Ok(Some((c.units, c.bytes)))
    }

    /// Diagnostics for speed work: the mean time in milliseconds of the matrix products of one
    /// decode step of `b` alone (every layer's four products and the output head, the same
    /// shapes as [`CudaLlama::decode_step`]), over `reps` repetitions timed with CUDA events.
    /// The activations are overwritten; the KV and the lengths are untouched.
    pub fn matmul_time_ms(&self, b: &mut CudaBatch, reps: usize) -> Result<f64, ModelError> {
        use freekv_kernels::cudarc::driver::sys::CUevent_flags;
        self.check_batch(b)?;
        let s = self.gpu.stream();
        let (h, qd, kvd, ff) = dims(&self.cfg);
        let t = b.opts.max_seqs;
        let run = |b: &mut CudaBatch| -> Result<(), ModelError> {
            for lw in &self.weights.layers {
                self.blas
                    .linear(&b.xn, &lw.wqkv, &mut b.qkv, t, h, qd + 2 * kvd)?;
                self.blas.linear(&b.att, &lw.wo, &mut b.o, t, qd, h)?;
                self.blas
                    .linear(&b.xn, &lw.w_gate_up, &mut b.gu, t, h, 2 * ff)?;
                self.blas.linear(&b.act, &lw.w_down, &mut b.o, t, ff, h)?;
            }
            let v = self.cfg.vocab_size;
            self.blas
                .linear(&b.xn, self.weights.head(), &mut b.logits, t, h, v)
        };
        run(b)?;
        let ev = |what: &str| {
            s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv(what.to_string()))
        };
        let t0 = ev("timing event")?;
        for _ in 0..reps.max(1) {
            run(b)?;
        }
        let t1 = ev("timing event")?;
        t1.synchronize().map_err(drv("event synchronize"))?;
        let ms = t0.elapsed_ms(&t1).map_err(drv("event elapsed time"))? as f64;
        Ok(ms / reps.max(1) as f64)
    }

    /// One decode step of sparse layer `si` after QKV and RoPE: append, offload of a filled
    /// page, the policy's selection and recall, attention into `att` (see the
    /// [`sparse`](super::sparse) module docs for the order and the events).
    #[allow(clippy::too_many_arguments)]
    fn sparse_decode_layer(
        &self,
        st: &mut SparseState,
        si: usize,
        geom: &PageGeometry,
        qkv: &CudaSlice<bf16>,
        src: &KvSource,
        token_seq: &CudaView<'_, i32>,
        qkv_w: usize,
        att: &mut CudaSlice<bf16>,
        workspace: &mut CudaSlice<f32>,
    ) -> Result<(), ModelError> {
        let _span = tracing::debug_span!("sparse_layer", layer = si).entered();
        let k = self.gpu.kernels();
        let s = self.gpu.stream();
        let bs = st.shape.seqs;
        let nb = st.shape.slots();
        let top_k = st.shape.top_k;
        let spec_want = if st.opts.spare_prefetch {
            st.shape.cache_pages()
        } else {
            top_k
        };
        let kind = st.opts.kv.kind;
        let summary = st.opts.kv.summary;
        let eager_overlap = !(st.opts.graph_capturable() && st.use_graph);
        // A step where every sequence is dense has nothing to select or recall (see
        // `SparseState::all_dense`): only the append, the offload, the correction kernel (zero
        // flags) and the attention run.
        let dense = st.all_dense();
        let o = st.meta_offsets();
        let meta = &st.smeta[st.cur];
        let spos = meta.slice(o[0]..o[1]);
        let att_len = meta.slice(o[1]..o[2]);
        let seq_info = meta.slice(o[2]..o[3]);
        let spec_info = meta.slice(o[3]..o[4]);
        let att_table = meta.slice(o[5]..o[6]);
        let fill = &st.fill[st.cur];
        let layer = st
            .layers
            .get_mut(si)
            .ok_or_else(|| ModelError::Config(format!("no sparse layer {si}")))?;
        // 1. The new token into its slot (slot-space positions), a filled page to the host.
        k.kv_append(
            s,
            &mut layer.slots,
            geom,
            qkv,
            qkv,
            src,
            &st.slot_table,
            &PageTableLayout {
                num_seqs: bs,
                stride: nb,
            },
            token_seq,
            &spos,
        )?;
        st.pool.offload(
            k,
            s,
            si,
            &st.shape,
            &layer.slots,
            fill,
            bs,
            &mut layer.summaries,
            summary,
        )?;
        // 2. The speculative recall issued after this layer's previous attention.
        if kind == KvKind::FreeKv {
            if let (Some(streamed), Some(slot)) = (&st.streamed, st.tickets.get_mut(si)) {
                if let Some(t) = slot.take() {
                    streamed.wait(t, s)?;
                }
            } else if eager_overlap {
                let ev = st
                    .recall_done
                    .get(si)
                    .ok_or_else(|| ModelError::Config(format!("no recall event for layer {si}")))?;
                s.wait(ev)
                    .map_err(drv("waiting for the speculative recall"))?;
            }
        }
        // 3. Correction flags (all heads for oracle / arkvale and at a first sparse step), the
        //    stored query ← q_t, selection of the flagged heads with q_t and their recall.
        let trigger = match kind {
            KvKind::FreeKv if !st.opts.kv.correction.is_always() => {
                Some(st.opts.kv.correction.tau())
            }
            _ => None,
        };
        k.freekv_correction(
            s,
            &st.shape,
            qkv,
            SparseState::q_rows(qkv_w),
            &mut layer.q_prev,
            &seq_info,
            trigger,
            st.opts.kv.correction.aggregate(),
            &mut layer.flags,
            None,
        )?;
        // With the gather recall, the corrective path runs on its own stream while the
        // unflagged heads attend (their slots are not written by it), and the flagged heads
        // attend once their pages are in.
        let overlap = kind == KvKind::FreeKv
            && !dense
            && trigger.is_some()
            && st.opts.overlap_correction
            && st.per_page.is_none()
            && st.streamed.is_none();
        let cs = if overlap {
            st.flags_ready
                .record(s)
                .map_err(drv("recording the correction flags"))?;
            st.correction_stream
                .wait(&st.flags_ready)
                .map_err(drv("ordering the corrective path"))?;
            &st.correction_stream
        } else {
            s
        };
        if !dense {
            layer.select(
                k,
                cs,
                &st.shape,
                &st.opts.kv,
                &seq_info,
                HeadFilter::Flagged,
                &mut st.scratch[0],
                top_k,
            )?;
            let lists = RecallLists {
                count: &layer.recall_count,
                list: &layer.recall_list,
                flags: &layer.flags,
                filter: HeadFilter::Flagged,
            };
            match (&st.per_page, &st.streamed) {
                (Some(pp), _) => {
                    pp.recall(s, &st.pool, si, &lists, &mut layer.slots)?;
                }
                (None, Some(streamed)) => {
                    streamed.recall_blocking(s, &st.pool, si, &lists, &mut layer.slots)?;
                }
                (None, None) => {
                    st.corr_gather.recall(
                        k,
                        cs,
                        &st.shape,
                        &st.pool,
                        si,
                        &lists,
                        &mut layer.slots,
                    )?;
                }
            }
        }
        // 4. Attention over the resident slots, the current page last (unflagged heads first
        //    when the corrective path overlaps).
        let attend = |filter: Option<HeadFilter>,
                      att: &mut CudaSlice<bf16>,
                      workspace: &mut CudaSlice<f32>|
         -> Result<(), ModelError> {
            k.decode_attention_heads(
                s,
                &st.plan,
                qkv,
                &layer.slots,
                &att_table,
                &att_len,
                att,
                workspace,
                match (filter, &layer.page_mask) {
                    (None, None) => None,
                    (f, m) => Some(HeadMask {
                        flags: &layer.flags,
                        filter: f.unwrap_or(HeadFilter::All),
                        pages: m.as_ref().map(|m| m as &dyn DevicePtr<i32>),
                    }),
                },
            )?;
            Ok(())
        };
        if overlap {
            attend(Some(HeadFilter::Unflagged), att, workspace)?;
            st.correction_done
                .record(&st.correction_stream)
                .map_err(drv("recording the corrective recall"))?;
            s.wait(&st.correction_done)
                .map_err(drv("waiting for the corrective recall"))?;
            attend(Some(HeadFilter::Flagged), att, workspace)?;
        } else {
            attend(None, att, workspace)?;
        }
        // 5. freekv: the speculative selection with q_t and its recall, off the critical path,
        //    ordered after this attention by an event (none in an all-dense step, where the
        //    selection would only write zero recall counts and the recall copy nothing). By
        //    default only the heads not flagged at this step select: a flagged head selected
        //    with q_t over the same summaries in 3., so its selection would be the same and
        //    recall nothing; a skipped row's recall count is written 0, and its flag is not
        //    rewritten before this branch is joined (the next step's correction of this layer
        //    waits for it, or the captured step joins it before it ends).
        if kind == KvKind::FreeKv && !dense {
            let (Some(attn_done), Some(recall_done)) =
                (st.attn_done.get(si), st.recall_done.get(si))
            else {
                return Err(ModelError::Config(format!("no events for layer {si}")));
            };
            let r = &st.recall_stream;
            attn_done
                .record(s)
                .map_err(drv("recording attention done"))?;
            r.wait(attn_done)
                .map_err(drv("ordering the speculative recall"))?;
            layer.select(
                k,
                r,
                &st.shape,
                &st.opts.kv,
                &spec_info,
                st.opts.speculative_heads(),
                &mut st.scratch[1],
                spec_want,
            )?;
            let lists = RecallLists {
                count: &layer.recall_count,
                list: &layer.recall_list,
                flags: &layer.flags,
                filter: HeadFilter::All,
            };
            match &st.streamed {
                Some(streamed) => {
                    let t = streamed.submit(r, &st.pool, si, &lists, &mut layer.slots)?;
                    if let Some(slot) = st.tickets.get_mut(si) {
                        *slot = Some(t);
                    }
                }
                None => {
                    st.gather
                        .recall(k, r, &st.shape, &st.pool, si, &lists, &mut layer.slots)?;
                }
            }
            recall_done
                .record(r)
                .map_err(drv("recording recall done"))?;
        }
        Ok(())
    }

    /// Runs `layers` of the model on the rows of `phase` (the embedding when the range starts
    /// at layer 0, the output head when it ends at the last layer and logits are wanted); the
    /// residual stream between layers is `b.x` plus the pending `b.o`.
    fn forward(
        &self,
        b: &mut CudaBatch,
        phase: Phase,
        layers: std::ops::Range<usize>,
    ) -> Result<(), ModelError> {
        let n_layers = self.weights.layers.len();
        if layers.end > n_layers
            || layers.start > layers.end
            || (matches!(phase, Phase::Decode) && layers != (0..n_layers))
            || (matches!(phase, Phase::Prefill { logits: true, .. }) && layers.end != n_layers)
        {
            return Err(ModelError::Config(format!(
                "forward over layers {layers:?} of {n_layers} in phase {phase:?}"
            )));
        }
        let k = self.gpu.kernels();
        let s = self.gpu.stream();
        let cfg = &self.cfg;
        let w = &self.weights;
        let (h, qd, kvd, ff) = dims(cfg);
        let qkv_w = qd + 2 * kvd;
        let bs = b.opts.max_seqs;
        let pps = b.pages_per_seq;
        let table_range = match phase {
            Phase::Decode => 0..bs * pps,
            Phase::Prefill { seq, .. } => seq * pps..(seq + 1) * pps,
        };
        let (t, ids, positions, seq_lens, token_seq, table_rows) = match phase {
            Phase::Decode => (
                bs,
                b.dmeta.slice(0..bs),
                b.dmeta.slice(bs..2 * bs),
                b.dmeta.slice(2 * bs..3 * bs),
                b.dseq.slice(0..bs),
                bs,
            ),
            Phase::Prefill { n, tok0, chunk, .. } => {
                let cap = b.pmeta_cap;
                let at = 2 * cap + 3 * chunk;
                (
                    n,
                    b.pmeta.slice(tok0..tok0 + n),
                    b.pmeta.slice(cap + tok0..cap + tok0 + n),
                    b.pmeta.slice(at + 2..at + 3),
                    b.pzeros.slice(0..n),
                    1,
                )
            }
        };
        // SAFETY: token ids are non-negative i32 (checked against the vocabulary on the host);
        // u32 has the size and alignment of i32.
        let ids_u = unsafe { ids.transmute::<u32>(t) }
            .ok_or_else(|| ModelError::Config("token id buffer too small".into()))?;
        let eps = cfg.rms_eps;
        let rope = RopeConfig {
            theta: cfg.rope_theta,
            style: RopeStyle::Normal,
            freq_factors: w.freq_factors.as_ref(),
        };
        let shape = AttentionShape {
            q_heads: cfg.n_heads,
            geom: b.geom,
            table_stride: pps,
            q_rows: Strided {
                offset: 0,
                stride: qkv_w,
            },
            scale: None,
        };
        let table_layout = PageTableLayout {
            num_seqs: table_rows,
            stride: pps,
        };
        if layers.start == 0 {
            k.embedding(s, &w.embd, cfg.vocab_size, h, &ids_u, &mut b.x)?;
        }
        // Decode steps of one or two tokens run the fused skinny kernels: RMSNorm inside the
        // products, the residual adds inside the output products, RoPE with the KV append,
        // SwiGLU inside the gate-up product (x is the only residual stream; no o / xn / gu).
        let fused = match (phase, self.blas.fused_kernels(t)) {
            (Phase::Decode, Some(g)) => Some(g),
            _ => None,
        };
        let dims = |i: usize, o: usize| LinearDims {
            tokens: t,
            in_features: i,
            out_features: o,
        };
        for l in layers.clone() {
            let lw = w
                .layers
                .get(l)
                .ok_or_else(|| ModelError::Config(format!("no weights for layer {l}")))?;
            let sparse_idx = b
                .sparse
                .as_ref()
                .and_then(|st| st.layer_of.get(l).copied().flatten());
            let src = KvSource {
                tokens: t,
                k: Strided {
                    offset: qd,
                    stride: qkv_w,
                },
                v: Strided {
                    offset: qd + kvd,
                    stride: qkv_w,
                },
            };
            // K heads follow the Q heads in each fused row: one launch rotates both.
            let layout = RopeLayout {
                tokens: t,
                heads: cfg.n_heads + cfg.n_kv_heads,
                head_dim: cfg.head_dim,
                rows: Strided {
                    offset: 0,
                    stride: qkv_w,
                },
            };
            match fused {
                Some(g) => g.rmsnorm_linear(
                    s,
                    &b.x,
                    &lw.attn_norm,
                    eps,
                    &lw.wqkv,
                    &mut b.qkv,
                    dims(h, qkv_w),
                )?,
                None => {
                    if l == 0 {
                        k.rmsnorm(s, &b.x, &lw.attn_norm, &mut b.xn, t, h, eps)?;
                    } else {
                        k.add_rmsnorm(s, &mut b.x, &b.o, &lw.attn_norm, &mut b.xn, t, h, eps)?;
                    }
                    self.blas.linear(&b.xn, &lw.wqkv, &mut b.qkv, t, h, qkv_w)?;
                }
            }
            if let (Phase::Decode, Some(si)) = (phase, sparse_idx) {
                k.rope(s, &mut b.qkv, &layout, &positions, &rope)?;
                let st = b
                    .sparse
                    .as_mut()
                    .ok_or_else(|| ModelError::Config("no sparse state".into()))?;
                self.sparse_decode_layer(
                    st,
                    si,
                    &b.geom,
                    &b.qkv,
                    &src,
                    &token_seq,
                    qkv_w,
                    &mut b.att,
                    &mut b.workspace,
                )?;
            } else {
                // A sparse layer's prefill runs over a one-sequence scratch pool (two shared by
                // every sparse layer, alternating; see `prefill_layer_major`).
                let (pages, table, table_layout, shape_l) = match (b.sparse.as_mut(), sparse_idx) {
                    (Some(st), Some(si)) => (
                        st.prefill_kv.get_mut(si % 2).ok_or_else(|| {
                            ModelError::Config(format!("no prefill scratch for layer {l}"))
                        })?,
                        st.prefill_table.slice(0..st.prefill_pages),
                        PageTableLayout {
                            num_seqs: 1,
                            stride: st.prefill_pages,
                        },
                        AttentionShape {
                            table_stride: st.prefill_pages,
                            ..shape
                        },
                    ),
                    _ => (
                        b.kv.get_mut(l).and_then(Option::as_mut).ok_or_else(|| {
                            ModelError::Config(format!("no KV pool for layer {l}"))
                        })?,
                        b.page_table.slice(table_range.clone()),
                        table_layout,
                        shape,
                    ),
                };
                match fused {
                    Some(g) => g.rope_kv_append(
                        s,
                        &mut b.qkv,
                        &QkvRows::fused(t, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim),
                        &positions,
                        &rope,
                        pages,
                        &b.geom,
                        &table,
                        &table_layout,
                        &token_seq,
                    )?,
                    None => {
                        k.rope(s, &mut b.qkv, &layout, &positions, &rope)?;
                        k.kv_append(
                            s,
                            pages,
                            &b.geom,
                            &b.qkv,
                            &b.qkv,
                            &src,
                            &table,
                            &table_layout,
                            &token_seq,
                            &positions,
                        )?;
                    }
                }
                match phase {
                    Phase::Decode => k.decode_attention(
                        s,
                        &b.plan,
                        &b.qkv,
                        pages,
                        &table,
                        &seq_lens,
                        &mut b.att,
                        &mut b.workspace,
                    )?,
                    Phase::Prefill { n, chunk, .. } => {
                        let plan = PrefillPlan {
                            shape: shape_l,
                            batch: 1,
                            total_q: n,
                            max_q: n,
                        };
                        let at = 2 * b.pmeta_cap + 3 * chunk;
                        let q_start = b.pmeta.slice(at..at + 2);
                        k.prefill_attention(
                            s, &plan, &b.qkv, &q_start, pages, &table, &seq_lens, &mut b.att,
                        )?
                    }
                }
            }
            match fused {
                Some(g) => {
                    g.linear(s, &b.att, &lw.wo, &mut b.x, dims(qd, h), true)?;
                    g.rmsnorm_swiglu(
                        s,
                        &b.x,
                        &lw.ffn_norm,
                        eps,
                        &lw.w_gate_up,
                        &mut b.act,
                        dims(h, ff),
                    )?;
                    g.linear(s, &b.act, &lw.w_down, &mut b.x, dims(ff, h), true)?;
                }
                None => {
                    self.blas.linear(&b.att, &lw.wo, &mut b.o, t, qd, h)?;
                    k.add_rmsnorm(s, &mut b.x, &b.o, &lw.ffn_norm, &mut b.xn, t, h, eps)?;
                    self.blas
                        .linear(&b.xn, &lw.w_gate_up, &mut b.gu, t, h, 2 * ff)?;
                    k.swiglu_fused(s, &b.gu, &mut b.act, t, ff)?;
                    self.blas.linear(&b.act, &lw.w_down, &mut b.o, t, ff, h)?;
                    if l + 1 == n_layers {
                        k.add_rmsnorm(s, &mut b.x, &b.o, &w.output_norm, &mut b.xn, t, h, eps)?;
                    }
                }
            }
        }
        if n_layers == 0 && layers.end == 0 {
            k.rmsnorm(s, &b.x, &w.output_norm, &mut b.xn, t, h, eps)?;
        }
        let v = cfg.vocab_size;
        match phase {
            Phase::Decode => match fused {
                Some(g) => g.rmsnorm_linear(
                    s,
                    &b.x,
                    &w.output_norm,
                    eps,
                    w.head(),
                    &mut b.logits,
                    dims(h, v),
                )?,
                None => self.blas.linear(&b.xn, w.head(), &mut b.logits, bs, h, v)?,
            },
            Phase::Prefill { logits: false, .. } => {}
            Phase::Prefill { seq, n, .. } => {
                let last = b.xn.slice((n - 1) * h..n * h);
                let mut row = b.logits.slice_mut(seq * v..(seq + 1) * v);
                self.blas.linear(&last, w.head(), &mut row, 1, h, v)?
            }
        }
        // A step that may be captured joins its speculative recalls before it ends: after the
        // output head, which hides the last layers' speculative branches (they write only the
        // sparse layers' slots and tables, which the head does not read).
        if let (Phase::Decode, Some(st)) = (phase, b.sparse.as_mut()) {
            let dense = st.all_dense();
            if b.opts.use_graph && st.opts.graph_capturable() && !dense {
                st.join_recalls_in_step(s)?;
            }
            if st.opts.collect_stats && st.opts.kv.kind == KvKind::FreeKv && !dense {
                let fl = st.shape.rows();
                for (si, layer) in st.layers.iter().enumerate() {
                    let mut dst = st.flags_all.slice_mut(si * fl..(si + 1) * fl);
                    s.memcpy_dtod(&layer.flags, &mut dst)
                        .map_err(drv("gathering correction flags"))?;
                }
            }
        }
        Ok(())
    }
}

/// `v` read as f32 (the sampling inputs are uploaded as bits in one i32 buffer).
fn f32_view<'a>(v: CudaView<'a, i32>, rows: usize) -> Result<CudaView<'a, f32>, ModelError> {
    // SAFETY: i32 and f32 have the same size and alignment; every bit pattern is a valid f32.
    unsafe { v.transmute::<f32>(rows) }
        .ok_or_else(|| ModelError::Config("sampling buffer too small".into()))
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Decode,
    /// `n` prompt tokens of sequence `seq` starting at prompt token `tok0`: prefill chunk `chunk`
    /// (its metadata in [`CudaBatch::pmeta`]); `logits`: compute the last token's logits.
    Prefill {
        seq: usize,
        n: usize,
        tok0: usize,
        chunk: usize,
        logits: bool,
    },
}

/// The device lists of one sequence's prefill offload (made once, used by every sparse layer):
/// `(seq, scratch page, logical page)` per full page and `(scratch page, slot)` per page
/// resident after the prefill (the sinks and the recent window, or every page below the
/// budget).
struct SparsePrefillLists {
    entries: CudaSlice<i32>,
    full: usize,
    pairs: CudaSlice<i32>,
    n_pairs: usize,
}

impl SparsePrefillLists {
    /// Lists for sequence `seq` holding `n_tok` prompt tokens; `src_page` maps a logical page
    /// to its scratch page (identity after a real prefill). Grows the host pool first.
    fn new(
        st: &mut SparseState,
        s: &Arc<freekv_kernels::cudarc::driver::CudaStream>,
        seq: usize,
        n_tok: usize,
        src_page: Option<&dyn Fn(usize) -> usize>,
    ) -> Result<Self, ModelError> {
        let budget = st.budget;
        let p = budget.page_size();
        // Physical slots per sequence (spare slots included) and the budget's own count.
        let nb = st.shape.slots();
        let n_pages = n_tok.div_ceil(p);
        let full = n_tok / p;
        let src = |pg: usize| src_page.map_or(pg, |f| f(pg));
        st.pool.ensure_pages(s, seq, n_pages)?;
        let mut entries = Vec::with_capacity(3 * full.max(1));
        for pg in 0..full {
            entries.extend([seq as i32, src(pg) as i32, pg as i32]);
        }
        let mut pairs = Vec::new();
        let resident: Vec<usize> = if n_pages <= budget.total_pages() {
            (0..n_pages).collect()
        } else {
            (0..budget.sink_pages())
                .chain(n_pages - budget.window_pages()..n_pages)
                .collect()
        };
        for pg in resident {
            pairs.extend([src(pg) as i32, (seq * nb + home_slot(&budget, pg)) as i32]);
        }
        let n_pairs = pairs.len() / 2;
        if entries.is_empty() {
            entries.extend([-1, 0, 0]);
        }
        if pairs.is_empty() {
            pairs.extend([0, 0]);
        }
        Ok(Self {
            entries: s
                .clone_htod(&entries)
                .map_err(drv("uploading offload entries"))?,
            full,
            pairs: s.clone_htod(&pairs).map_err(drv("uploading page copies"))?,
            n_pairs,
        })
    }
}

/// Length of the prefill metadata buffer for prompts of up to `cap` tokens in chunks of `chunk`.
fn pmeta_len(cap: usize, chunk: usize) -> usize {
    2 * cap + 3 * cap.div_ceil(chunk.max(1)).max(1)
}

fn model_key(cfg: &LlamaConfig) -> (usize, usize, usize, usize, usize) {
    (
        cfg.n_layers,
        cfg.hidden,
        cfg.vocab_size,
        cfg.n_kv_heads * cfg.head_dim,
        cfg.ffn_hidden,
    )
}

/// The device state of a batch of sequences: their KV pages (full KV, every layer), page tables,
/// lengths, the activations of one step and the captured decode graph.
///
/// KV layout (compatible with the FreeKV kernels): per layer one pool
/// `[pages][2][page_size][kv_heads][head_dim]` bf16 (K then V), and one page table row of
/// `pages_per_seq` page ids per sequence, shared by every layer.
pub struct CudaBatch {
    /// The captured decode graphs: `[0]` for the steps of a batch without sparse KV and for
    /// the steps where some sequence is sparse, `[1]` for the all-dense steps of a sparse batch.
    /// Declared first so that they are destroyed before the buffers their nodes point to.
    graphs: [Option<CudaGraph>; 2],
    opts: BatchOptions,
    model_key: (usize, usize, usize, usize, usize),
    geom: PageGeometry,
    pages_per_seq: usize,
    chunk: usize,
    /// The KV pool of every layer (`None` for the sparse layers of a sparse batch: their KV
    /// lives in [`SparseState`]).
    kv: Vec<Option<CudaSlice<bf16>>>,
    page_table: CudaSlice<i32>,
    lens: Vec<usize>,
    /// Decode metadata: `[ids | positions | lengths after the step]`, `max_seqs` each.
    dmeta: CudaSlice<i32>,
    /// Sequence index of every decode row (`0..max_seqs`).
    dseq: CudaSlice<i32>,
    /// Prefill metadata of a whole prompt: `[ids cap | positions cap | per chunk: q_start 2,
    /// length after the chunk 1]` with `cap` = [`CudaBatch::pmeta_cap`] tokens.
    pmeta: CudaSlice<i32>,
    pmeta_cap: usize,
    /// Zeros: the sequence index of every prefill row (one page-table row is passed).
    pzeros: CudaSlice<i32>,
    x: CudaSlice<bf16>,
    xn: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    att: CudaSlice<bf16>,
    o: CudaSlice<bf16>,
    gu: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    logits: CudaSlice<f32>,
    out_ids: CudaSlice<i32>,
    /// Sampling inputs `[temperature | top_k | top_p | uniform]` (f32 stored as bits).
    samp: CudaSlice<i32>,
    plan: DecodePlan,
    workspace: CudaSlice<f32>,
    graph_error: Option<String>,
    eager_steps: usize,
    /// The sparse KV policy's state (`None`: full KV on the device).
    sparse: Option<SparseState>,
}

impl std::fmt::Debug for CudaBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBatch")
            .field("opts", &self.opts)
            .field("lens", &self.lens)
            .field("graphs", &self.graphs.each_ref().map(Option::is_some))
            .field("graph_error", &self.graph_error)
            .finish_non_exhaustive()
    }
}

impl CudaBatch {
    fn new(
        m: &CudaLlama,
        opts: BatchOptions,
        kv: Option<GpuKvOptions>,
    ) -> Result<Self, ModelError> {
        let _span = tracing::debug_span!("cuda_new_batch").entered();
        let cfg = &m.cfg;
        if opts.max_seqs == 0 || opts.max_seq_len == 0 || opts.page_size == 0 {
            return Err(ModelError::Config(
                "a CUDA batch needs at least one sequence, one token and one token per page".into(),
            ));
        }
        if opts.max_seq_len > cfg.context_length {
            return Err(ModelError::Config(format!(
                "{} tokens per sequence exceed the model's context of {}",
                opts.max_seq_len, cfg.context_length
            )));
        }
        let geom = PageGeometry::new(opts.page_size, cfg.n_kv_heads, cfg.head_dim)?;
        let pages_per_seq = opts.max_seq_len.div_ceil(opts.page_size);
        let total_pages = pages_per_seq
            .checked_mul(opts.max_seqs)
            .filter(|&p| p <= i32::MAX as usize)
            .ok_or_else(|| ModelError::Config("KV page count overflows".into()))?;
        let pool_elems = total_pages
            .checked_mul(geom.page_elems())
            .ok_or_else(|| ModelError::Config("KV pool size overflows".into()))?;
        let s = m.gpu.stream();
        let kv_bytes = 2 * pool_elems as u128 * cfg.n_layers as u128;
        let oom = |what: String| {
            move |e: DriverError| {
                ModelError::Kernel(KernelError::Driver {
                    what: format!("{what} (lower the batch size or the context)"),
                    source: e,
                })
            }
        };
        let (h, qd, kvd, ff) = dims(cfg);
        let shape = AttentionShape {
            q_heads: cfg.n_heads,
            geom,
            table_stride: pages_per_seq,
            q_rows: Strided {
                offset: 0,
                stride: qd + 2 * kvd,
            },
            scale: None,
        };
        let sparse = match kv {
            Some(kvo) => Some(SparseState::new(
                &m.gpu,
                kvo,
                &SparseDims {
                    n_layers: cfg.n_layers,
                    q_heads: cfg.n_heads,
                    kv_heads: cfg.n_kv_heads,
                    head_dim: cfg.head_dim,
                    max_seqs: opts.max_seqs,
                    max_seq_len: opts.max_seq_len,
                    use_graph: opts.use_graph,
                },
                shape,
            )?),
            None => None,
        };
        let mut kv = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            // A sparse layer's KV lives in the sparse state (slots on the device, the history
            // on the host).
            if let Some(st) = &sparse
                && st.layer_of.get(l).copied().flatten().is_some()
            {
                kv.push(None);
                continue;
            }
            kv.push(Some(s.alloc_zeros::<bf16>(pool_elems).map_err(oom(
                format!(
                    "allocating the KV pool of layer {l} ({:.2} GiB of {:.2} GiB in all)",
                    (2 * pool_elems) as f64 / (1u64 << 30) as f64,
                    kv_bytes as f64 / (1u64 << 30) as f64
                ),
            ))?));
        }
        let table: Vec<i32> = (0..total_pages as i32).collect();
        let page_table = s.clone_htod(&table).map_err(drv("uploading page tables"))?;
        let chunk = opts.prefill_chunk.max(1);
        let t_max = chunk.max(opts.max_seqs);
        let zeros_bf = |n: usize| {
            s.alloc_zeros::<bf16>(n)
                .map_err(oom("allocating activations".into()))
        };
        let dseq_host: Vec<i32> = (0..opts.max_seqs as i32).collect();
        let plan = m
            .gpu
            .kernels()
            .plan_decode(shape, opts.max_seqs, opts.max_seq_len)?;
        let batch = Self {
            opts,
            model_key: model_key(cfg),
            geom,
            pages_per_seq,
            chunk,
            kv,
            page_table,
            lens: vec![0; opts.max_seqs],
            dmeta: s
                .alloc_zeros::<i32>(3 * opts.max_seqs)
                .map_err(drv("allocating decode metadata"))?,
            dseq: s
                .clone_htod(&dseq_host)
                .map_err(drv("allocating decode metadata"))?,
            pmeta: s
                .alloc_zeros::<i32>(pmeta_len(chunk, chunk))
                .map_err(drv("allocating prefill metadata"))?,
            pmeta_cap: chunk,
            pzeros: s
                .alloc_zeros::<i32>(chunk)
                .map_err(drv("allocating prefill metadata"))?,
            x: zeros_bf(t_max * h)?,
            xn: zeros_bf(t_max * h)?,
            qkv: zeros_bf(t_max * (qd + 2 * kvd))?,
            att: zeros_bf(t_max * qd)?,
            o: zeros_bf(t_max * h)?,
            gu: zeros_bf(t_max * 2 * ff)?,
            act: zeros_bf(t_max * ff)?,
            logits: s
                .alloc_zeros::<f32>(opts.max_seqs * cfg.vocab_size)
                .map_err(oom("allocating logits".into()))?,
            out_ids: s
                .alloc_zeros::<i32>(opts.max_seqs)
                .map_err(drv("allocating token ids"))?,
            samp: s
                .alloc_zeros::<i32>(4 * opts.max_seqs)
                .map_err(drv("allocating sampling inputs"))?,
            workspace: s
                .alloc_zeros::<f32>(
                    plan.workspace_len()
                        .max(sparse.as_ref().map_or(0, |st| st.plan.workspace_len()))
                        .max(1),
                )
                .map_err(oom("allocating the attention workspace".into()))?,
            plan,
            graphs: [None, None],
            graph_error: None,
            eager_steps: 0,
            sparse,
        };
        m.gpu.synchronize()?;
        Ok(batch)
    }

    /// The sizes the batch was allocated with.
    pub fn options(&self) -> &BatchOptions {
        &self.opts
    }

    /// Tokens held by each sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Forgets the tail of sequence `seq` beyond `len` tokens (e.g. to start it over with 0).
    /// A batch with a sparse KV policy can only start a sequence over (`len` 0): its resident
    /// window would not match a shorter length.
    pub fn truncate(&mut self, seq: usize, len: usize) -> Result<(), ModelError> {
        let cur = self
            .lens
            .get_mut(seq)
            .ok_or_else(|| ModelError::Config(format!("sequence {seq} outside the batch")))?;
        if let Some(st) = self.sparse.as_mut()
            && len < *cur
        {
            if len != 0 {
                return Err(ModelError::Config(format!(
                    "a batch with the {} KV policy can only start a sequence over (length 0), \
                     not truncate it to {len}",
                    st.opts.policy_name()
                )));
            }
            st.restart(seq);
        }
        *cur = (*cur).min(len);
        Ok(())
    }

    /// The KV policy of the batch: `full`, `oracle`, `arkvale` or `freekv`.
    pub fn kv_policy(&self) -> &'static str {
        self.sparse
            .as_ref()
            .map_or("full", |st| st.opts.policy_name())
    }

    /// Statistics of a sparse KV policy (`None` for `full`), up to the last decode step: counts
    /// the last step's correction flags first if that was not done yet (they are copied back
    /// without a wait and counted at the next step), so this may wait for the last step.
    pub fn kv_stats(&mut self) -> Result<Option<&GpuKvStats>, ModelError> {
        match self.sparse.as_mut() {
            Some(st) => {
                st.settle_stats()?;
                Ok(Some(&st.stats))
            }
            None => Ok(None),
        }
    }

    /// Pinned host bytes reserved for the KV history of the sparse layers (0 for `full`).
    pub fn host_kv_bytes(&self) -> usize {
        self.sparse
            .as_ref()
            .map_or(0, |st| st.pool.bytes_reserved())
    }

    /// Device bytes of the sparse state: resident slots, summaries, tables (0 for `full`).
    pub fn sparse_device_bytes(&self) -> usize {
        self.sparse.as_ref().map_or(0, |st| st.device_bytes())
    }

    /// Whether a decode graph has been captured (for the all-dense steps of a sparse batch, or
    /// for the others).
    pub fn has_graph(&self) -> bool {
        self.graphs.iter().any(Option::is_some)
    }

    /// Why capturing the decode graph failed, if it did (decoding then stays eager).
    pub fn graph_error(&self) -> Option<&str> {
        self.graph_error.as_deref()
    }

    /// The split-K plan of the decode attention (fixed for the batch).
    pub fn decode_plan(&self) -> &DecodePlan {
        &self.plan
    }

    /// Device bytes of the KV pools of the dense layers (every layer for `full`; the sparse
    /// layers' slots are [`CudaBatch::sparse_device_bytes`]).
    pub fn kv_bytes(&self) -> usize {
        self.kv.iter().flatten().map(|p| 2 * p.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks_and_labels() {
        let mut c = synthetic_config("smollm2-135m").unwrap();
        assert!(check_config(&c).is_ok());
        c.rope_dim = 32;
        assert!(
            check_config(&c)
                .unwrap_err()
                .to_string()
                .contains("partial RoPE")
        );
        let mut c = synthetic_config("llama-3.1-8b").unwrap();
        c.head_dim = 96;
        c.rope_dim = 96;
        assert!(
            check_config(&c)
                .unwrap_err()
                .to_string()
                .contains("head dimension 96")
        );
        let s = ModelSource::Synthetic {
            name: "qwen-2.5-7b".into(),
            seed: 3,
        };
        assert!(s.is_synthetic());
        assert_eq!(s.label(), "synthetic:qwen-2.5-7b (random weights, seed 3)");
        assert!(!ModelSource::Gguf("m.gguf".into()).is_synthetic());
        let o = BatchOptions::default();
        assert_eq!((o.max_seqs, o.page_size, o.use_graph), (1, 32, true));
        assert_ne!(
            model_key(&synthetic_config("qwen-2.5-7b").unwrap()),
            model_key(&synthetic_config("llama-3.1-8b").unwrap())
        );
    }
}
