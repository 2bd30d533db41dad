//! The host-side arithmetic of the `cuda_freekv` bench (scenario list, percentiles, windows,
//! equal-position comparisons), in a file of its own so that `tests/bench_args.rs` checks it
//! on machines without a GPU.

/// The `q`-quantile of `v` (nearest rank); NaN when `v` is empty.
pub fn percentile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// One scenario of the bench: `context` tokens of history, then `generate` decode steps.
pub struct Scenario {
    pub name: String,
    pub context: usize,
    pub generate: usize,
    /// The model of this scenario alone (`name:context:gen:model`); `None`: every model of
    /// `FREEKV_BENCH_MODEL`.
    pub model: Option<String>,
}

/// The default scenarios: the paper's two on plain random weights (every head corrected: the
/// pessimistic end) and on the coherent models calibrated to the published correction rates
/// (S = 0.84: ~8 % of KV heads below τ = 0.8; S = 0.92: ~51 % below τ = 0.9; docs/bench/cuda-freekv.md).
pub const DEFAULT_SCENARIOS: &str = "long-input:32768:512,long-generation:1024:2048,\
long-input:32768:512:llama-3.1-8b+persistent=0.84,\
long-generation:1024:2048:llama-3.1-8b+persistent=0.92";

/// `name:context:gen[:model]`, comma-separated.
pub fn parse_scenarios(list: &str) -> Result<Vec<Scenario>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            let p: Vec<&str> = s.split(':').collect();
            if !(3..=4).contains(&p.len()) {
                return Err(format!("scenario {s:?}: want name:context:gen[:model]"));
            }
            let num = |v: &str, what: &str| {
                v.parse::<usize>()
                    .map_err(|_| format!("scenario {s:?}: {what} {v:?} is not a number"))
            };
            Ok(Scenario {
                name: p[0].to_string(),
                context: num(p[1], "context")?,
                generate: num(p[2], "gen")?,
                model: p.get(3).map(|m| m.to_string()),
            })
        })
        .collect()
}

/// The step times of `a` and `b` to compare: the last whole window both measured (equal
/// positions, the longest context both reached: in a long generation the sparse end, not a
/// median that mixes in the dense start), else, with no common window, their medians.
pub fn compared_ms(a: &serde_json::Value, b: &serde_json::Value) -> Option<(f64, f64)> {
    if a["window_steps"] == b["window_steps"] {
        let wins = |r: &serde_json::Value| -> Vec<f64> {
            r["ms_windows"]
                .as_array()
                .map(|w| w.iter().filter_map(|x| x.as_f64()).collect())
                .unwrap_or_default()
        };
        let (wa, wb) = (wins(a), wins(b));
        if let Some(i) = wa.len().min(wb.len()).checked_sub(1) {
            return Some((wa[i], wb[i]));
        }
    }
    Some((a["ms_median"].as_f64()?, b["ms_median"].as_f64()?))
}

/// Medians of consecutive whole windows of `w` steps (equal positions in the generation for
/// every policy, also for one stopped at its time cap).
pub fn window_medians(times: &[f64], w: usize) -> Vec<f64> {
    if w == 0 {
        return Vec::new();
    }
    times
        .chunks_exact(w)
        .map(|c| (percentile(c, 0.5) * 1000.0).round() / 1000.0)
        .collect()
}

/// Cumulative counters read at the end of a window of steps (`FREEKV_BENCH_WINDOW_COUNTERS`):
/// bytes recalled, of those the corrective bytes, KV heads checked and flagged.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    pub recall_bytes: u64,
    pub corrective_bytes: u64,
    pub heads_checked: u64,
    pub heads_flagged: u64,
}

/// Per window, from the counters at the start (`base`) and at the end of each window (`ends`):
/// recalled MiB per step, corrective MiB per step and the share of checked heads flagged (0
/// when none was checked), each rounded to 4 decimals. A counter that went backwards (a
/// restarted batch) counts as 0 for that window.
pub fn counter_windows(
    base: Counters,
    ends: &[Counters],
    window_steps: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let steps = window_steps.max(1) as f64;
    let mib = |b: u64| b as f64 / steps / (1u64 << 20) as f64;
    let round = |v: f64| (v * 1e4).round() / 1e4;
    let (mut recall, mut corrective, mut rate) = (Vec::new(), Vec::new(), Vec::new());
    let mut prev = base;
    for &c in ends {
        recall.push(round(mib(c.recall_bytes.saturating_sub(prev.recall_bytes))));
        corrective.push(round(mib(c
            .corrective_bytes
            .saturating_sub(prev.corrective_bytes))));
        let checked = c.heads_checked.saturating_sub(prev.heads_checked);
        let flagged = c.heads_flagged.saturating_sub(prev.heads_flagged);
        rate.push(if checked == 0 {
            0.0
        } else {
            round(flagged as f64 / checked as f64)
        });
        prev = c;
    }
    (recall, corrective, rate)
}

/// A bench policy: `base[@T][~mod…]`, e.g. `freekv@0.9~serial~cb16~sp16~specall`.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    /// `full`, `oracle`, `arkvale`, `freekv`, `freekv-spec` or `freekv-streamed`.
    pub base: String,
    /// τ given with `@T` (as written; parsed by the KV config).
    pub tau: Option<String>,
    /// `~serial` (`Some(false)`): the corrective path before the attention of every head;
    /// `~overlap` (`Some(true)`): overlapping the unflagged heads' attention; `None`: the
    /// engine's default.
    pub overlap: Option<bool>,
    /// `~cbN`: blocks of the corrective gather.
    pub correction_blocks: Option<usize>,
    /// `~gbN`: blocks of the speculative gather.
    pub gather_blocks: Option<usize>,
    /// `~spN`: spare middle slots of `freekv` (`~sp0`: none).
    pub spare_pages: Option<usize>,
    /// `~pf`: the speculative selection prefetches into the spare slots.
    pub spare_prefetch: bool,
    /// `~specall`: the speculative selection also covers the heads flagged at the step (the
    /// engine's behaviour before session 13; by default they are skipped).
    pub speculate_corrected: bool,
    /// `~rsN`: SMs the decode products leave to the speculative branch (`~rs0`: none).
    pub reserve_sms: Option<usize>,
}

/// Parses a [`PolicySpec`]; an unknown or malformed modifier is an error.
pub fn parse_policy(text: &str) -> Result<PolicySpec, String> {
    let mut parts = text.trim().split('~');
    let head = parts.next().unwrap_or_default();
    let (base, tau) = match head.split_once('@') {
        Some((p, t)) => (p, Some(t.to_string())),
        None => (head, None),
    };
    if base.is_empty() {
        return Err(format!("policy {text:?}: no policy name"));
    }
    let mut spec = PolicySpec {
        base: base.to_string(),
        tau,
        overlap: None,
        correction_blocks: None,
        gather_blocks: None,
        spare_pages: None,
        spare_prefetch: false,
        speculate_corrected: false,
        reserve_sms: None,
    };
    let blocks = |m: &str, v: &str| -> Result<usize, String> {
        match v.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!("policy {text:?}: modifier ~{m} needs a count ≥ 1")),
        }
    };
    for m in parts {
        if m == "serial" {
            spec.overlap = Some(false);
        } else if m == "overlap" {
            spec.overlap = Some(true);
        } else if m == "pf" {
            spec.spare_prefetch = true;
        } else if m == "specall" {
            spec.speculate_corrected = true;
        } else if let Some(v) = m.strip_prefix("cb") {
            spec.correction_blocks = Some(blocks(m, v)?);
        } else if let Some(v) = m.strip_prefix("gb") {
            spec.gather_blocks = Some(blocks(m, v)?);
        } else if let Some(v) = m.strip_prefix("rs") {
            spec.reserve_sms =
                Some(v.parse::<usize>().map_err(|_| {
                    format!("policy {text:?}: modifier ~{m} needs an SM count ≥ 0")
                })?);
        } else if let Some(v) = m.strip_prefix("sp") {
            spec.spare_pages =
                Some(v.parse::<usize>().map_err(|_| {
                    format!("policy {text:?}: modifier ~{m} needs a page count ≥ 0")
                })?);
        } else {
            return Err(format!(
                "policy {text:?}: unknown modifier ~{m} (serial, overlap, cbN, gbN, spN, pf, specall, rsN)"
            ));
        }
    }
    Ok(spec)
}
