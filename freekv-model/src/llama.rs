//! The CPU Llama decoder: weights kept quantized in the memory-mapped GGUF file, `f32`
//! activations, a paged KV cache, batched prefill and single-token decode.
//!
//! One layer: `x += Wo · attn(rope(Wq · n1(x)), rope(Wk · n1(x)), Wv · n1(x))`, then
//! `x += Wdown · (silu(Wgate · n2(x)) ⊙ (Wup · n2(x)))`, with RMSNorms `n1`, `n2`; a final RMSNorm
//! and the output head (`output.weight`, or the tied `token_embd.weight`) give the logits. RoPE
//! rotates adjacent pairs `(x[2i], x[2i+1])` (the GGUF/llama.cpp "normal" convention) by
//! `position · inv_freq[i]`, positions counted from 0.
//!
//! Prefill runs dense causal attention over the prompt in chunks with batched matrix products;
//! decode runs one token with matrix-vector products and hands attention to the session's
//! [`KvPolicy`] ([`DenseKv`] by default).

use std::path::Path;
use std::sync::Arc;

use freekv_layout::{PageGeometry, PagedKvCache};

use crate::ModelError;
use crate::attention::{
    AttnScratch, AttnShape, CacheLayer, DenseKv, KvPolicy, LayerStep, kernels, prefill_attention,
};
use crate::config::LlamaConfig;
use crate::ggml::GgmlType;
use crate::gguf::GgufFile;
use crate::qmatmul::{QMatrix, matmul_many};

/// Default tokens per KV page.
pub const DEFAULT_PAGE_SIZE: usize = 32;
/// Default prompt tokens per prefill chunk.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// A receiver of per-token logits: `(index of the token in the prompt, its logits)`.
pub type LogitsSink<'a> = dyn FnMut(usize, &[f32]) -> Result<(), ModelError> + 'a;

/// A weight matrix of the file: its tensor index and shape (`rows` outputs × `cols` inputs).
#[derive(Debug, Clone, Copy)]
struct MatRef {
    index: usize,
    ty: GgmlType,
    rows: usize,
    cols: usize,
}

/// The weights of one transformer block.
#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    wq: MatRef,
    wk: MatRef,
    wv: MatRef,
    wo: MatRef,
    gate: MatRef,
    up: MatRef,
    down: MatRef,
}

/// A Llama-family model on the CPU.
pub struct LlamaModel {
    gguf: Arc<GgufFile>,
    cfg: LlamaConfig,
    shape: AttnShape,
    embd: MatRef,
    head: MatRef,
    output_norm: Vec<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("path", &self.gguf.path())
            .field("config", &self.cfg)
            .finish()
    }
}

impl LlamaModel {
    /// Open and memory-map a GGUF file and load the model from it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::new(Arc::new(GgufFile::open(path)?))
    }

    /// Load the model from a parsed GGUF file: checks every tensor's presence, type and shape,
    /// dequantizes the norms; the matrices stay quantized in the file's memory.
    pub fn new(gguf: Arc<GgufFile>) -> Result<Self, ModelError> {
        let _span = tracing::debug_span!("load_model").entered();
        let cfg = LlamaConfig::from_gguf(&gguf)?;
        let shape = AttnShape::new(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)?;
        let (h, qd, kvd, ff) = (cfg.hidden, shape.q_len(), shape.kv_len(), cfg.ffn_hidden);
        let mat = |name: &str, rows: usize, cols: usize| mat_ref(&gguf, name, rows, cols);
        let norm = |name: &str| -> Result<Vec<f32>, ModelError> {
            let t = gguf
                .tensor(name)
                .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
            if t.dims.as_slice() != [h as u64] {
                return Err(ModelError::Shape(format!(
                    "tensor `{name}` has dims {:?}, expected [{h}]",
                    t.dims
                )));
            }
            gguf.tensor_f32(name)
        };
        let embd = mat("token_embd.weight", cfg.vocab_size, h)?;
        let head = if gguf.tensor("output.weight").is_some() {
            mat("output.weight", cfg.vocab_size, h)?
        } else {
            embd
        };
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            layers.push(Layer {
                attn_norm: norm(&n("attn_norm"))?,
                ffn_norm: norm(&n("ffn_norm"))?,
                wq: mat(&n("attn_q"), qd, h)?,
                wk: mat(&n("attn_k"), kvd, h)?,
                wv: mat(&n("attn_v"), kvd, h)?,
                wo: mat(&n("attn_output"), h, qd)?,
                gate: mat(&n("ffn_gate"), ff, h)?,
                up: mat(&n("ffn_up"), ff, h)?,
                down: mat(&n("ffn_down"), h, ff)?,
            });
        }
        let output_norm = norm("output_norm.weight")?;
        let inv_freq = cfg.inv_freqs();
        let model = Self {
            gguf,
            cfg,
            shape,
            embd,
            head,
            output_norm,
            layers,
            inv_freq,
        };
        // Every matrix must be usable by the kernels: check once here, not per call.
        model.matrix(&model.embd)?;
        model.matrix(&model.head)?;
        for l in &model.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down] {
                model.matrix(m)?;
            }
        }
        Ok(model)
    }

    /// Hyperparameters.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Heads and score scale of the attention.
    pub fn attn_shape(&self) -> AttnShape {
        self.shape
    }

    /// The GGUF file the weights live in.
    pub fn gguf(&self) -> &Arc<GgufFile> {
        &self.gguf
    }

    /// Vocabulary size (rows of the output head).
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// The RoPE inverse frequencies (`rope_dim / 2`).
    pub fn inv_freqs(&self) -> &[f32] {
        &self.inv_freq
    }

    /// A new session (KV cache, scratch and the dense policy) with `page_size` tokens per page.
    pub fn session(&self, page_size: usize) -> Result<Session, ModelError> {
        self.session_with_policy(page_size, Box::new(DenseKv::new()))
    }

    /// A new session whose decode steps attend through `policy`.
    pub fn session_with_policy(
        &self,
        page_size: usize,
        policy: Box<dyn KvPolicy>,
    ) -> Result<Session, ModelError> {
        self.session_bounded(page_size, policy, None)
    }

    /// Host bytes of one KV page of one layer (keys and values of `page_size` tokens, `f32`).
    pub fn kv_page_bytes(&self, page_size: usize) -> Result<usize, ModelError> {
        let c = &self.cfg;
        let geom = PageGeometry::new(page_size, c.n_kv_heads, c.head_dim)?;
        geom.page_elems()
            .checked_mul(std::mem::size_of::<f32>())
            .ok_or_else(|| ModelError::Config("KV page size overflows".into()))
    }

    /// Host bytes of the session's KV cache holding `tokens` tokens in every layer (whole pages).
    pub fn kv_cache_bytes(&self, page_size: usize, tokens: usize) -> Result<usize, ModelError> {
        let page = self.kv_page_bytes(page_size)?;
        tokens
            .div_ceil(page_size)
            .checked_mul(self.cfg.n_layers)
            .and_then(|p| p.checked_mul(page))
            .ok_or_else(|| ModelError::Config(format!("the KV cache of {tokens} tokens overflows")))
    }

    /// A new session whose KV cache grows to at most `max_cache_bytes` of host memory (whole
    /// pages; `None`: as much as the context needs). Beyond the bound, prefill and decode fail
    /// with [`LayoutError::PoolExhausted`](freekv_layout::LayoutError::PoolExhausted); the
    /// session's context length is lowered to what the bound holds, so generation stops with
    /// [`StopReason::Context`](crate::generate::StopReason::Context) before that.
    pub fn session_bounded(
        &self,
        page_size: usize,
        policy: Box<dyn KvPolicy>,
        max_cache_bytes: Option<usize>,
    ) -> Result<Session, ModelError> {
        let c = &self.cfg;
        let geom = PageGeometry::new(page_size, c.n_kv_heads, c.head_dim)?;
        let mut max_pages = geom
            .pages_for(c.context_length)
            .checked_mul(c.n_layers)
            .ok_or_else(|| ModelError::Config("KV cache size overflows".into()))?;
        let mut context_length = c.context_length;
        if let Some(bytes) = max_cache_bytes {
            let page = self.kv_page_bytes(page_size)?;
            let per_layer = bytes / page / c.n_layers;
            if per_layer == 0 {
                return Err(ModelError::Config(format!(
                    "a host KV limit of {bytes} bytes holds no page: one page of every layer needs \
                     {} bytes",
                    page.saturating_mul(c.n_layers)
                )));
            }
            max_pages = max_pages.min(per_layer.saturating_mul(c.n_layers));
            context_length = context_length.min(per_layer.saturating_mul(page_size));
        }
        let cache = PagedKvCache::new(geom, c.n_layers, Some(max_pages))?;
        Ok(Session {
            cache,
            policy,
            bufs: DecodeBufs::new(c, &self.shape),
            pre: PrefillBufs::default(),
            attn: AttnScratch::new(),
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            context_length,
        })
    }

    fn matrix(&self, m: &MatRef) -> Result<QMatrix<'_>, ModelError> {
        let t =
            self.gguf.tensors().get(m.index).ok_or_else(|| {
                ModelError::Shape(format!("tensor index {} out of range", m.index))
            })?;
        QMatrix::new(m.ty, m.rows, m.cols, self.gguf.tensor_data(t)?).map_err(|e| match e {
            ModelError::Shape(msg) => ModelError::Shape(format!("tensor `{}`: {msg}", t.name)),
            other => other,
        })
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

    /// Run the prompt `tokens` through the model, appending their keys and values to the
    /// session's cache (after whatever it already holds), and return the logits of the last token.
    /// Dense causal attention, in chunks of the session's prefill chunk size; the session's policy
    /// is told afterwards ([`KvPolicy::after_prefill`]).
    pub fn prefill<'s>(&self, s: &'s mut Session, tokens: &[u32]) -> Result<&'s [f32], ModelError> {
        self.prefill_inner(s, tokens, None)?;
        Ok(&s.bufs.logits)
    }

    /// Like [`prefill`](Self::prefill), but returns the logits of every token
    /// (`tokens.len() × vocab`, token-major), e.g. for teacher-forced evaluation of short texts
    /// (see [`prefill_with_logits`](Self::prefill_with_logits) for long ones).
    pub fn prefill_all_logits(
        &self,
        s: &mut Session,
        tokens: &[u32],
    ) -> Result<Vec<f32>, ModelError> {
        let mut all = Vec::with_capacity(tokens.len().saturating_mul(self.cfg.vocab_size));
        self.prefill_with_logits(s, tokens, &mut |_, l| {
            all.extend_from_slice(l);
            Ok(())
        })?;
        Ok(all)
    }

    /// Like [`prefill`](Self::prefill), but calls `on_logits(i, logits)` with the logits of every
    /// token `tokens[i]`, in order, one prefill chunk at a time (memory stays at one chunk's
    /// logits). An error from the callback stops the prefill and is returned.
    pub fn prefill_with_logits(
        &self,
        s: &mut Session,
        tokens: &[u32],
        on_logits: &mut LogitsSink<'_>,
    ) -> Result<(), ModelError> {
        self.prefill_inner(s, tokens, Some(on_logits))
    }

    fn prefill_inner(
        &self,
        s: &mut Session,
        tokens: &[u32],
        mut on_logits: Option<&mut LogitsSink<'_>>,
    ) -> Result<(), ModelError> {
        let _span = tracing::debug_span!("prefill", tokens = tokens.len()).entered();
        if tokens.is_empty() {
            return Err(ModelError::Prompt("the prompt is empty".into()));
        }
        self.check_tokens(tokens)?;
        self.gguf.check_unchanged()?;
        let start = s.position();
        if start + tokens.len() > s.context_length {
            return Err(ModelError::Prompt(format!(
                "{} prompt tokens after {start} cached ones exceed the context of {} tokens",
                tokens.len(),
                s.context_length
            )));
        }
        let chunk = s.prefill_chunk.max(1);
        let v = self.cfg.vocab_size;
        let mut pos = start;
        let n_chunks = tokens.len().div_ceil(chunk);
        for (ci, toks) in tokens.chunks(chunk).enumerate() {
            let last = ci + 1 == n_chunks;
            self.prefill_chunk(s, toks, pos)?;
            if let Some(f) = on_logits.as_deref_mut() {
                self.head_rows(s, toks.len())?;
                for (i, l) in s.pre.logits.chunks_exact(v).enumerate() {
                    f(ci * chunk + i, l)?;
                }
                if last && let Some(l) = s.pre.logits.chunks_exact(v).last() {
                    s.bufs.logits.copy_from_slice(l);
                }
            } else if last {
                self.head_last(s, toks.len())?;
            }
            pos += toks.len();
        }
        s.policy.after_prefill(&s.cache)?;
        Ok(())
    }

    /// One prefill chunk: `toks` at positions `pos..`; leaves the final hidden states in `s.pre.x`.
    fn prefill_chunk(&self, s: &mut Session, toks: &[u32], pos: usize) -> Result<(), ModelError> {
        let c = &self.cfg;
        let t = toks.len();
        let (h, qd, kvd, ff) = (
            c.hidden,
            self.shape.q_len(),
            self.shape.kv_len(),
            c.ffn_hidden,
        );
        let p = &mut s.pre;
        p.resize(t, h, qd, kvd, ff);
        let embd = self.matrix(&self.embd)?;
        for (i, &tok) in toks.iter().enumerate() {
            embd.row_to_f32(tok as usize, &mut p.x[i * h..(i + 1) * h])?;
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let _span = tracing::trace_span!("prefill_layer", layer = l).entered();
            rms_norm_rows(&p.x, &layer.attn_norm, c.rms_eps, &mut p.xn);
            matmul_many(
                &[
                    self.matrix(&layer.wq)?,
                    self.matrix(&layer.wk)?,
                    self.matrix(&layer.wv)?,
                ],
                &p.xn,
                t,
                &mut [&mut p.q, &mut p.k, &mut p.v],
            )?;
            for i in 0..t {
                rope_table(&self.inv_freq, pos + i, &mut s.bufs.cos, &mut s.bufs.sin);
                let (cs, sn) = (&s.bufs.cos, &s.bufs.sin);
                rope(&mut p.q[i * qd..(i + 1) * qd], c.head_dim, cs, sn);
                rope(&mut p.k[i * kvd..(i + 1) * kvd], c.head_dim, cs, sn);
                s.cache.append(
                    l,
                    &p.k[i * kvd..(i + 1) * kvd],
                    &p.v[i * kvd..(i + 1) * kvd],
                )?;
            }
            prefill_attention(
                &CacheLayer::new(&s.cache, l),
                &p.q,
                pos,
                &self.shape,
                &mut p.att,
                &mut s.attn,
            )?;
            self.matrix(&layer.wo)?.matmul(&p.att, t, &mut p.o)?;
            add_assign(&mut p.x, &p.o);
            rms_norm_rows(&p.x, &layer.ffn_norm, c.rms_eps, &mut p.xn);
            matmul_many(
                &[self.matrix(&layer.gate)?, self.matrix(&layer.up)?],
                &p.xn,
                t,
                &mut [&mut p.gate, &mut p.up],
            )?;
            kernels::silu_mul(&mut p.gate, &p.up);
            self.matrix(&layer.down)?.matmul(&p.gate, t, &mut p.o)?;
            add_assign(&mut p.x, &p.o);
        }
        Ok(())
    }

    /// Logits of the last of the `t` rows in `s.pre.x`, into `s.bufs.logits`.
    fn head_last(&self, s: &mut Session, t: usize) -> Result<(), ModelError> {
        let h = self.cfg.hidden;
        let x = &s.pre.x[(t - 1) * h..t * h];
        rms_norm(x, &self.output_norm, self.cfg.rms_eps, &mut s.bufs.xn);
        self.matrix(&self.head)?
            .matvec(&s.bufs.xn, &mut s.bufs.logits)
    }

    /// Logits of all `t` rows in `s.pre.x`, into `s.pre.logits`.
    fn head_rows(&self, s: &mut Session, t: usize) -> Result<(), ModelError> {
        let p = &mut s.pre;
        rms_norm_rows(&p.x, &self.output_norm, self.cfg.rms_eps, &mut p.xn);
        p.logits.clear();
        p.logits.resize(t * self.cfg.vocab_size, 0.0);
        self.matrix(&self.head)?.matmul(&p.xn, t, &mut p.logits)
    }

    /// Run one token at the next position and return its logits. Attention goes through the
    /// session's policy, which appends the token's key and value.
    ///
    /// Errors: a token outside the vocabulary, a full context or a model file changed on disk
    /// ([`GgufFile::check_unchanged`]) (the session is unchanged), or a failure inside a layer
    /// (the session is then inconsistent: [`Session::reset`] it).
    pub fn decode<'s>(&self, s: &'s mut Session, token: u32) -> Result<&'s [f32], ModelError> {
        let _span = tracing::debug_span!("decode").entered();
        self.check_tokens(&[token])?;
        // One fstat per step (about a microsecond): the weights are read from the file's map.
        self.gguf.check_unchanged()?;
        let pos = s.position();
        if pos >= s.context_length {
            return Err(ModelError::Prompt(format!(
                "the context of {} tokens is full",
                s.context_length
            )));
        }
        let c = &self.cfg;
        let b = &mut s.bufs;
        self.matrix(&self.embd)?
            .row_to_f32(token as usize, &mut b.x)?;
        rope_table(&self.inv_freq, pos, &mut b.cos, &mut b.sin);
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&b.x, &layer.attn_norm, c.rms_eps, &mut b.xn);
            matmul_many(
                &[
                    self.matrix(&layer.wq)?,
                    self.matrix(&layer.wk)?,
                    self.matrix(&layer.wv)?,
                ],
                &b.xn,
                1,
                &mut [&mut b.q, &mut b.k, &mut b.v],
            )?;
            rope(&mut b.q, c.head_dim, &b.cos, &b.sin);
            rope(&mut b.k, c.head_dim, &b.cos, &b.sin);
            let step = LayerStep {
                layer: l,
                position: pos,
                q: &b.q,
                k: &b.k,
                v: &b.v,
                shape: self.shape,
            };
            {
                let _span = tracing::trace_span!("attend", layer = l).entered();
                s.policy.attend(&step, &mut s.cache, &mut b.att)?;
            }
            if s.cache.len(l) != pos + 1 {
                return Err(ModelError::Config(format!(
                    "KV policy `{}` left layer {l} with {} cached tokens, expected {}",
                    s.policy.name(),
                    s.cache.len(l),
                    pos + 1
                )));
            }
            self.matrix(&layer.wo)?.matvec(&b.att, &mut b.o)?;
            add_assign(&mut b.x, &b.o);
            rms_norm(&b.x, &layer.ffn_norm, c.rms_eps, &mut b.xn);
            matmul_many(
                &[self.matrix(&layer.gate)?, self.matrix(&layer.up)?],
                &b.xn,
                1,
                &mut [&mut b.gate, &mut b.up],
            )?;
            kernels::silu_mul(&mut b.gate, &b.up);
            self.matrix(&layer.down)?.matvec(&b.gate, &mut b.o)?;
            add_assign(&mut b.x, &b.o);
        }
        s.policy.end_step();
        rms_norm(&b.x, &self.output_norm, c.rms_eps, &mut b.xn);
        self.matrix(&self.head)?.matvec(&b.xn, &mut b.logits)?;
        Ok(&s.bufs.logits)
    }
}

fn mat_ref(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<MatRef, ModelError> {
    let index = g
        .tensors()
        .iter()
        .position(|t| t.name == name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
    let t = &g.tensors()[index];
    if t.dims.as_slice() != [cols as u64, rows as u64] {
        return Err(ModelError::Shape(format!(
            "tensor `{name}` has dims {:?}, expected [{cols}, {rows}]",
            t.dims
        )));
    }
    Ok(MatRef {
        index,
        ty: t.ty,
        rows,
        cols,
    })
}

/// Decode scratch: one token's activations, sized once per session.
#[derive(Debug, Clone)]
struct DecodeBufs {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl DecodeBufs {
    fn new(c: &LlamaConfig, shape: &AttnShape) -> Self {
        Self {
            x: vec![0.0; c.hidden],
            xn: vec![0.0; c.hidden],
            q: vec![0.0; shape.q_len()],
            k: vec![0.0; shape.kv_len()],
            v: vec![0.0; shape.kv_len()],
            att: vec![0.0; shape.q_len()],
            o: vec![0.0; c.hidden],
            gate: vec![0.0; c.ffn_hidden],
            up: vec![0.0; c.ffn_hidden],
            logits: vec![0.0; c.vocab_size],
            cos: vec![0.0; c.rope_dim / 2],
            sin: vec![0.0; c.rope_dim / 2],
        }
    }
}

/// Prefill scratch: one chunk's activations (token-major), grown on demand.
#[derive(Debug, Clone, Default)]
struct PrefillBufs {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Logits of every row of a chunk (only for [`LlamaModel::prefill_with_logits`]).
    logits: Vec<f32>,
}

impl PrefillBufs {
    fn resize(&mut self, t: usize, h: usize, qd: usize, kvd: usize, ff: usize) {
        for (buf, n) in [
            (&mut self.x, h),
            (&mut self.xn, h),
            (&mut self.q, qd),
            (&mut self.k, kvd),
            (&mut self.v, kvd),
            (&mut self.att, qd),
            (&mut self.o, h),
            (&mut self.gate, ff),
            (&mut self.up, ff),
        ] {
            buf.clear();
            buf.resize(t * n, 0.0);
        }
    }
}

/// One sequence being generated: its paged KV cache, its KV policy and reusable scratch.
pub struct Session {
    cache: PagedKvCache,
    policy: Box<dyn KvPolicy>,
    bufs: DecodeBufs,
    pre: PrefillBufs,
    attn: AttnScratch,
    prefill_chunk: usize,
    context_length: usize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("position", &self.position())
            .field("policy", &self.policy.name())
            .field("page_size", &self.cache.geometry().page_size)
            .finish()
    }
}

impl Session {
    /// Tokens in the cache: the position the next token gets.
    pub fn position(&self) -> usize {
        self.cache.len(0)
    }

    /// The maximum number of tokens this session can hold.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Lower the context limit (e.g. to bound memory); it cannot exceed the model's.
    pub fn set_context_length(&mut self, n: usize) {
        self.context_length = self.context_length.min(n);
    }

    /// Prompt tokens per prefill chunk (at least 1).
    pub fn set_prefill_chunk(&mut self, n: usize) {
        self.prefill_chunk = n.max(1);
    }

    /// The paged KV cache (the full history).
    pub fn cache(&self) -> &PagedKvCache {
        &self.cache
    }

    /// The KV policy.
    pub fn policy(&self) -> &dyn KvPolicy {
        self.policy.as_ref()
    }

    /// The KV policy, mutably.
    pub fn policy_mut(&mut self) -> &mut dyn KvPolicy {
        self.policy.as_mut()
    }

    /// Replace the KV policy (clears the sequence, since policies keep per-sequence state).
    pub fn set_policy(&mut self, policy: Box<dyn KvPolicy>) {
        self.policy = policy;
        self.reset();
    }

    /// Logits of the last token run.
    pub fn logits(&self) -> &[f32] {
        &self.bufs.logits
    }

    /// Forget the sequence: empty the cache and reset the policy.
    pub fn reset(&mut self) {
        self.cache.clear();
        self.policy.reset();
    }

    /// Keep only the first `len` tokens of the sequence (the policy is reset: it must rebuild
    /// its state from the cache on the next prefill).
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.policy.reset();
    }
}

/// `out = x / sqrt(mean(x²) + eps) ⊙ w`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    let inv = (1.0 / (ss / x.len().max(1) as f64 + eps as f64).sqrt()) as f32;
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
}

/// [`rms_norm`] of every `w.len()`-sized row of `x`.
fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let h = w.len();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        rms_norm(xr, w, eps, or);
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// cos/sin of `pos · inv_freq[i]`, the angle computed in f64.
fn rope_table(inv_freq: &[f32], pos: usize, cos: &mut [f32], sin: &mut [f32]) {
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let a = pos as f64 * f as f64;
        *c = a.cos() as f32;
        *s = a.sin() as f32;
    }
}

/// Rotate the adjacent pairs `(x[2i], x[2i+1])`, `i < cos.len()`, of every `head_dim`-sized head.
fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for (pair, (&c, &s)) in head.chunks_exact_mut(2).zip(cos.iter().zip(sin)) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_adjacent_pairs() {
        let inv = [1.0f32, 0.5];
        let mut cos = [0.0; 2];
        let mut sin = [0.0; 2];
        rope_table(&inv, 2, &mut cos, &mut sin);
        // head_dim 6, rope_dim 4: the last pair is left alone.
        let mut x = [1.0f32, 0.0, 0.0, 1.0, 5.0, 6.0];
        rope(&mut x, 6, &cos, &sin);
        let (c0, s0) = (2.0f32.cos(), 2.0f32.sin());
        let (c1, s1) = (1.0f32.cos(), 1.0f32.sin());
        let want = [c0, s0, -s1, c1, 5.0, 6.0];
        for (a, b) in x.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{x:?} vs {want:?}");
        }
    }

    #[test]
    fn rms_norm_unit_rms() {
        let x = [3.0f32, -4.0, 0.0, 0.0];
        let w = [1.0f32, 2.0, 1.0, 1.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        let r = (25.0f32 / 4.0).sqrt();
        assert!((out[0] - 3.0 / r).abs() < 1e-6);
        assert!((out[1] + 8.0 / r).abs() < 1e-6);
    }
}
