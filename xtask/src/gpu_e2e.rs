//! The end-to-end GPU matrix (backend × KV policy × batch × context), generic over the benches
//! that produce it (`cuda_decode` today, `cuda_freekv` or any other later): rows come from
//! each bench's JSON side file (`FREEKV_BENCH_JSON`, a `rows` list) or, when a bench wrote
//! none (stopped at the time budget, or it does not write one), from its criterion ids
//! (`.../b4/ctx32768/freekv@2048`). A new policy or a new field in the rows shows up in the
//! table and the plots with no change here.
//!
//! Row fields read (all optional but `batch`, `context` and `ms_per_step`): `model`,
//! `scenario`, `policy` (default `full`), `backend` (default `cuda`), `batch`, `context`,
//! `budget`, `gen` (steps), `ms_per_step`, `ms_p90`, `ms_quarters`, `steps_measured`,
//! `ms_windows` and `window_steps` (see [`speed_vs`]), `floor_ms`, `recall_gbs`,
//! `correction_rate` (0..1), `gpu_mem_gb` / `gpu_used_gib`, `host_mem_gb` / `host_kv_gib`,
//! `matmul_ms`, `note`; the names `cuda_freekv` uses are read too (`ms_median`, a top-level
//! `model`, `stats.head_correction_rate`, `error`, `skipped`). Any other number, string or
//! boolean becomes a column of its own.

use crate::criterion::Estimate;
use crate::report::{opt, table};
use crate::svg;
use serde_json::{Map, Value, json};
use std::fmt::Write;

/// KV policy names recognised in criterion ids.
pub const POLICIES: &[&str] = &["full", "oracle", "arkvale", "freekv", "quest"];

/// Baselines of the ratio columns, in order.
pub const BASELINES: &[&str] = &["full", "oracle", "arkvale"];

/// What a criterion id says about a matrix cell.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdKey {
    /// Unrecognised path components after the group, joined with `/`.
    pub model: Option<String>,
    /// A KV policy named in the id.
    pub policy: Option<String>,
    /// `policy@budget`, or a `budgetN` token.
    pub budget: Option<u64>,
    /// `bN` or `batchN`.
    pub batch: Option<u64>,
    /// `ctxN` or `contextN`, else a bare number.
    pub context: Option<u64>,
}

fn num_after(tok: &str, prefix: &str) -> Option<u64> {
    tok.strip_prefix(prefix)
        .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|r| r.parse().ok())
}

/// Parses a criterion id such as `cuda_decode/llama-3.1-8b/b8/ctx4096` or
/// `cuda_freekv_llama8b/freekv@2048/b4_ctx32768`: each `/` component is split at `_` and its
/// tokens recognised (`bN`, `batchN`, `ctxN`, `contextN`, `budgetN`, a policy with an optional
/// `@budget`, a bare number as the context); components after the first (the group) whose
/// tokens are not all recognised form the model.
pub fn parse_id(id: &str) -> IdKey {
    let mut k = IdKey::default();
    let mut model: Vec<String> = Vec::new();
    // A policy in the group name (`cuda_freekv_...`) counts only when no later part names one.
    let mut group_policy: Option<String> = None;
    for (i, comp) in id.split('/').enumerate() {
        let mut rest: Vec<&str> = Vec::new();
        for tok in comp.split('_') {
            let (word, at) = match tok.split_once('@') {
                Some((w, b)) => (w, b.parse::<u64>().ok()),
                None => (tok, None),
            };
            if POLICIES.contains(&word) && i == 0 {
                group_policy.get_or_insert_with(|| word.to_string());
                k.budget = k.budget.or(at);
            } else if POLICIES.contains(&word) && k.policy.is_none() {
                k.policy = Some(word.to_string());
                k.budget = k.budget.or(at);
            } else if let Some(n) = num_after(tok, "batch").or_else(|| num_after(tok, "b")) {
                k.batch = Some(n);
            } else if let Some(n) = num_after(tok, "context").or_else(|| num_after(tok, "ctx")) {
                k.context = Some(n);
            } else if let Some(n) = num_after(tok, "budget") {
                k.budget = Some(n);
            } else if i > 0 && k.context.is_none() && num_after(tok, "").is_some() {
                k.context = num_after(tok, "");
            } else {
                rest.push(tok);
            }
        }
        if i > 0 && !rest.is_empty() {
            model.push(rest.join("_"));
        }
    }
    if !model.is_empty() {
        k.model = Some(model.join("/"));
    }
    k.policy = k.policy.or(group_policy);
    k
}

/// A model name without the `synthetic:` mark and any ` (...)` remark (criterion ids carry
/// the bare name).
pub fn model_short(m: &str) -> &str {
    let m = m.trim_start_matches("synthetic:");
    m.split(" (").next().unwrap_or(m)
}

/// Fills a side-file row's canonical fields from the names benches use for them:
/// `ms_median` → `ms_per_step`; the file's top-level `model` (its ` (...)` remark cut);
/// `stats.head_correction_rate` → `correction_rate`; `error` / `skipped` → `note`.
fn canonical(row: &mut Map<String, Value>, top_model: Option<&str>) {
    if !row.contains_key("ms_per_step")
        && let Some(m) = row.get("ms_median").cloned()
    {
        row.insert("ms_per_step".into(), m);
    }
    if !row.contains_key("model")
        && let Some(m) = top_model
    {
        row.insert("model".into(), json!(m));
    }
    if let Some(m) = row.get("model").and_then(Value::as_str) {
        let cut = m.split(" (").next().unwrap_or(m).to_string();
        row.insert("model".into(), json!(cut));
    }
    if !row.contains_key("correction_rate")
        && let Some(c) = row
            .get("stats")
            .and_then(|s| s.get("head_correction_rate"))
            .filter(|c| c.is_number())
            .cloned()
    {
        row.insert("correction_rate".into(), c);
    }
    if row.get("note").is_none_or(|n| n == "") {
        if let Some(e) = row.get("error").filter(|e| !e.is_null()) {
            let e = e.as_str().map_or_else(|| e.to_string(), str::to_string);
            row.insert("note".into(), json!(format!("failed: {e}")));
        } else if let Some(k) = row.get("skipped").filter(|k| !k.is_null()) {
            let k = k.as_str().map_or_else(|| k.to_string(), str::to_string);
            row.insert("note".into(), json!(format!("skipped: {k}")));
        }
    }
}

fn u(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn st<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// The row's policy (`full` when absent).
pub fn policy(r: &Value) -> &str {
    r.get("policy").and_then(Value::as_str).unwrap_or("full")
}

fn backend(r: &Value) -> &str {
    r.get("backend").and_then(Value::as_str).unwrap_or("cuda")
}

fn with_estimate(row: &mut Map<String, Value>, e: &Estimate) {
    row.insert("spread_pct".into(), json!(e.spread_pct()));
    row.insert(
        "median_ci_ms".into(),
        json!([e.median_ci_ns.0 / 1e6, e.median_ci_ns.1 / 1e6]),
    );
    row.insert("criterion_id".into(), json!(e.id));
}

/// The matrix rows of one bench: from its side file's `rows` when there are any (each tagged
/// with the bench, default policy and backend, and the criterion spread of the matching id),
/// else from its criterion ids that name a batch and a context. Returns the side file's other
/// fields (device, bandwidth, ...) and the rows.
pub fn bench_rows(bench: &str, side: Option<&Value>, ests: &[Estimate]) -> (Value, Vec<Value>) {
    let keys: Vec<(IdKey, &Estimate)> = ests.iter().map(|e| (parse_id(&e.id), e)).collect();
    let mut meta = Map::new();
    let mut rows = Vec::new();
    let side_rows = side
        .and_then(|s| s.get("rows"))
        .and_then(Value::as_array)
        .filter(|r| !r.is_empty());
    if let Some(side_rows) = side_rows {
        if let Some(obj) = side.and_then(Value::as_object) {
            for (k, v) in obj.iter().filter(|(k, _)| k.as_str() != "rows") {
                meta.insert(k.clone(), v.clone());
            }
        }
        meta.insert("source".into(), json!("side file"));
        let top_model = side.and_then(|s| s.get("model")).and_then(Value::as_str);
        for r in side_rows {
            let Some(obj) = r.as_object() else { continue };
            let mut row = obj.clone();
            canonical(&mut row, top_model);
            row.insert("bench".into(), json!(bench));
            row.entry("policy").or_insert(json!("full"));
            row.entry("backend").or_insert(json!("cuda"));
            let rv = Value::Object(row.clone());
            let m = model_short(st(&rv, "model"));
            let hit = keys.iter().find(|(k, e)| {
                k.batch == u(&rv, "batch")
                    && k.context == u(&rv, "context")
                    && k.policy.as_deref().unwrap_or("full") == policy(&rv)
                    && (m.is_empty() || e.id.contains(m))
            });
            if let Some((_, e)) = hit {
                with_estimate(&mut row, e);
                if f(&rv, "ms_per_step").is_none() && rv.get("note").is_none_or(|n| n == "") {
                    row.insert("ms_per_step".into(), json!(e.median_ns / 1e6));
                }
            }
            rows.push(Value::Object(row));
        }
    } else {
        meta.insert("source".into(), json!("criterion ids"));
        for (k, e) in &keys {
            let (Some(b), Some(c)) = (k.batch, k.context) else {
                continue;
            };
            let mut row = Map::new();
            row.insert("bench".into(), json!(bench));
            row.insert("backend".into(), json!("cuda"));
            row.insert(
                "model".into(),
                json!(k.model.clone().unwrap_or_else(|| bench.to_string())),
            );
            row.insert(
                "policy".into(),
                json!(k.policy.clone().unwrap_or_else(|| "full".into())),
            );
            row.insert("batch".into(), json!(b));
            row.insert("context".into(), json!(c));
            if let Some(bu) = k.budget {
                row.insert("budget".into(), json!(bu));
            }
            row.insert("ms_per_step".into(), json!(e.median_ns / 1e6));
            with_estimate(&mut row, e);
            rows.push(Value::Object(row));
        }
    }
    if rows.is_empty() {
        meta.insert(
            "source".into(),
            json!("none (no side file, no criterion id naming a batch and a context)"),
        );
    }
    (Value::Object(meta), rows)
}

/// The GPU matrix rows of a results file (`gpu_e2e.rows`; results of the first version kept
/// them under `cuda_decode.rows`).
pub fn rows(res: &Value) -> Vec<Value> {
    if let Some(r) = res
        .get("gpu_e2e")
        .and_then(|g| g.get("rows"))
        .and_then(Value::as_array)
    {
        return r.clone();
    }
    res.get("cuda_decode")
        .and_then(|c| c.get("rows"))
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .map(|x| {
                    let mut x = x.clone();
                    if let Some(o) = x.as_object_mut() {
                        o.entry("bench").or_insert(json!("cuda_decode"));
                    }
                    x
                })
                .collect()
        })
        .unwrap_or_default()
}

fn same_cell(a: &Value, b: &Value) -> bool {
    let (sa, sb) = (st(a, "scenario"), st(b, "scenario"));
    model_short(st(a, "model")) == model_short(st(b, "model"))
        && (sa == sb || sa.is_empty() || sb.is_empty())
        && backend(a) == backend(b)
        && u(a, "batch") == u(b, "batch")
        && u(a, "context") == u(b, "context")
}

/// The baseline row (`base` policy, same model, backend, batch and context), from the same
/// bench when it has one.
pub fn baseline<'a>(rows: &'a [Value], r: &Value, base: &str) -> Option<&'a Value> {
    let cands = || {
        rows.iter()
            .filter(move |x| policy(x) == base && same_cell(x, r) && f(x, "ms_per_step").is_some())
    };
    cands()
        .find(|x| x.get("bench") == r.get("bench"))
        .or_else(|| cands().next())
}

/// Speed of `r` against its `base` row: base ms ÷ row ms (> 1: faster). When both have
/// `ms_windows` of the same `window_steps`, the last window both measured is compared: equal
/// positions, at the longest context both reached (a row stopped at its time cap has a median
/// over a shorter stretch, and in a long generation a median mixes the dense start in with the
/// sparse end). Otherwise the medians.
pub fn speed_vs(rows: &[Value], r: &Value, base: &str) -> Option<f64> {
    if policy(r) == base {
        return None;
    }
    let b = baseline(rows, r, base)?;
    if let Some((bm, rm)) = equal_position_ms(b, r) {
        return Some(bm / rm);
    }
    let ms = f(r, "ms_per_step").filter(|m| *m > 0.0)?;
    Some(f(b, "ms_per_step")? / ms)
}

/// The step times of `a` and `b` in the last window both measured, when both report
/// `ms_windows` of the same `window_steps`.
fn equal_position_ms(a: &Value, b: &Value) -> Option<(f64, f64)> {
    if u(a, "window_steps")? != u(b, "window_steps")? {
        return None;
    }
    let wins = |r: &Value| -> Option<Vec<f64>> {
        r.get("ms_windows")?
            .as_array()?
            .iter()
            .map(Value::as_f64)
            .collect()
    };
    let (wa, wb) = (wins(a)?, wins(b)?);
    let i = wa.len().min(wb.len()).checked_sub(1)?;
    Some((wa[i], wb[i])).filter(|(x, y)| *x > 0.0 && *y > 0.0)
}

fn hf_ms(res: &Value, form: &str, r: &Value) -> Option<f64> {
    res.get("peers")?
        .get("hf")?
        .get("rows")?
        .as_array()?
        .iter()
        .find(|h| {
            st(h, "form") == form
                && u(h, "batch") == u(r, "batch")
                && u(h, "context") == u(r, "context")
                && (st(h, "model").is_empty()
                    || model_short(st(h, "model")) == model_short(st(r, "model")))
        })
        .and_then(|h| f(h, "ms_per_step"))
}

/// Keys with a column of their own (or deliberately left to the JSON).
const KNOWN: &[&str] = &[
    "bench",
    "backend",
    "model",
    "scenario",
    "gen",
    "policy",
    "ms_p90",
    "ms_quarters",
    "ms_windows",
    "window_steps",
    "gpu_used_gib",
    "host_kv_gib",
    // Aliases and details left to the JSON.
    "ms_median",
    "ms_mean",
    "tokens_per_s",
    "synthetic",
    "stats",
    "error",
    "skipped",
    "gpu_used_end_gib",
    "setup_s",
    "batch",
    "context",
    "budget",
    "ms_per_step",
    "spread_pct",
    "median_ci_ms",
    "criterion_id",
    "floor_ms",
    "recall_gbs",
    "correction_rate",
    "gpu_mem_gb",
    "host_mem_gb",
    "matmul_ms",
    "note",
    "weight_gb",
    "kv_gb",
    "graph",
    "id",
];

fn fmt_extra(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(x) if x.fract() == 0.0 && x.abs() < 1e15 => format!("{x:.0}"),
            Some(x) if x.abs() >= 100.0 => format!("{x:.1}"),
            Some(x) => format!("{x:.3}"),
            None => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// Builds a table from named columns, leaving out the columns that are empty in every row.
fn sparse_table(cols: Vec<(String, Vec<String>)>, right_from: usize) -> String {
    let keep: Vec<&(String, Vec<String>)> = cols
        .iter()
        .filter(|(_, cells)| cells.iter().any(|c| !c.is_empty() && c != "-"))
        .collect();
    let n = keep.first().map_or(0, |c| c.1.len());
    let header: Vec<&str> = keep.iter().map(|c| c.0.as_str()).collect();
    let rows: Vec<Vec<String>> = (0..n)
        .map(|i| keep.iter().map(|c| c.1[i].clone()).collect())
        .collect();
    // Right-align from the first kept numeric column.
    let lead = cols
        .iter()
        .take(right_from)
        .filter(|c| keep.iter().any(|k| k.0 == c.0))
        .count();
    table(&header, &rows, lead)
}

/// Renders the GPU matrix section of a results file ("" when it has no GPU rows).
pub fn render(res: &Value) -> String {
    let rows = rows(res);
    if rows.is_empty() {
        return String::new();
    }
    let c = res.get("ceilings").cloned().unwrap_or(Value::Null);
    let h2d = f(&c, "h2d_pinned_gbs");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### GPU end to end: decode step, backend × KV policy × batch × context\n"
    );
    let benches = res
        .get("gpu_e2e")
        .and_then(|g| g.get("benches"))
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_else(|| {
            let mut m = Map::new();
            if let Some(cd) = res.get("cuda_decode") {
                m.insert("cuda_decode".into(), cd.clone());
            }
            m
        });
    for (name, meta) in &benches {
        let mut parts = Vec::new();
        if let Some(d) = meta.get("device").and_then(Value::as_str) {
            parts.push(format!("device {d}"));
        }
        if meta.get("synthetic").and_then(Value::as_bool) == Some(true) {
            parts.push(
                "synthetic models (seeded random bf16 weights of the named shape)".to_string(),
            );
        }
        if let Some(bw) = f(meta, "copy_bandwidth_gbs") {
            parts.push(format!(
                "device-copy bandwidth measured by the bench {bw:.0} GB/s (its floors use it)"
            ));
        }
        if let Some(s) = meta.get("source").and_then(Value::as_str) {
            parts.push(if s.starts_with("none") {
                format!("no rows: {s}")
            } else {
                format!("rows from its {s}")
            });
        }
        let _ = writeln!(out, "* `{name}`: {}.", parts.join("; "));
    }
    out.push('\n');
    let multi_bench = benches.len() > 1
        || rows
            .iter()
            .any(|r| r.get("bench") != rows.first().and_then(|x| x.get("bench")));
    let col = |name: &str, cells: Vec<String>| (name.to_string(), cells);
    let map = |g: &dyn Fn(&Value) -> String| rows.iter().map(g).collect::<Vec<String>>();
    let mut cols = vec![
        col(
            "bench",
            if multi_bench {
                map(&|r| st(r, "bench").to_string())
            } else {
                vec![String::new(); rows.len()]
            },
        ),
        col(
            "backend",
            if rows.iter().any(|r| backend(r) != "cuda") {
                map(&|r| backend(r).to_string())
            } else {
                vec![String::new(); rows.len()]
            },
        ),
        col("model", map(&|r| st(r, "model").to_string())),
        col("scenario", map(&|r| st(r, "scenario").to_string())),
        col("policy", map(&|r| policy(r).to_string())),
        col("batch", map(&|r| opt(f(r, "batch"), 0))),
        col("context", map(&|r| opt(f(r, "context"), 0))),
        col("budget", map(&|r| opt(f(r, "budget"), 0))),
        col("steps", map(&|r| opt(f(r, "gen"), 0))),
        col("ms/step", map(&|r| opt(f(r, "ms_per_step"), 3))),
        col(
            "MAD",
            map(&|r| f(r, "spread_pct").map_or("-".into(), |x| format!("±{x:.1} %"))),
        ),
        col("p90 ms", map(&|r| opt(f(r, "ms_p90"), 3))),
        col(
            "ms/step by quarter",
            map(&|r| {
                r.get("ms_quarters")
                    .and_then(Value::as_array)
                    .map(|q| {
                        q.iter()
                            .map(|x| opt(x.as_f64(), 2))
                            .collect::<Vec<_>>()
                            .join(" / ")
                    })
                    .unwrap_or_else(|| "-".into())
            }),
        ),
        col(
            "tokens/s",
            map(&|r| match (f(r, "batch"), f(r, "ms_per_step")) {
                (Some(b), Some(ms)) if ms > 0.0 => format!("{:.0}", b * 1e3 / ms),
                _ => "-".into(),
            }),
        ),
    ];
    for base in BASELINES {
        cols.push(col(
            &format!("vs {base}"),
            map(&|r| speed_vs(&rows, r, base).map_or("-".into(), |x| format!("{x:.2}×"))),
        ));
    }
    cols.extend([
        col("HBM floor ms", map(&|r| opt(f(r, "floor_ms"), 3))),
        col(
            "ratio to floor",
            map(&|r| match (f(r, "ms_per_step"), f(r, "floor_ms")) {
                (Some(a), Some(fl)) if fl > 0.0 => format!("{:.2}", a / fl),
                _ => "-".into(),
            }),
        ),
        col("recall GB/s", map(&|r| opt(f(r, "recall_gbs"), 1))),
        col(
            "of H2D pinned",
            map(&|r| match (f(r, "recall_gbs"), h2d) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.0} %", 100.0 * a / b),
                _ => "-".into(),
            }),
        ),
        col(
            "correction rate",
            map(&|r| f(r, "correction_rate").map_or("-".into(), |x| format!("{:.1} %", 100.0 * x))),
        ),
        col("GPU mem GB", map(&|r| opt(f(r, "gpu_mem_gb"), 1))),
        col("host mem GB", map(&|r| opt(f(r, "host_mem_gb"), 1))),
        col("GPU GiB used", map(&|r| opt(f(r, "gpu_used_gib"), 2))),
        col("host KV GiB", map(&|r| opt(f(r, "host_kv_gib"), 2))),
        col("GEMMs alone ms", map(&|r| opt(f(r, "matmul_ms"), 3))),
        col("HF eager ms", map(&|r| opt(hf_ms(res, "eager", r), 2))),
        col(
            "HF compiled ms",
            map(&|r| opt(hf_ms(res, "compiled", r), 2)),
        ),
        col(
            "speedup vs HF compiled",
            map(
                &|r| match (f(r, "ms_per_step"), hf_ms(res, "compiled", r)) {
                    (Some(a), Some(h)) if a > 0.0 => format!("{:.2}×", h / a),
                    _ => "-".into(),
                },
            ),
        ),
    ]);
    // Any other field of the rows, in order of first appearance.
    let mut extra: Vec<String> = Vec::new();
    for r in &rows {
        if let Some(o) = r.as_object() {
            for (k, v) in o {
                if !KNOWN.contains(&k.as_str())
                    && !extra.contains(k)
                    && matches!(v, Value::Number(_) | Value::String(_) | Value::Bool(_))
                {
                    extra.push(k.clone());
                }
            }
        }
    }
    for k in &extra {
        cols.push(col(
            k,
            map(&|r| {
                r.get(k.as_str())
                    .map(fmt_extra)
                    .filter(|x| !x.is_empty())
                    .unwrap_or_else(|| "-".into())
            }),
        ));
    }
    cols.push(col("note", map(&|r| st(r, "note").to_string())));
    out.push_str(&sparse_table(cols, 5));
    let _ = writeln!(
        out,
        "\nms/step: median time of one decode step of the whole batch (criterion's median, MAD its \
         median absolute deviation; or the bench's own median over its generated steps, p90 and \
         per quarter of the generation beside it). `vs full` / `vs oracle` / `vs arkvale`: speed against that policy at the same \
         model, batch and context (its ms ÷ this row's ms; > 1 is faster; in the last window of steps \
         both measured, `ms_windows`, when the bench reports windows: equal positions at the \
         longest context both reached, also when one stopped at its time cap). HBM floor: the bytes a \
         step must read (weights + KV attended) ÷ the device-copy bandwidth. Recall GB/s against \
         the host → device pinned bandwidth measured in this run. HF: Hugging Face transformers on \
         the same shapes (`--peer hf`), full attention.\n"
    );
    let t = targets(res, &rows);
    if !t.is_empty() {
        let _ = writeln!(out, "Against the targets of issues 4 and 5:\n");
        for l in t {
            let _ = writeln!(out, "* {l}");
        }
        out.push('\n');
    }
    out
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "not met" }
}

fn cell(r: &Value) -> String {
    let sc = st(r, "scenario");
    format!(
        "{}{} b{} ctx {}",
        model_short(st(r, "model")),
        if sc.is_empty() {
            String::new()
        } else {
            format!(" {sc}")
        },
        u(r, "batch").unwrap_or(0),
        u(r, "context").unwrap_or(0)
    )
}

/// One line per target with data: freekv ≤ 1.10× oracle's step time; freekv ≥ 13.7× faster
/// than arkvale at batch 4; recall ≥ 45 GB/s; full ≥ 1.5× compiled HF's tokens/s; full ≤ 1.25×
/// the HBM floor at batch 1.
pub fn targets(res: &Value, rows: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    let worst = |it: Vec<(f64, String)>, max: bool| {
        it.into_iter()
            .reduce(|a, b| if (b.0 > a.0) == max { b } else { a })
    };
    // Each FreeKV variant the matrix has (`freekv`, `freekv-spec`, `freekv-streamed`, ...).
    let mut variants: Vec<&str> = Vec::new();
    for r in rows {
        let p = policy(r);
        if p.starts_with("freekv") && !variants.contains(&p) {
            variants.push(p);
        }
    }
    // One verdict per model when the matrix has several (plain random weights and a coherent
    // `+persistent=S` model answer different questions).
    let mut models: Vec<&str> = Vec::new();
    for r in rows {
        let m = model_short(st(r, "model"));
        if !models.contains(&m) {
            models.push(m);
        }
    }
    let tag = |m: &str| {
        if models.len() > 1 {
            format!(" [{m}]")
        } else {
            String::new()
        }
    };
    for v in &variants {
        for m in &models {
            let of = |r: &&Value| policy(r) == *v && model_short(st(r, "model")) == *m;
            let fo: Vec<(f64, String)> = rows
                .iter()
                .filter(of)
                .filter_map(|r| Some((1.0 / speed_vs(rows, r, "oracle")?, cell(r))))
                .collect();
            if let Some((x, at)) = worst(fo, true) {
                out.push(format!(
                    "{v} step time ≤ 1.10× oracle's{}: {} (worst {x:.2}× at {at})",
                    tag(m),
                    met(x <= 1.10)
                ));
            }
            let fa: Vec<(f64, String)> = rows
                .iter()
                .filter(of)
                .filter(|r| u(r, "batch") == Some(4))
                .filter_map(|r| Some((speed_vs(rows, r, "arkvale")?, cell(r))))
                .collect();
            if let Some((x, at)) = worst(fa, true) {
                out.push(format!(
                    "{v} ≥ 13.7× faster than arkvale at batch 4{}: {} (best {x:.2}× at {at})",
                    tag(m),
                    met(x >= 13.7)
                ));
            }
        }
    }
    let mut rec: Vec<(f64, String)> = rows
        .iter()
        .filter_map(|r| Some((f(r, "recall_gbs")?, format!("{} {}", policy(r), cell(r)))))
        .collect();
    // The recall micro-benchmarks, without their reference rows (`h2d_ceiling`: one pinned copy
    // of the same bytes, the link's ceiling, not a recall).
    rec.extend(
        gpu_recall_bars(res)
            .into_iter()
            .filter(|(_, id)| !id.contains("ceiling")),
    );
    if let Some((x, at)) = worst(rec, true) {
        out.push(format!(
            "recall ≥ 45 GB/s: {} (best {x:.1} GB/s, {at})",
            met(x >= 45.0)
        ));
    }
    let hf: Vec<(f64, String)> = rows
        .iter()
        .filter(|r| policy(r) == "full")
        .filter_map(|r| {
            let ms = f(r, "ms_per_step").filter(|m| *m > 0.0)?;
            Some((hf_ms(res, "compiled", r)? / ms, cell(r)))
        })
        .collect();
    if let Some((x, at)) = worst(hf, false) {
        out.push(format!(
            "full ≥ 1.5× compiled HF's tokens/s: {} (lowest {x:.2}× at {at})",
            met(x >= 1.5)
        ));
    }
    let fl: Vec<(f64, String)> = rows
        .iter()
        .filter(|r| policy(r) == "full" && u(r, "batch") == Some(1))
        .filter_map(|r| {
            Some((
                f(r, "ms_per_step")? / f(r, "floor_ms").filter(|x| *x > 0.0)?,
                cell(r),
            ))
        })
        .collect();
    if let Some((x, at)) = worst(fl, true) {
        out.push(format!(
            "full ≤ 1.25× the HBM floor at batch 1: {} (worst {x:.2}× at {at})",
            met(x <= 1.25)
        ));
    }
    out
}

/// GB/s of the GPU recall criterion benchmarks (a group or bench naming recall, run on the
/// GPU), labelled by id.
pub fn gpu_recall_bars(res: &Value) -> Vec<(f64, String)> {
    let gpu_benches = gpu_bench_names(res);
    res.get("criterion")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|v| {
                    crate::report::is_recall_estimate(v)
                        && crate::report::is_gpu_estimate(v, &gpu_benches)
                })
                .filter_map(|v| {
                    let e = Estimate::from_json(v).ok()?;
                    Some((e.bytes_per_s()? / 1e9, e.id))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Names of the benches a results file ran as GPU-only benches.
pub fn gpu_bench_names(res: &Value) -> Vec<String> {
    res.get("gpu_benches")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn series_by(
    rows: &[Value],
    key: impl Fn(&Value) -> Option<String>,
    xy: impl Fn(&Value) -> Option<(f64, f64)>,
) -> Vec<svg::Series> {
    let mut out: Vec<svg::Series> = Vec::new();
    for r in rows {
        let (Some(k), Some(p)) = (key(r), xy(r)) else {
            continue;
        };
        match out.iter_mut().find(|s| s.name == k) {
            Some(s) => s.points.push(p),
            None => out.push(svg::Series {
                name: k,
                points: vec![p],
            }),
        }
    }
    out
}

/// A context for a legend: `32768` → `32K`.
pub fn ctx_label(c: u64) -> String {
    if c >= 1024 && c.is_multiple_of(1024) {
        format!("{}K", c / 1024)
    } else {
        c.to_string()
    }
}

/// The GPU plots of a results file, as (file name, SVG text): step time against context per
/// policy; speedup of each policy against full (and of each freekv variant against arkvale) against batch
/// size, when the matrix has policies besides full; throughput against batch size relative to
/// batch 1. (The recall GB/s bars are drawn with the CPU's, in one plot per host.)
pub fn plots(res: &Value, host: &str) -> Vec<(String, String)> {
    let rows = rows(res);
    let mut out = Vec::new();
    if rows.is_empty() {
        return out;
    }
    let models: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| model_short(st(r, "model"))).collect();
    let lead_model = |r: &Value| {
        if models.len() > 1 {
            format!("{} ", model_short(st(r, "model")))
        } else {
            String::new()
        }
    };
    let s = series_by(
        &rows,
        |r| {
            Some(format!(
                "{}b{} {}",
                lead_model(r),
                u(r, "batch")?,
                policy(r)
            ))
        },
        |r| Some((f(r, "context")?, f(r, "ms_per_step")?)),
    );
    out.push((
        format!("step-time-cuda-{host}.svg"),
        svg::line_plot_ext(
            "GPU decode step time against context, per KV policy and batch",
            "context (tokens, log scale)",
            "ms per step (median, log scale)",
            &s,
            true,
            true,
        ),
    ));
    let mut sp = series_by(
        &rows,
        |r| {
            (policy(r) != "full").then(|| {
                format!(
                    "{}{} vs full, ctx {}",
                    lead_model(r),
                    policy(r),
                    ctx_label(u(r, "context").unwrap_or(0))
                )
            })
        },
        |r| Some((f(r, "batch")?, speed_vs(&rows, r, "full")?)),
    );
    sp.extend(series_by(
        &rows,
        |r| {
            policy(r).starts_with("freekv").then(|| {
                format!(
                    "{}{} vs arkvale, ctx {}",
                    lead_model(r),
                    policy(r),
                    ctx_label(u(r, "context").unwrap_or(0))
                )
            })
        },
        |r| Some((f(r, "batch")?, speed_vs(&rows, r, "arkvale")?)),
    ));
    if !sp.is_empty() {
        out.push((
            format!("speedup-batch-{host}.svg"),
            svg::line_plot(
                "Speedup of the KV policies against batch size (same model and context)",
                "batch (log scale)",
                "baseline ms ÷ policy ms",
                &sp,
                true,
            ),
        ));
    }
    let one = |r: &Value| {
        rows.iter()
            .find(|x| {
                u(x, "batch") == Some(1)
                    && policy(x) == policy(r)
                    && model_short(st(x, "model")) == model_short(st(r, "model"))
                    && u(x, "context") == u(r, "context")
                    && backend(x) == backend(r)
            })
            .and_then(|x| f(x, "ms_per_step"))
    };
    let tp = series_by(
        &rows,
        |r| {
            Some(format!(
                "{}ctx {} {}",
                lead_model(r),
                ctx_label(u(r, "context")?),
                policy(r)
            ))
        },
        |r| {
            let b = f(r, "batch")?;
            Some((b, b * one(r)? / f(r, "ms_per_step")?))
        },
    );
    if tp.iter().any(|s| s.points.iter().any(|p| p.0 > 1.0)) {
        out.push((
            format!("throughput-batch-{host}.svg"),
            svg::line_plot(
                "GPU decode throughput against batch size, relative to batch 1",
                "batch (log scale)",
                "tokens/s ÷ batch-1 tokens/s",
                &tp,
                true,
            ),
        ));
    }
    out
}

/// Recall bars of the GPU matrix rows (`recall_gbs`).
pub fn row_recall_bars(res: &Value) -> Vec<(String, f64)> {
    rows(res)
        .iter()
        .filter_map(|r| {
            Some((
                format!(
                    "{} {} b{} ctx {}",
                    st(r, "bench"),
                    policy(r),
                    u(r, "batch")?,
                    u(r, "context")?
                ),
                f(r, "recall_gbs")?,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criterion::Throughput;

    fn est(id: &str, ms: f64) -> Estimate {
        Estimate {
            id: id.into(),
            group: id.split('/').next().unwrap().into(),
            median_ns: ms * 1e6,
            median_ci_ns: (ms * 0.99e6, ms * 1.01e6),
            mad_ns: ms * 0.02e6,
            mean_ns: ms * 1e6,
            std_dev_ns: 1.0,
            throughput: None,
        }
    }

    #[test]
    fn ids_parse_into_cells() {
        let k = parse_id("cuda_decode/llama-3.1-8b/b8/ctx4096");
        assert_eq!(
            k,
            IdKey {
                model: Some("llama-3.1-8b".into()),
                policy: None,
                budget: None,
                batch: Some(8),
                context: Some(4096)
            }
        );
        let k = parse_id("cuda_freekv_llama8b/freekv@2048/b4_ctx32768");
        assert_eq!(k.policy.as_deref(), Some("freekv"));
        assert_eq!(
            (k.budget, k.batch, k.context),
            (Some(2048), Some(4), Some(32768))
        );
        assert_eq!(k.model, None);
        let k = parse_id("decode_attention_llama8b_layer/b32/4096");
        assert_eq!((k.batch, k.context), (Some(32), Some(4096)));
        let k = parse_id("g/qwen-2.5-7b/arkvale/batch16/context1024/budget512");
        assert_eq!(k.policy.as_deref(), Some("arkvale"));
        assert_eq!(
            (k.budget, k.batch, k.context),
            (Some(512), Some(16), Some(1024))
        );
        assert_eq!(k.model.as_deref(), Some("qwen-2.5-7b"));
        assert_eq!(
            parse_id("encode/text-5k"),
            IdKey {
                model: Some("text-5k".into()),
                ..IdKey::default()
            }
        );
    }

    #[test]
    fn rows_from_a_side_file_get_defaults_and_spreads() {
        let side = json!({"device": "H200", "copy_bandwidth_gbs": 4000.0, "synthetic": true, "rows": [
            {"model": "synthetic:llama-3.1-8b", "batch": 1, "context": 4096, "ms_per_step": 5.0, "floor_ms": 4.0},
            {"model": "synthetic:llama-3.1-8b", "batch": 32, "context": 32768, "ms_per_step": null,
             "note": "does not fit"}]});
        let ests = [
            est("cuda_decode/llama-3.1-8b/b1/ctx4096", 5.1),
            est("cuda_decode/qwen-2.5-7b/b1/ctx4096", 4.9),
        ];
        let (meta, rows) = bench_rows("cuda_decode", Some(&side), &ests);
        assert_eq!(meta["copy_bandwidth_gbs"], 4000.0);
        assert_eq!(meta["source"], "side file");
        assert!(meta.get("rows").is_none());
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["policy"], "full");
        assert_eq!(rows[0]["backend"], "cuda");
        assert_eq!(rows[0]["bench"], "cuda_decode");
        assert_eq!(rows[0]["ms_per_step"], 5.0); // the bench's own figure is kept
        assert_eq!(
            rows[0]["criterion_id"],
            "cuda_decode/llama-3.1-8b/b1/ctx4096"
        );
        assert!((rows[0]["spread_pct"].as_f64().unwrap() - 2.0).abs() < 1e-9);
        assert!(rows[1]["ms_per_step"].is_null());
        assert!(rows[1].get("spread_pct").is_none());
    }

    #[test]
    fn rows_of_the_cuda_freekv_side_file() {
        let side = json!({"bench": "cuda_freekv", "synthetic": true, "device": "NVIDIA H200",
            "model": "synthetic:llama-3.1-8b (random weights, seed 1)", "rows": [
            {"scenario": "long-input", "context": 32768, "gen": 512, "batch": 4, "policy": "full",
             "ms_median": 20.0, "ms_p90": 21.0, "ms_quarters": [19.5, 20.0, 20.1, 20.4],
             "gpu_used_gib": 40.25, "host_kv_gib": 0.0, "stats": null, "gpu_kv_pool_gib": 17.0},
            {"scenario": "long-input", "context": 32768, "gen": 512, "batch": 4, "policy": "freekv",
             "ms_median": 8.0, "stats": {"head_correction_rate": 0.05}, "gpu_used_gib": 20.0,
             "host_kv_gib": 16.5},
            {"scenario": "long-input", "batch": 16, "policy": "arkvale", "error": "out of memory"},
            {"scenario": "long-generation", "batch": 16, "policy": "oracle", "skipped": "time budget"}]});
        let (meta, rows) = bench_rows("cuda_freekv", Some(&side), &[]);
        assert_eq!(meta["device"], "NVIDIA H200");
        assert_eq!(rows[1]["model"], "synthetic:llama-3.1-8b");
        assert_eq!(rows[1]["ms_per_step"], 8.0);
        assert_eq!(rows[1]["correction_rate"], 0.05);
        assert!(rows[0].get("correction_rate").is_none());
        assert_eq!(rows[2]["note"], "failed: out of memory");
        assert_eq!(rows[3]["note"], "skipped: time budget");
        assert!((speed_vs(&rows, &rows[1], "full").unwrap() - 2.5).abs() < 1e-12);
        let res = json!({"gpu_e2e": {"benches": {"cuda_freekv": meta}, "rows": rows}});
        let md = render(&res);
        assert!(md.contains("| model | scenario | policy | batch | context | steps | ms/step | p90 ms | ms/step by quarter | tokens/s | vs full | correction rate | GPU GiB used | host KV GiB | gpu_kv_pool_gib | note |"), "{md}");
        assert!(md.contains("| synthetic:llama-3.1-8b | long-input | full | 4 | 32768 | 512 | 20.000 | 21.000 | 19.50 / 20.00 / 20.10 / 20.40 | 200 | - | - | 40.25 | 0.00 | 17 |  |"), "{md}");
        assert!(md.contains("| long-input | freekv | 4 | 32768 | 512 | 8.000 | - | - | 500 | 2.50× | 5.0 % | 20.00 | 16.50 | - |  |"), "{md}");
        assert!(
            md.contains("| long-input | arkvale | 16 | - | - | - |"),
            "{md}"
        );
        assert!(md.contains("failed: out of memory |"));
        assert!(md.contains("* `cuda_freekv`: device NVIDIA H200; synthetic models"));
    }

    #[test]
    fn rows_from_criterion_ids_without_a_side_file() {
        let ests = [
            est("cuda_freekv/llama-3.1-8b/full/b4/ctx32768", 20.0),
            est("cuda_freekv/llama-3.1-8b/freekv@2048/b4/ctx32768", 8.0),
            est("cuda_freekv/setup", 1.0),
        ];
        let (meta, rows) = bench_rows("cuda_freekv", None, &ests);
        assert_eq!(meta["source"], "criterion ids");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["policy"], "freekv");
        assert_eq!(rows[1]["budget"], 2048);
        assert_eq!(rows[1]["model"], "llama-3.1-8b");
        assert_eq!(rows[1]["ms_per_step"], 8.0);
        assert!((speed_vs(&rows, &rows[1], "full").unwrap() - 2.5).abs() < 1e-12);
        assert_eq!(speed_vs(&rows, &rows[0], "full"), None);
        // An empty side file's rows fall back to the ids too.
        let (meta, rows) = bench_rows("cuda_freekv", Some(&json!({"rows": []})), &ests);
        assert_eq!(meta["source"], "criterion ids");
        assert_eq!(rows.len(), 2);
    }

    fn matrix() -> Value {
        let row = |p: &str, b: u64, c: u64, ms: f64| {
            json!({"bench": "cuda_freekv", "model": "synthetic:llama-3.1-8b", "policy": p,
                   "batch": b, "context": c, "ms_per_step": ms})
        };
        let mut fk = row("freekv", 4, 32768, 10.0);
        fk["recall_gbs"] = json!(50.0);
        fk["correction_rate"] = json!(0.1);
        fk["pages_per_step"] = json!(12.5);
        json!({
            "host_kind": "gpu-x",
            "ceilings": {"h2d_pinned_gbs": 55.0},
            "gpu_e2e": {"benches": {"cuda_freekv": {"device": "H200", "source": "side file"},
                                    "cuda_decode": {"copy_bandwidth_gbs": 4200.0, "synthetic": true}},
                "rows": [
                {"bench": "cuda_decode", "model": "synthetic:llama-3.1-8b", "policy": "full", "batch": 1,
                 "context": 32768, "ms_per_step": 6.0, "floor_ms": 5.0},
                row("full", 1, 32768, 6.5), row("oracle", 1, 32768, 3.0), row("freekv", 1, 32768, 3.2),
                row("arkvale", 1, 32768, 30.0),
                row("full", 4, 32768, 16.0), row("oracle", 4, 32768, 9.0), fk,
                row("arkvale", 4, 32768, 150.0), row("freekv-spec", 4, 32768, 9.5)]},
            "peers": {"hf": {"rows": [
                {"form": "compiled", "model": "synthetic:llama-3.1-8b", "batch": 1, "context": 32768, "ms_per_step": 15.0}]}}
        })
    }

    #[test]
    fn table_shows_policies_ratios_and_extra_fields() {
        let md = render(&matrix());
        assert!(md.contains("* `cuda_decode`: synthetic models"), "{md}");
        assert!(md.contains("device-copy bandwidth measured by the bench 4200 GB/s"));
        // Header: empty columns (budget, GPU mem, ...) are left out; the new field shows.
        assert!(md.contains("| bench | model | policy | batch | context | ms/step | tokens/s | vs full | vs oracle | vs arkvale | HBM floor ms | ratio to floor | recall GB/s | of H2D pinned | correction rate | HF compiled ms | speedup vs HF compiled | pages_per_step |"), "{md}");
        // freekv b4: 16/10 vs full, 9/10 vs oracle, 150/10 vs arkvale; 50 of 55 GB/s.
        assert!(md.contains("| cuda_freekv | synthetic:llama-3.1-8b | freekv | 4 | 32768 | 10.000 | 400 | 1.60× | 0.90× | 15.00× | - | - | 50.0 | 91 % | 10.0 % | - | - | 12.500 |"), "{md}");
        // cuda_decode full: its own bench has no oracle; HF compiled 15 ms against 6 ms.
        assert!(md.contains("| cuda_decode | synthetic:llama-3.1-8b | full | 1 | 32768 | 6.000 | 167 | - | 0.50× | 5.00× | 5.000 | 1.20 | - | - | - | 15.00 | 2.50× | - |"), "{md}");
        assert!(md.contains("freekv step time ≤ 1.10× oracle's: not met (worst 1.11× at llama-3.1-8b b4 ctx 32768)"), "{md}");
        assert!(md.contains("freekv ≥ 13.7× faster than arkvale at batch 4: met (best 15.00× at llama-3.1-8b b4 ctx 32768)"));
        assert!(
            md.contains("recall ≥ 45 GB/s: met (best 50.0 GB/s, freekv llama-3.1-8b b4 ctx 32768)")
        );
        assert!(md.contains("full ≥ 1.5× compiled HF's tokens/s: met (lowest 2.31× at llama-3.1-8b b1 ctx 32768)"), "{md}");
        assert!(md.contains("full ≤ 1.25× the HBM floor at batch 1: met (worst 1.20× at"));
        assert!(md.contains("freekv-spec step time ≤ 1.10× oracle's: met (worst 1.06× at llama-3.1-8b b4 ctx 32768)"), "{md}");
        assert!(
            md.contains("freekv-spec ≥ 13.7× faster than arkvale at batch 4: met (best 15.79× at")
        );
        assert_eq!(render(&json!({})), "");
    }

    /// Rows are compared at equal positions (the last window both measured, also when one
    /// stopped at its time cap), and a matrix with several models gets one verdict per model.
    #[test]
    fn capped_rows_compare_at_equal_positions_and_targets_are_per_model() {
        let row = |m: &str, p: &str, steps: u64, ms: f64, wins: &[f64]| {
            json!({"bench": "cuda_freekv", "model": m, "scenario": "long-generation",
                   "policy": p, "batch": 4, "context": 1024, "ms_per_step": ms,
                   "steps_measured": steps, "window_steps": 256, "ms_windows": wins})
        };
        let (a, b) = (
            "synthetic:llama-3.1-8b",
            "synthetic:llama-3.1-8b+persistent=0.92",
        );
        let rows = vec![
            // arkvale stopped after 3 windows; its median covers the cheap dense start.
            row(a, "arkvale", 768, 9.0, &[6.0, 10.0, 40.0]),
            row(a, "oracle", 1024, 7.0, &[5.0, 6.0, 8.0, 9.0]),
            row(a, "freekv", 1024, 8.0, &[5.5, 7.0, 10.0, 11.0]),
            row(b, "oracle", 1024, 7.0, &[5.0, 6.0, 8.0, 9.0]),
            row(b, "freekv", 1024, 7.5, &[5.0, 6.2, 8.4, 9.5]),
        ];
        // Against the capped arkvale: window 3 (40 / 10), not the medians (9 / 8).
        let fk = &rows[2];
        assert_eq!(speed_vs(&rows, fk, "arkvale"), Some(4.0));
        // Same step counts: the last window too (9 / 11), not the medians (7 / 8).
        assert_eq!(speed_vs(&rows, fk, "oracle"), Some(9.0 / 11.0));
        // Windows of another size are not compared.
        let mut other = rows.clone();
        other[0]["window_steps"] = json!(128);
        assert_eq!(speed_vs(&other, &other[2], "arkvale"), Some(9.0 / 8.0));
        let t = targets(&json!({}), &rows).join("\n");
        assert!(
            t.contains("freekv step time ≤ 1.10× oracle's [llama-3.1-8b]: not met (worst 1.22×"),
            "{t}"
        );
        assert!(
            t.contains(
                "freekv step time ≤ 1.10× oracle's [llama-3.1-8b+persistent=0.92]: met (worst 1.06×"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "freekv ≥ 13.7× faster than arkvale at batch 4 [llama-3.1-8b]: not met (best 4.00×"
            ),
            "{t}"
        );
    }

    #[test]
    fn plots_per_policy_and_batch() {
        let p = plots(&matrix(), "gpu-x");
        let names: Vec<&str> = p.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "step-time-cuda-gpu-x.svg",
                "speedup-batch-gpu-x.svg",
                "throughput-batch-gpu-x.svg"
            ]
        );
        for (_, s) in &p {
            assert!(crate::svg::tests::well_formed(s) && crate::svg::tests::coords_numeric(s));
        }
        assert!(p[0].1.contains("b4 freekv: x=32768 y=10<"), "{}", p[0].1);
        assert!(
            p[1].1.contains("freekv vs full, ctx 32K: x=4 y=1.6<"),
            "{}",
            p[1].1
        );
        assert!(p[1].1.contains("freekv vs arkvale, ctx 32K: x=4 y=15<"));
        assert!(p[1].1.contains("oracle vs full, ctx 32K: x=1 y=2.2<"));
        // freekv: 4 × 3.2 / 10 = 1.28× batch-1 tokens/s.
        assert!(p[2].1.contains("ctx 32K freekv: x=4 y=1.3<"), "{}", p[2].1);
        // Full attention only: no speedup plot.
        let mut only_full = matrix();
        only_full["gpu_e2e"]["rows"] = json!([matrix()["gpu_e2e"]["rows"][0].clone()]);
        let n: Vec<String> = plots(&only_full, "h").into_iter().map(|x| x.0).collect();
        assert_eq!(n, ["step-time-cuda-h.svg"]);
    }

    #[test]
    fn context_labels() {
        assert_eq!(ctx_label(1000), "1000");
        assert_eq!(ctx_label(4096), "4K");
        assert_eq!(ctx_label(32768), "32K");
    }

    #[test]
    fn first_version_results_still_read() {
        let old = json!({"cuda_decode": {"copy_bandwidth_gbs": 4000.0, "rows": [
            {"model": "synthetic:llama-3.1-8b", "batch": 1, "context": 4096, "ms_per_step": 5.0, "floor_ms": 4.0}]}});
        let r = rows(&old);
        assert_eq!(r[0]["bench"], "cuda_decode");
        assert_eq!(policy(&r[0]), "full");
        assert!(render(&old).contains("device-copy bandwidth measured by the bench 4000 GB/s"));
    }

    #[test]
    fn gpu_recall_bars_from_criterion() {
        let e = Estimate {
            throughput: Some(Throughput::Bytes(50_000_000)),
            ..est("cuda_recall_gather/b4", 1.0)
        };
        let mut cpu = est("recall_f32/x", 1.0);
        cpu.throughput = Some(Throughput::Bytes(1));
        let res =
            json!({"criterion": [e.to_json(), cpu.to_json()], "gpu_benches": ["cuda_recall"]});
        let bars = gpu_recall_bars(&res);
        assert_eq!(bars.len(), 1);
        assert!((bars[0].0 - 50.0).abs() < 1e-9);
        assert_eq!(gpu_bench_names(&res), ["cuda_recall"]);
        // The recall target counts the recalls, never the pinned-copy ceiling beside them.
        let ceiling = Estimate {
            throughput: Some(Throughput::Bytes(55_000_000)),
            ..est("cuda_recall_gather/h2d_ceiling/b4", 1.0)
        };
        let mut m = matrix();
        m["criterion"] = json!([e.to_json(), ceiling.to_json()]);
        m["gpu_benches"] = json!(["cuda_recall"]);
        m["gpu_e2e"]["rows"][7]["recall_gbs"] = json!(40.0);
        let md = render(&m);
        assert!(
            md.contains("recall ≥ 45 GB/s: met (best 50.0 GB/s, cuda_recall_gather/b4)"),
            "{md}"
        );
    }
}
