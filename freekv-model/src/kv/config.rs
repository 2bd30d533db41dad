//! The run configuration of a KV policy: which policy, the per-layer budget, sink, window, page
//! size, correction threshold, dense layers, GQA aggregation and summary kind — with the defaults
//! chosen for the default model and one clear error per bad combination.

use std::fmt;
use std::str::FromStr;

use freekv_layout::Budget;
use freekv_select::{CorrectionAggregate, CorrectionPolicy, GroupPolicy, SummaryKind};

use crate::ModelError;

/// Default tokens per page: small pages make selection precise on the default model (pages of 16
/// lost passkeys that pages of 8 found; docs/accuracy.md).
pub const DEFAULT_PAGE_SIZE: usize = 8;
/// Default resident tokens per sparse layer, sink and window included (the paper's `B = 2048`;
/// a quarter of the default model's 8K context).
pub const DEFAULT_BUDGET: usize = 2048;
/// Default attention-sink tokens (2 pages of 8).
pub const DEFAULT_SINK: usize = 16;
/// Default recent-window tokens, the page being written included (4 pages of 8).
pub const DEFAULT_WINDOW: usize = 32;
/// Default correction threshold (the paper's value for long-input tasks).
pub const DEFAULT_TAU: f32 = 0.8;

/// Which KV policy a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KvKind {
    /// Full attention over every cached token ([`DenseKv`](crate::DenseKv)).
    #[default]
    Full,
    /// Selection with the current query; every page is readable (no recall): the accuracy
    /// reference of page selection.
    Quest,
    /// Selection with the current query, then a synchronous recall of the missing pages into
    /// the resident slots, before attention, every sparse layer, every step.
    ArkVale,
    /// Speculative selection with the previous step's query, recalled asynchronously; correction
    /// of the KV heads whose query moved (cosine < τ) before attention.
    FreeKv,
}

impl KvKind {
    /// Every kind, in documentation order.
    pub const ALL: [KvKind; 4] = [KvKind::Full, KvKind::Quest, KvKind::ArkVale, KvKind::FreeKv];

    /// `full`, `quest`, `arkvale` or `freekv`.
    pub fn name(self) -> &'static str {
        match self {
            KvKind::Full => "full",
            KvKind::Quest => "quest",
            KvKind::ArkVale => "arkvale",
            KvKind::FreeKv => "freekv",
        }
    }
}

impl fmt::Display for KvKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "full" | "dense" => Ok(KvKind::Full),
            // On the GPU `quest` runs as `oracle` (the current query's budget, no recall cost).
            "quest" | "oracle" => Ok(KvKind::Quest),
            "arkvale" => Ok(KvKind::ArkVale),
            "freekv" => Ok(KvKind::FreeKv),
            _ => Err(ModelError::Config(format!(
                "unknown KV policy `{s}` (expected full, quest (alias oracle), arkvale or freekv)"
            ))),
        }
    }
}

/// Where `freekv`'s speculative recall runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SpecRecall {
    /// On the double-buffered executor's two worker threads, overlapping the rest of the step
    /// (the FreeKV timeline); waited for before the layer's next attention.
    #[default]
    Threads,
    /// Inline on the model's thread right after attention (same pages, same results; no overlap).
    Inline,
}

impl FromStr for SpecRecall {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "threads" | "async" => Ok(SpecRecall::Threads),
            "inline" | "sync" => Ok(SpecRecall::Inline),
            _ => Err(ModelError::Config(format!(
                "unknown recall mode `{s}` (expected threads or inline)"
            ))),
        }
    }
}

/// Parse a comma list of layer indices (`"0"`, `"0,1,29"`; empty or `none`: no dense layer).
pub fn parse_layer_list(s: &str) -> Result<Vec<usize>, ModelError> {
    let t = s.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut v = Vec::new();
    for part in t.split(',') {
        let p = part.trim();
        let n: usize = p.parse().map_err(|_| {
            ModelError::Config(format!(
                "dense layers: `{p}` is not a layer index (expected a comma list like 0,1)"
            ))
        })?;
        v.push(n);
    }
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// A KV policy configuration (see the module docs of [`kv`](crate::kv) for the defaults and why).
#[derive(Debug, Clone, PartialEq)]
pub struct KvConfig {
    /// The policy.
    pub kind: KvKind,
    /// Resident tokens per sparse layer (`B`): sink + retrieved + window.
    pub budget: usize,
    /// Attention-sink tokens (rounded up to whole pages).
    pub sink: usize,
    /// Recent-window tokens, the page being written included (rounded up to whole pages).
    pub window: usize,
    /// Tokens per page (must equal the session's page size).
    pub page_size: usize,
    /// Correction rule of `freekv` (τ, or always).
    pub correction: CorrectionPolicy,
    /// Layers that always use full attention.
    pub dense_layers: Vec<usize>,
    /// GQA group aggregation of the page scores.
    pub group_policy: GroupPolicy,
    /// Page summary kind.
    pub summary: SummaryKind,
    /// Where `freekv`'s speculative recall runs.
    pub spec_recall: SpecRecall,
    /// Check the page tables and compare every resident slot with the host pages at every sparse
    /// attention (slow; for tests).
    pub debug_checks: bool,
}

impl Default for KvConfig {
    fn default() -> Self {
        Self {
            kind: KvKind::Full,
            budget: DEFAULT_BUDGET,
            sink: DEFAULT_SINK,
            window: DEFAULT_WINDOW,
            page_size: DEFAULT_PAGE_SIZE,
            correction: CorrectionPolicy::from_tau(DEFAULT_TAU, CorrectionAggregate::Mean)
                .unwrap_or_else(|_| CorrectionPolicy::always(CorrectionAggregate::Mean)),
            dense_layers: vec![0],
            group_policy: GroupPolicy::MeanSoftmax,
            summary: SummaryKind::ArkVale,
            spec_recall: SpecRecall::Threads,
            debug_checks: false,
        }
    }
}

impl KvConfig {
    /// The default configuration of `kind`.
    pub fn new(kind: KvKind) -> Self {
        Self {
            kind,
            ..Self::default()
        }
    }

    /// Set τ from a command-line string (`always` or a number in [−1, 1]).
    pub fn set_tau(&mut self, s: &str) -> Result<(), ModelError> {
        self.correction = CorrectionPolicy::parse_tau(s, self.correction.aggregate())
            .map_err(|e| ModelError::Config(format!("--tau: {e}")))?;
        Ok(())
    }

    /// The per-layer budget in pages; the error names what to change.
    pub fn budget_pages(&self) -> Result<Budget, ModelError> {
        if self.page_size == 0 {
            return Err(ModelError::Config(
                "page size must be at least 1 token".into(),
            ));
        }
        Budget::from_tokens(self.budget, self.sink, self.window, self.page_size)
            .map_err(|e| ModelError::Config(e.to_string()))
    }

    /// Check the configuration against a model with `n_layers` layers (the budget is checked
    /// even for `full`, so that a bad flag never passes silently).
    pub fn validate(&self, n_layers: usize) -> Result<(), ModelError> {
        self.budget_pages()?;
        if let Some(&l) = self.dense_layers.iter().find(|&&l| l >= n_layers) {
            return Err(ModelError::Config(format!(
                "dense layer {l} does not exist: the model has {n_layers} layers (0..{})",
                n_layers.saturating_sub(1)
            )));
        }
        Ok(())
    }

    /// One line describing the configuration.
    pub fn describe(&self) -> String {
        match self.kind {
            KvKind::Full => "full attention".into(),
            k => {
                let b = self
                    .budget_pages()
                    .map(|b| b.to_string())
                    .unwrap_or_else(|e| e.to_string());
                let tau = if k == KvKind::FreeKv {
                    format!(", {}", self.correction)
                } else {
                    String::new()
                };
                format!(
                    "{k}: budget {} tokens ({b}), dense layers {:?}, {}, {} summaries{tau}",
                    self.budget, self.dense_layers, self.group_policy, self.summary
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_and_lists() {
        for k in KvKind::ALL {
            assert_eq!(k.name().parse::<KvKind>().unwrap(), k);
        }
        assert!("sparse".parse::<KvKind>().is_err());
        assert_eq!(parse_layer_list("2, 0,2").unwrap(), vec![0, 2]);
        assert!(parse_layer_list("none").unwrap().is_empty());
        assert!(parse_layer_list("0,x").is_err());
    }

    #[test]
    fn validation_errors_are_clear() {
        let mut c = KvConfig::new(KvKind::FreeKv);
        c.validate(30).unwrap();
        c.budget = 40;
        let e = c.validate(30).unwrap_err().to_string();
        assert!(e.contains("smaller than sink 16 + window 32"), "{e}");
        c.budget = 2048;
        c.page_size = 0;
        assert!(
            c.validate(30)
                .unwrap_err()
                .to_string()
                .contains("page size")
        );
        c.page_size = 32;
        c.dense_layers = vec![0, 30];
        let e = c.validate(30).unwrap_err().to_string();
        assert!(e.contains("dense layer 30"), "{e}");
        assert!(c.set_tau("1.5").is_err());
        assert!(c.set_tau("-1.01").is_err());
        c.set_tau("always").unwrap();
        assert!(c.correction.is_always());
        c.set_tau("0.9").unwrap();
        assert_eq!(c.correction.tau(), 0.9);
    }
}
