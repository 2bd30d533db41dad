//! Per-run statistics of a sparse KV policy: what was sparse, how often correction fired, what
//! the recall moved, how stable selections were, and where the time went.

use serde::Serialize;
use serde_json::Value;

/// Counters of one run (since the policy was built; [`reset`](crate::KvPolicy::reset) keeps
/// them, so that a multi-request run reports totals).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KvStats {
    /// Policy name.
    pub policy: String,
    /// Decode steps (calls of `end_step`).
    pub steps: u64,
    /// (step, layer) pairs attended: dense layers, layers under budget and sparse ones.
    pub layer_steps: u64,
    /// (step, layer) pairs that ran sparse (selection over more pages than the budget).
    pub sparse_layer_steps: u64,
    /// Sparse (step, layer) pairs that were a layer's first sparse step (synchronous select +
    /// recall of every KV head, `freekv` and `arkvale`).
    pub first_sparse_steps: u64,
    /// Sparse (step, layer) pairs where the correction check ran (`freekv`).
    pub correction_checks: u64,
    /// Of those, pairs where at least one KV head was flagged (synchronous correction path).
    pub corrected_layer_steps: u64,
    /// KV heads checked (checks × KV heads).
    pub heads_checked: u64,
    /// KV heads flagged.
    pub heads_flagged: u64,
    /// Sum of the group cosines seen by the check (for the mean).
    pub cosine_sum: f64,
    /// Per-KV-head selections made.
    pub selections: u64,
    /// (page, KV head) units recalled on the critical path (first sparse steps, corrections,
    /// every `arkvale` recall).
    pub units_sync: u64,
    /// (page, KV head) units recalled speculatively (overlapping the rest of the step).
    pub units_async: u64,
    /// Bytes moved on the critical path.
    pub bytes_sync: u64,
    /// Bytes moved speculatively.
    pub bytes_async: u64,
    /// Sum over consecutive selections of one (layer, KV head) of `|prev ∩ cur| / |cur|`.
    pub overlap_sum: f64,
    /// Number of consecutive-selection pairs in `overlap_sum`.
    pub overlap_pairs: u64,
    /// Seconds in page selection (scoring, aggregation, top-k, diff).
    pub select_s: f64,
    /// Seconds in synchronous recalls (on the critical path).
    pub recall_sync_s: f64,
    /// Seconds waiting for speculative recalls before attention (on the critical path).
    pub recall_wait_s: f64,
    /// Seconds of execution of speculative recalls (off the critical path).
    pub recall_async_exec_s: f64,
    /// Seconds in sparse attention (building the block lists and the kernel).
    pub attention_s: f64,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl KvStats {
    /// Stats of a policy named `policy`.
    pub fn new(policy: &str) -> Self {
        Self {
            policy: policy.to_string(),
            ..Self::default()
        }
    }

    /// Fraction of checked sparse (step, layer) pairs where correction fired.
    pub fn correction_rate_layer_step(&self) -> f64 {
        ratio(
            self.corrected_layer_steps as f64,
            self.correction_checks as f64,
        )
    }

    /// Fraction of checked KV heads that were flagged.
    pub fn correction_rate_kv_head(&self) -> f64 {
        ratio(self.heads_flagged as f64, self.heads_checked as f64)
    }

    /// (page, KV head) units recalled per decode step (all layers).
    pub fn units_per_step(&self) -> f64 {
        ratio(
            (self.units_sync + self.units_async) as f64,
            self.steps as f64,
        )
    }

    /// Mean overlap between consecutive selections of a (layer, KV head).
    pub fn mean_overlap(&self) -> f64 {
        ratio(self.overlap_sum, self.overlap_pairs as f64)
    }

    /// The statistics as JSON, with the derived rates added.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            let mut put = |k: &str, x: f64| {
                m.insert(k.to_string(), serde_json::json!(x));
            };
            put(
                "correction_rate_layer_step",
                self.correction_rate_layer_step(),
            );
            put("correction_rate_kv_head", self.correction_rate_kv_head());
            put(
                "mean_group_cosine",
                ratio(self.cosine_sum, self.heads_checked as f64),
            );
            put("units_per_step", self.units_per_step());
            put(
                "bytes_per_step",
                ratio(
                    (self.bytes_sync + self.bytes_async) as f64,
                    self.steps as f64,
                ),
            );
            put("mean_overlap", self.mean_overlap());
            put(
                "sparse_fraction",
                ratio(self.sparse_layer_steps as f64, self.layer_steps as f64),
            );
        }
        v
    }
}

/// A one-line human summary of a policy's `stats()` JSON (as printed on stderr by the CLI);
/// `None` when the JSON is not a sparse policy's statistics.
pub fn summary_line(v: &Value) -> Option<String> {
    let g = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let name = v.get("policy")?.as_str()?;
    let mut s = format!(
        "kv {name}: sparse {}/{} step-layers",
        g("sparse_layer_steps"),
        g("layer_steps")
    );
    if g("correction_checks") > 0.0 {
        s += &format!(
            ", correction {:.1}% of step-layers / {:.1}% of KV heads (mean cos {:.3})",
            100.0 * g("correction_rate_layer_step"),
            100.0 * g("correction_rate_kv_head"),
            g("mean_group_cosine")
        );
    }
    let bytes = g("bytes_sync") + g("bytes_async");
    s += &format!(
        ", recalled {:.1} page-head units/step ({:.1} MiB, {:.0}% speculative), overlap {:.3}",
        g("units_per_step"),
        bytes / (1024.0 * 1024.0),
        100.0 * ratio(g("bytes_async"), bytes),
        g("mean_overlap")
    );
    s += &format!(
        ", select {:.2}s, recall on critical path {:.2}s",
        g("select_s"),
        g("recall_sync_s") + g("recall_wait_s")
    );
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_summary() {
        let mut s = KvStats::new("freekv");
        s.steps = 4;
        s.layer_steps = 8;
        s.sparse_layer_steps = 6;
        s.correction_checks = 4;
        s.corrected_layer_steps = 1;
        s.heads_checked = 12;
        s.heads_flagged = 3;
        s.units_sync = 6;
        s.units_async = 2;
        s.overlap_sum = 1.5;
        s.overlap_pairs = 2;
        assert_eq!(s.correction_rate_layer_step(), 0.25);
        assert_eq!(s.correction_rate_kv_head(), 0.25);
        assert_eq!(s.units_per_step(), 2.0);
        assert_eq!(s.mean_overlap(), 0.75);
        let j = s.to_json();
        assert_eq!(j["sparse_fraction"], 0.75);
        let line = summary_line(&j).unwrap();
        assert!(line.contains("25.0% of step-layers"), "{line}");
        assert!(summary_line(&serde_json::json!({"x": 1})).is_none());
        assert_eq!(KvStats::new("q").correction_rate_kv_head(), 0.0);
    }
}
