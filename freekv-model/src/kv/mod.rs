//! KV policies selectable per run: `full`, `quest`, `arkvale` and `freekv` on the CPU backend.
//!
//! * [`KvConfig`] holds a run's choice ([`KvKind`]) and its parameters; [`build_policy`] turns it
//!   into a [`KvPolicy`] for [`LlamaModel::session_with_policy`](crate::LlamaModel::session_with_policy).
//! * [`SparseKv`] implements `quest`, `arkvale` and `freekv` (memory model and step-by-step
//!   behaviour in the [`sparse`] module docs); [`DenseKv`] is `full`.
//! * [`KvStats`] are the per-run statistics (`stats()` of the policy, printed under `kv_stats`
//!   by `freekv generate --json`), [`summary_line`] the one-line stderr summary.
//! * [`SharedKv`] lets a caller keep a handle on the policy inside a session (to read its
//!   statistics or swap it without clearing the cache, as the evaluation does).
//!
//! # Defaults (for the default model: SmolLM2-135M, 8K context, 30 layers, 3 KV heads, d = 64)
//!
//! | setting | default | why |
//! |---|---|---|
//! | `--kv` | `full` | exact; sparse policies are opt-in |
//! | `--budget` | 2048 tokens | the paper's `B` (sink + retrieved + window); a quarter of the 8K context, where FreeKV is meant to match full attention |
//! | `--page-size` | 8 | small pages make selection precise on this small model (pages of 16 lost passkeys that pages of 8 found); 8K tokens are 1024 pages, cheap to score |
//! | `--sink` | 16 (2 pages) | the first tokens collect attention mass; small, so a 128-token budget still retrieves 10 pages |
//! | `--window` | 32 (4 pages, current page included) | local syntax; recent pages that matter more are retrieved by selection |
//! | `--tau` | 0.8 | the paper's value for long-input tasks (0.9 for long generation) |
//! | `--dense-layers` | `0` | layer 0 attends broadly and its queries change fast; the paper's accuracy runs keep it dense |
//! | `--group-policy` | `mean-softmax` | the paper's MeanS, best in its ablation |
//! | `--summary` | `arkvale` | centre ± mean deviation of the post-RoPE keys: on this model it ranked the passkey page higher than exact min/max |
//!
//! The measurements behind these choices are in docs/accuracy.md.
//!
//! ```
//! use std::sync::Arc;
//! use freekv_model::kv::{KvConfig, KvKind, build_policy};
//! use freekv_model::testing::{TinyConfig, tiny_random_model};
//! use freekv_model::LlamaModel;
//!
//! let model = LlamaModel::new(Arc::new(tiny_random_model(1, &TinyConfig::default())?))?;
//! let mut cfg = KvConfig::new(KvKind::FreeKv);
//! (cfg.page_size, cfg.budget, cfg.sink, cfg.window) = (4, 24, 4, 8);
//! let policy = build_policy(&cfg, model.config().n_layers)?;
//! let mut s = model.session_with_policy(cfg.page_size, policy)?;
//! model.prefill(&mut s, &(3..60).collect::<Vec<u32>>())?;
//! for t in 0..8 {
//!     model.decode(&mut s, 10 + t)?;
//! }
//! let stats = s.policy().stats().unwrap();
//! assert!(stats["sparse_layer_steps"].as_u64().unwrap() > 0);
//! # Ok::<(), freekv_model::ModelError>(())
//! ```

mod config;
pub mod sparse;
mod stats;

use std::sync::{Arc, Mutex, MutexGuard};

use freekv_layout::PagedKvCache;

pub use config::{
    DEFAULT_BUDGET, DEFAULT_PAGE_SIZE, DEFAULT_SINK, DEFAULT_TAU, DEFAULT_WINDOW, KvConfig, KvKind,
    SpecRecall, parse_layer_list,
};
pub use sparse::{AttendedPages, SelectionTrace, SparseKv};
pub use stats::{KvStats, summary_line};

use crate::ModelError;
use crate::attention::{DenseKv, KvPolicy, LayerStep};

/// The policy `cfg` describes, for a model of `n_layers` layers (validated first).
pub fn build_policy(cfg: &KvConfig, n_layers: usize) -> Result<Box<dyn KvPolicy>, ModelError> {
    cfg.validate(n_layers)?;
    Ok(match cfg.kind {
        KvKind::Full => Box::new(DenseKv::new()),
        _ => Box::new(SparseKv::new(cfg, n_layers)?),
    })
}

/// A policy behind a shared handle: the session owns one `SharedKv`, the caller keeps a clone
/// and can read the inner policy or [`replace`](Self::replace) it (the new policy starts from
/// `reset`, and rebuilds its state from the cache at the next call, so the cache is kept).
#[derive(Clone)]
pub struct SharedKv {
    inner: Arc<Mutex<Box<dyn KvPolicy>>>,
}

impl std::fmt::Debug for SharedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKv").finish_non_exhaustive()
    }
}

impl SharedKv {
    /// Share `policy`.
    pub fn new(policy: Box<dyn KvPolicy>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(policy)),
        }
    }

    /// Lock the inner policy.
    pub fn lock(&self) -> MutexGuard<'_, Box<dyn KvPolicy>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Replace the inner policy (the old one is returned); the new one is reset.
    pub fn replace(&self, mut policy: Box<dyn KvPolicy>) -> Box<dyn KvPolicy> {
        policy.reset();
        std::mem::replace(&mut *self.lock(), policy)
    }

    /// A boxed clone of the handle, to give to a session.
    pub fn boxed(&self) -> Box<dyn KvPolicy> {
        Box::new(self.clone())
    }
}

impl KvPolicy for SharedKv {
    fn name(&self) -> &str {
        "shared"
    }
    fn reset(&mut self) {
        self.lock().reset();
    }
    fn after_prefill(&mut self, cache: &PagedKvCache) -> Result<(), ModelError> {
        self.lock().after_prefill(cache)
    }
    fn attend(
        &mut self,
        step: &LayerStep<'_>,
        cache: &mut PagedKvCache,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        self.lock().attend(step, cache, out)
    }
    fn end_step(&mut self) {
        self.lock().end_step();
    }
    fn stats(&self) -> Option<serde_json::Value> {
        self.lock().stats()
    }
}
