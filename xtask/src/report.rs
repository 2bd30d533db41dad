//! Markdown rendering of a results file (the JSON written by `cargo xtask bench`).

use crate::criterion::{Estimate, Throughput};
use serde_json::Value;
use std::fmt::Write;

/// A markdown table: header cells, then rows; cells are escaped for `|`.
pub fn table(header: &[&str], rows: &[Vec<String>], right_align_from: usize) -> String {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {} |",
        header
            .iter()
            .map(|h| cell(h))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let seps: Vec<&str> = (0..header.len())
        .map(|i| if i >= right_align_from { "---:" } else { "---" })
        .collect();
    let _ = writeln!(out, "|{}|", seps.join("|"));
    for r in rows {
        let mut cells: Vec<String> = r.iter().map(|c| cell(c)).collect();
        cells.resize(header.len(), String::new());
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// A duration in ns with a readable unit.
pub fn fmt_time(ns: f64) -> String {
    if !ns.is_finite() {
        "-".into()
    } else if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Median of a list (mean of the two middle values for even lengths); `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n > 0 && n.is_multiple_of(2) {
        Some((v[n / 2 - 1] + v[n / 2]) / 2.0)
    } else {
        v.get(n / 2).copied()
    }
}

fn nums(v: &Value, k: &str) -> Vec<f64> {
    v.get(k)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// A number with `prec` decimals, or `-`.
pub(crate) fn opt(x: Option<f64>, prec: usize) -> String {
    x.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.prec$}"))
}

/// Groups whose benchmarks run on the GPU (their bandwidth ceiling is the device's): the CUDA
/// kernels' groups, and any group naming CUDA or the GPU.
pub fn is_gpu_group(group: &str) -> bool {
    let g = group.to_ascii_lowercase();
    [
        "decode_attention_",
        "prefill_attention_",
        "elementwise_",
        "sampling_",
        "gemm_",
        "cuda_decode",
    ]
    .iter()
    .any(|p| g.starts_with(p))
        || g.contains("cuda")
        || g.contains("gpu")
}

/// Whether a criterion estimate of a results file ran on the GPU: its group says so, or it
/// came from a bench that has only GPU groups (`gpu_benches` of the results file).
pub fn is_gpu_estimate(v: &Value, gpu_benches: &[String]) -> bool {
    is_gpu_group(s(v, "group")) || gpu_benches.iter().any(|b| b == s(v, "bench"))
}

/// Whether a criterion estimate measures recall (its group or its bench names it).
pub fn is_recall_estimate(v: &Value) -> bool {
    s(v, "group").contains("recall") || s(v, "bench").contains("recall")
}

/// Bytes one CPU decode step reads at `context` tokens: every weight once plus the KV of the
/// tokens attended (`attended` per sparse layer; dense layers read the whole context).
pub fn step_bytes(model: &Value, context: f64, attended_sparse: Option<f64>) -> Option<f64> {
    let w = f(model, "weight_bytes")?;
    let layers = f(model, "layers")?;
    let per = f(model, "kv_bytes_per_token_layer")?;
    let dense = f(model, "dense_layers").unwrap_or(1.0).min(layers);
    let kv = match attended_sparse {
        None => layers * context * per,
        Some(b) => (dense * context + (layers - dense) * b.min(context)) * per,
    };
    Some(w + kv)
}

/// Bytes per element of a `dequant/<type>/...` benchmark's input (GGUF block sizes).
pub fn dequant_in_bytes(id: &str) -> Option<f64> {
    let mut parts = id.split('/');
    if parts.next()? != "dequant" {
        return None;
    }
    Some(match parts.next()? {
        "f32" => 4.0,
        "f16" | "bf16" => 2.0,
        "q8_0" => 34.0 / 32.0,
        "q4_0" => 18.0 / 32.0,
        "q4_1" => 20.0 / 32.0,
        "q4_k" => 144.0 / 256.0,
        "q5_k" => 176.0 / 256.0,
        "q6_k" => 210.0 / 256.0,
        _ => return None,
    })
}

/// The e2e row's decode tok/s median.
fn row_tok_s(r: &Value) -> Option<f64> {
    median(&nums(r, "decode_tok_s"))
}

fn backend(r: &Value) -> &str {
    r.get("backend").and_then(Value::as_str).unwrap_or("cpu")
}

fn find_row<'a>(rows: &'a [Value], be: &str, policy: &str, ctx: u64) -> Option<&'a Value> {
    rows.iter().find(|r| {
        backend(r) == be
            && s(r, "policy") == policy
            && r.get("target_context").and_then(Value::as_u64) == Some(ctx)
    })
}

/// Renders one results file as a markdown section.
pub fn render(res: &Value) -> String {
    let mut out = String::new();
    let host = s(res, "host_kind");
    let m = res.get("machine").cloned().unwrap_or(Value::Null);
    let c = res.get("ceilings").cloned().unwrap_or(Value::Null);
    let _ = writeln!(out, "## Host `{host}`: {}\n", s(res, "date"));
    let _ = writeln!(
        out,
        "Machine: {} ({} threads), {} GiB RAM, kernel {}{}. Commit {}. {}.\n",
        s(&m, "cpu"),
        m.get("cores").and_then(Value::as_u64).unwrap_or(0),
        opt(f(&m, "mem_gib"), 0),
        s(&m, "kernel"),
        m.get("gpu")
            .and_then(Value::as_str)
            .map(|g| format!("; GPU {g}"))
            .unwrap_or_default(),
        s(res, "git"),
        if res.get("quick").and_then(Value::as_bool) == Some(true) {
            "`--quick` run (short criterion times, a subset of the matrix)"
        } else {
            "Full run"
        }
    );
    if let Some(op) = res.get("options") {
        let mut partial = Vec::new();
        if let Some(t) = op
            .get("targets")
            .and_then(Value::as_array)
            .filter(|t| !t.is_empty())
        {
            let names: Vec<&str> = t.iter().filter_map(Value::as_str).collect();
            partial.push(format!("criterion targets {} only", names.join(", ")));
        }
        for (k, what) in [
            ("no_criterion", "no criterion benchmarks"),
            ("no_e2e", "no end-to-end matrix"),
            ("cpu_only", "CPU only"),
            ("gpu_only", "GPU only"),
        ] {
            if op.get(k).and_then(Value::as_bool) == Some(true) {
                partial.push(what.to_string());
            }
        }
        if !partial.is_empty() {
            let _ = writeln!(out, "Partial run: {}.\n", partial.join("; "));
        }
    }
    if let Some(notes) = res.get("notes").and_then(Value::as_array) {
        for n in notes.iter().filter_map(Value::as_str) {
            let _ = writeln!(out, "* {n}");
        }
        out.push('\n');
    }
    // Ceilings.
    let _ = writeln!(out, "### Ceilings measured in this run\n");
    let mut rows = Vec::new();
    let cpu_read = f(&c, "cpu_read_gbs");
    let cpu_copy = f(&c, "cpu_copy_gbs");
    let gpu_copy = f(&c, "gpu_copy_gbs");
    let l3 = f(&m, "l3_bytes");
    // (A GPU-only run measures no CPU ceiling: those rows are left out.)
    if cpu_read.is_some() || cpu_copy.is_some() || m.get("gpu").and_then(Value::as_str).is_none() {
        rows.push(vec![
            "CPU streaming read, all threads".into(),
            opt(cpu_read, 1),
            "GB/s read".into(),
        ]);
        rows.push(vec![
            "CPU copy, all threads".into(),
            opt(cpu_copy, 1),
            "GB/s read + written".into(),
        ]);
    }
    if m.get("gpu").and_then(Value::as_str).is_some() {
        rows.push(vec![
            "GPU device-to-device copy".into(),
            opt(gpu_copy, 0),
            "GB/s read + written".into(),
        ]);
        rows.push(vec![
            "host → device, pinned".into(),
            opt(f(&c, "h2d_pinned_gbs"), 1),
            "GB/s".into(),
        ]);
        if let Some(d2h) = f(&c, "d2h_pinned_gbs") {
            rows.push(vec![
                "device → host, pinned".into(),
                opt(Some(d2h), 1),
                "GB/s".into(),
            ]);
        }
    }
    out.push_str(&table(&["ceiling", "value", "unit"], &rows, 1));
    out.push('\n');

    // End-to-end CPU matrix.
    let model = res.get("model").cloned().unwrap_or(Value::Null);
    let e2e: Vec<Value> = res
        .get("e2e")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if !e2e.is_empty() {
        let _ = writeln!(
            out,
            "### End to end: `freekv generate`, {} (batch 1, greedy)\n",
            s(&model, "name")
        );
        let has_oracle = e2e.iter().any(|r| s(r, "policy") == "oracle");
        let multi = e2e.iter().any(|r| backend(r) != "cpu");
        let mut rows: Vec<Vec<String>> = Vec::new();
        for r in &e2e {
            let ctx = r.get("target_context").and_then(Value::as_u64).unwrap_or(0);
            let tps = row_tok_s(r);
            let all = nums(r, "decode_tok_s");
            let spread = if all.len() > 1 {
                let lo = all.iter().copied().fold(f64::MAX, f64::min);
                let hi = all.iter().copied().fold(0f64, f64::max);
                format!("{lo:.1}–{hi:.1} (n={})", all.len())
            } else {
                "n=1".into()
            };
            let ratio = |base: &str| -> String {
                match (
                    tps,
                    find_row(&e2e, backend(r), base, ctx).and_then(row_tok_s),
                ) {
                    (Some(a), Some(b)) if b > 0.0 && s(r, "policy") != base => {
                        format!("{:.2}×", a / b)
                    }
                    _ => "-".into(),
                }
            };
            let policy = s(r, "policy");
            let attended = if policy == "full" {
                None
            } else {
                f(r, "budget")
            };
            let prompt = f(r, "prompt_tokens").unwrap_or(ctx as f64);
            let bytes = step_bytes(&model, prompt, attended);
            let bound = match (cpu_read, bytes) {
                (Some(bw), Some(b)) if b > 0.0 && backend(r) == "cpu" => Some(bw * 1e9 / b),
                _ => None,
            };
            rows.push(vec![
                policy.to_string(),
                format!("{}", prompt as u64),
                if policy == "full" {
                    "-".into()
                } else {
                    opt(f(r, "budget"), 0)
                },
                opt(tps, 1),
                spread,
                opt(tps.map(|t| 1e3 / t), 2),
                ratio("full"),
                if has_oracle {
                    ratio("oracle")
                } else {
                    String::new()
                },
                ratio("arkvale"),
                opt(bound, 0),
                match (tps, bound) {
                    (Some(t), Some(b)) if b > 0.0 => format!("{:.0} %", 100.0 * t / b),
                    _ => "-".into(),
                },
                opt(median(&nums(r, "prefill_tok_s")), 0),
                opt(f(r, "pages_per_step"), 1),
                f(r, "correction_rate").map_or("-".into(), |x| format!("{:.1} %", 100.0 * x)),
            ]);
        }
        let mut header = vec![
            "policy",
            "prompt tokens",
            "budget",
            "decode tok/s (median)",
            "spread (min–max)",
            "ms/step",
            "vs full",
            "vs oracle",
            "vs arkvale",
            "bandwidth bound tok/s",
            "of bound",
            "prefill tok/s",
            "(page, KV head) recalled/step",
            "correction rate (KV heads)",
        ];
        if !has_oracle {
            header.remove(7);
            for r in &mut rows {
                r.remove(7);
            }
        }
        if multi {
            header.insert(0, "backend");
            for (row, r) in rows.iter_mut().zip(&e2e) {
                row.insert(0, backend(r).to_string());
            }
        }
        if e2e.iter().any(|r| r.get("note").is_some()) {
            header.push("note");
            for (row, r) in rows.iter_mut().zip(&e2e) {
                row.push(s(r, "note").to_string());
            }
        }
        out.push_str(&table(&header, &rows, 1));
        let _ = writeln!(
            out,
            "\nBandwidth bound = CPU streaming-read bandwidth ÷ bytes one decode step must read: the \
             model's weights ({} MB) plus the f32 KV attended (full: every layer × context; sparse \
             policies: dense layers × context + the other layers × budget; page summaries and \
             selection not counted); CPU rows only. `vs full` / `vs oracle` / `vs arkvale`: tok/s \
             ratio against that policy on the same backend at the same prompt (> 1 is faster); \
             the CPU path has no `oracle` policy.\n",
            opt(f(&model, "weight_bytes").map(|b| b / 1e6), 1)
        );
    }

    // Peers on the CPU.
    if let Some(lc) = res.get("peers").and_then(|p| p.get("llamacpp")) {
        let rows_v = lc
            .get("rows")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "### Peer: llama.cpp (llama-cpp-python), same GGUF and prompts\n"
        );
        if rows_v.is_empty() {
            let _ = writeln!(out, "{}\n", s(lc, "status"));
        } else {
            let mut rows = Vec::new();
            for r in &rows_v {
                let ctx = r.get("target_context").and_then(Value::as_u64).unwrap_or(0);
                let ours = find_row(&e2e, "cpu", "full", ctx).and_then(row_tok_s);
                let theirs = f(r, "decode_tok_s");
                rows.push(vec![
                    format!("{}", f(r, "prompt_tokens").unwrap_or(0.0) as u64),
                    opt(f(r, "prefill_tok_s"), 0),
                    opt(theirs, 1),
                    opt(ours, 1),
                    match (ours, theirs) {
                        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                        _ => "-".into(),
                    },
                ]);
            }
            out.push_str(&table(
                &[
                    "prompt tokens",
                    "llama.cpp prefill tok/s",
                    "llama.cpp decode tok/s",
                    "FreeKV-rs full decode tok/s",
                    "FreeKV-rs / llama.cpp",
                ],
                &rows,
                0,
            ));
            out.push('\n');
        }
    }

    // The GPU end-to-end matrix.
    out.push_str(&crate::gpu_e2e::render(res));
    if let Some(hf) = res.get("peers").and_then(|p| p.get("hf"))
        && hf.get("rows").is_none()
    {
        let _ = writeln!(out, "{}\n", s(hf, "status"));
    }

    // Criterion micro-benchmarks.
    let gpu_benches = crate::gpu_e2e::gpu_bench_names(res);
    let tagged: Vec<(Estimate, bool, bool)> = res
        .get("criterion")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| {
                    Some((
                        Estimate::from_json(v).ok()?,
                        is_gpu_estimate(v, &gpu_benches),
                        is_recall_estimate(v),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let ests: Vec<Estimate> = tagged.iter().map(|t| t.0.clone()).collect();
    if !ests.is_empty() {
        let _ = writeln!(out, "### Criterion micro-benchmarks\n");
        let mut rows = Vec::new();
        for (e, gpu, recall) in &tagged {
            let gpu = *gpu;
            // GPU recall moves host memory to the device: its ceiling is the pinned H2D rate.
            let ceiling = if gpu && *recall {
                f(&c, "h2d_pinned_gbs")
            } else if gpu {
                gpu_copy
            } else {
                cpu_read
            };
            // The tokenizer is compute-bound: a bandwidth ratio says nothing about it.
            let compute_bound = e.group == "encode" || e.id.starts_with("decode/text");
            let ceiling = if compute_bound { None } else { ceiling };
            let in_cache = match (e.throughput, l3) {
                (Some(Throughput::Bytes(b)), Some(l3)) => !gpu && (b as f64) <= l3,
                _ => false,
            };
            let (thr, of) = if let Some(bps) = e.bytes_per_s() {
                (
                    format!("{:.2} GB/s", bps / 1e9),
                    ceiling.map_or("-".into(), |c| {
                        let pct = format!("{:.0} %", 100.0 * bps / 1e9 / c);
                        if in_cache {
                            format!("({pct}: fits in L3)")
                        } else {
                            pct
                        }
                    }),
                )
            } else if let Some(eps) = e.elements_per_s() {
                let unit = if matches!(e.group.as_str(), "decode" | "prefill" | "attention_decode")
                {
                    "tok/s"
                } else {
                    "elem/s"
                };
                let of = if e.group == "decode" {
                    let n: Option<f64> = e.id.rsplit('/').next().and_then(|x| x.parse().ok());
                    match (n.and_then(|n| step_bytes(&model, n, None)), cpu_read) {
                        (Some(b), Some(bw)) => format!(
                            "{:.0} % of {:.0} tok/s",
                            100.0 * eps * b / (bw * 1e9),
                            bw * 1e9 / b
                        ),
                        _ => "-".into(),
                    }
                } else if let (Some(bpe), Some(Throughput::Elements(n))) =
                    (dequant_in_bytes(&e.id), e.throughput)
                {
                    // Dequantization moves the quantized input in and 4-byte floats out:
                    // against the copy bandwidth (bytes read + written).
                    let moved = n as f64 * (bpe + 4.0);
                    match cpu_copy {
                        Some(c) => {
                            let pct = 100.0 * eps * (bpe + 4.0) / (c * 1e9);
                            if l3.is_some_and(|l3| moved <= l3) {
                                format!("({pct:.0} % of copy: fits in L3)")
                            } else {
                                format!("{pct:.0} % of copy")
                            }
                        }
                        None => "-".into(),
                    }
                } else {
                    "-".into()
                };
                (
                    if eps >= 1e6 {
                        format!("{:.1} M{unit}", eps / 1e6)
                    } else {
                        format!("{eps:.1} {unit}")
                    },
                    of,
                )
            } else {
                ("-".into(), "-".into())
            };
            rows.push(vec![
                e.id.clone(),
                fmt_time(e.median_ns),
                format!("±{:.1} %", e.spread_pct()),
                format!(
                    "{} – {}",
                    fmt_time(e.median_ci_ns.0),
                    fmt_time(e.median_ci_ns.1)
                ),
                thr,
                of,
            ]);
        }
        out.push_str(&table(
            &[
                "benchmark",
                "median",
                "MAD",
                "95 % CI of median",
                "throughput",
                "of ceiling",
            ],
            &rows,
            1,
        ));
        let _ = writeln!(
            out,
            "\nCeiling for byte throughputs: the CPU streaming-read bandwidth (CPU benches) or the \
             device copy bandwidth counted as bytes read + written, i.e. the HBM traffic rate the \
             `cuda_decode` floor uses (GPU benches; GPU recall: the host → device pinned bandwidth). A CPU benchmark whose bytes per \
             iteration fit in the L3 cache is not bound by DRAM: its ratio is shown in parentheses \
             (it can exceed 100 %). For `decode/N`: the bandwidth bound of a full-attention step at N \
             tokens (weights + f32 KV).\n"
        );
        // KV-policy ratios from the kv bench, when present.
        for g in ests
            .iter()
            .map(|e| e.group.as_str())
            .filter(|g| g.starts_with("kv_decode_"))
            .collect::<std::collections::BTreeSet<_>>()
        {
            let in_g: Vec<&Estimate> = ests.iter().filter(|e| e.group == g).collect();
            let base = |name: &str| {
                in_g.iter()
                    .find(|e| {
                        e.id.rsplit('/')
                            .next()
                            .is_some_and(|l| l == name || l.starts_with(&format!("{name}@")))
                    })
                    .map(|e| e.median_ns)
            };
            let (full, ark) = (base("full"), base("arkvale"));
            let _ = writeln!(
                out,
                "KV policies' decode step (`{g}`), criterion medians:\n"
            );
            let rows: Vec<Vec<String>> = in_g
                .iter()
                .map(|e| {
                    let r = |b: Option<f64>| {
                        b.map_or("-".into(), |b| format!("{:.2}×", b / e.median_ns))
                    };
                    let label = e.id.rsplit('/').next().unwrap_or_default();
                    // Context from the group name (`kv_decode_<model>_<N>`), budget from `@B`.
                    let ctx: Option<f64> = g.rsplit('_').next().and_then(|n| n.parse().ok());
                    let budget: Option<f64> =
                        label.split_once('@').and_then(|(_, b)| b.parse().ok());
                    let bound = match (ctx, cpu_read) {
                        (Some(n), Some(bw)) => {
                            step_bytes(&model, n, budget).map(|b| b / (bw * 1e9) * 1e9)
                        }
                        _ => None,
                    };
                    vec![
                        label.to_string(),
                        fmt_time(e.median_ns),
                        r(full),
                        r(ark),
                        bound.map_or("-".into(), fmt_time),
                        bound.map_or("-".into(), |b| format!("{:.2}", e.median_ns / b)),
                    ]
                })
                .collect();
            out.push_str(&table(
                &[
                    "policy",
                    "step",
                    "speed vs full",
                    "speed vs arkvale",
                    "bandwidth floor",
                    "ratio to floor",
                ],
                &rows,
                1,
            ));
            out.push('\n');
        }
    }
    if let Some(plots) = res.get("plots").and_then(Value::as_array) {
        for p in plots.iter().filter_map(Value::as_str) {
            let _ = writeln!(out, "![{p}]({p})\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn table_escapes_and_aligns() {
        let t = table(
            &["a", "b"],
            &[vec!["x|y".into(), "1".into()], vec!["z".into()]],
            1,
        );
        assert_eq!(t, "| a | b |\n|---|---:|\n| x\\|y | 1 |\n| z |  |\n");
    }

    #[test]
    fn times_have_units() {
        assert_eq!(fmt_time(1.5e9), "1.500 s");
        assert_eq!(fmt_time(2.5e6), "2.500 ms");
        assert_eq!(fmt_time(2500.0), "2.50 µs");
        assert_eq!(fmt_time(12.0), "12.0 ns");
    }

    #[test]
    fn dequant_bytes_and_ratio() {
        assert_eq!(dequant_in_bytes("dequant/q4_1/4M"), Some(0.625));
        assert_eq!(dequant_in_bytes("dequant/zz/4M"), None);
        assert_eq!(dequant_in_bytes("decode/37"), None);
        let mut r = sample();
        r["criterion"] = json!([{"id": "dequant/q8_0/4M", "group": "dequant", "median_ns": 1e6,
            "median_ci_ns": [1e6, 1e6], "mad_ns": 1.0, "mean_ns": 1e6, "std_dev_ns": 1.0,
            "throughput_kind": "elements", "throughput_per_iter": 1_000_000}]);
        // 1e9 elem/s × (34/32 + 4) B = 5.06 GB/s of a 12 GB/s copy ceiling.
        assert!(
            render(&r).contains("| 1000.0 Melem/s | 42 % of copy |"),
            "{}",
            render(&r)
        );
    }

    #[test]
    fn median_of_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
    }

    fn sample() -> Value {
        json!({
            "host_kind": "cpu", "date": "2026-11-28", "git": "abc", "quick": true,
            "machine": {"cpu": "TestCPU", "cores": 2, "mem_gib": 24.0, "kernel": "6.1"},
            "ceilings": {"cpu_read_gbs": 10.0, "cpu_copy_gbs": 12.0},
            "model": {"name": "m.gguf", "weight_bytes": 100e6, "layers": 30.0, "dense_layers": 1.0,
                      "kv_bytes_per_token_layer": 1536.0},
            "e2e": [
                {"policy": "full", "target_context": 1024, "prompt_tokens": 1000.0, "decode_tok_s": [50.0, 40.0, 60.0], "prefill_tok_s": [200.0]},
                {"policy": "arkvale", "target_context": 1024, "prompt_tokens": 1000.0, "budget": 256.0, "decode_tok_s": [25.0], "prefill_tok_s": [200.0]},
                {"policy": "freekv", "target_context": 1024, "prompt_tokens": 1000.0, "budget": 256.0, "decode_tok_s": [55.0], "prefill_tok_s": [200.0], "correction_rate": 0.125, "pages_per_step": 3.5}
            ],
            "criterion": [
                {"id": "recall_x/double_buffered/64", "group": "recall_x", "median_ns": 1e6, "median_ci_ns": [0.9e6, 1.1e6],
                 "mad_ns": 5e4, "mean_ns": 1e6, "std_dev_ns": 6e4, "throughput_kind": "bytes", "throughput_per_iter": 5000000}
            ]
        })
    }

    #[test]
    fn renders_ratios_bounds_and_ceilings() {
        let md = render(&sample());
        assert!(md.contains("## Host `cpu`: 2026-11-28"));
        assert!(md.contains("| CPU streaming read, all threads | 10.0 | GB/s read |"));
        // full: median 50, spread 40–60; bound = 10e9 / (100e6 + 30*1000*1536) = 68.5
        assert!(
            md.contains(
                "| full | 1000 | - | 50.0 | 40.0–60.0 (n=3) | 20.00 | - | 2.00× | 68 | 73 % |"
            ),
            "{md}"
        );
        // freekv against full (55/50) and arkvale (55/25); bound = 10e9/(100e6 + (1000 + 29*256)*1536)
        let b = 10e9 / (100e6 + (1000.0 + 29.0 * 256.0) * 1536.0);
        assert!(
            md.contains(&format!(
                "| freekv | 1000 | 256 | 55.0 | n=1 | 18.18 | 1.10× | 2.20× | {b:.0} |"
            )),
            "{md}"
        );
        assert!(md.contains("| 12.5 % |"));
        // The kv bench's table: ratios against full and arkvale and the bandwidth floor.
        let mut k = sample();
        k["criterion"] = json!([
            {"id": "kv_decode_m_1000/full", "group": "kv_decode_m_1000", "median_ns": 2e7, "median_ci_ns": [2e7, 2e7],
             "mad_ns": 1.0, "mean_ns": 2e7, "std_dev_ns": 1.0, "throughput_kind": "none"},
            {"id": "kv_decode_m_1000/arkvale@256", "group": "kv_decode_m_1000", "median_ns": 1e7, "median_ci_ns": [1e7, 1e7],
             "mad_ns": 1.0, "mean_ns": 1e7, "std_dev_ns": 1.0, "throughput_kind": "none"}]);
        let kmd = render(&k);
        // full floor: (100e6 + 30 × 1000 × 1536) B ÷ 10 GB/s = 14.608 ms.
        assert!(
            kmd.contains("| full | 20.000 ms | 1.00× | 0.50× | 14.608 ms | 1.37 |"),
            "{kmd}"
        );
        assert!(
            kmd.contains("| arkvale@256 | 10.000 ms | 2.00× | 1.00× |"),
            "{kmd}"
        );
        // Criterion row: 5 MB in 1 ms = 5 GB/s = 50 % of the 10 GB/s read ceiling.
        assert!(md.contains("| recall_x/double_buffered/64 | 1.000 ms | ±5.0 % | 900.00 µs – 1.100 ms | 5.00 GB/s | 50 % |"), "{md}");
        assert!(!md.contains("CUDA decode step"));
        assert!(!md.contains("Partial run"));
        let mut p = sample();
        p["options"] = json!({"targets": ["kv"], "no_e2e": true, "cpu_only": false});
        assert!(
            render(&p).contains("Partial run: criterion targets kv only; no end-to-end matrix.\n")
        );
        // With an L3 larger than the 5 MB per iteration, the ratio is marked as cache-resident.
        let mut r = sample();
        r["machine"]["l3_bytes"] = json!(32.0 * 1024.0 * 1024.0);
        assert!(render(&r).contains("| 5.00 GB/s | (50 %: fits in L3) |"));
        // An oracle row adds the `vs oracle` column: freekv 55 against oracle 60.
        assert!(!md.contains("| vs oracle |"));
        r["e2e"].as_array_mut().unwrap().push(json!(
            {"policy": "oracle", "target_context": 1024, "prompt_tokens": 1000.0, "budget": 256.0, "decode_tok_s": [60.0]}));
        let md = render(&r);
        assert!(md.contains("| vs full | vs oracle | vs arkvale |"));
        assert!(
            md.contains("| freekv | 1000 | 256 | 55.0 | n=1 | 18.18 | 1.10× | 0.92× | 2.20× |"),
            "{md}"
        );
    }

    #[test]
    fn renders_the_gpu_matrix_with_hf() {
        let mut r = sample();
        r["machine"]["gpu"] = json!("H200");
        r["cuda_decode"] = json!({"copy_bandwidth_gbs": 4000.0, "rows": [
            {"model": "synthetic:llama-3.1-8b", "batch": 1, "context": 4096, "ms_per_step": 5.0, "floor_ms": 4.0, "note": ""}]});
        r["peers"] = json!({"hf": {"rows": [
            {"form": "compiled", "batch": 1, "context": 4096, "ms_per_step": 8.0},
            {"form": "eager", "batch": 1, "context": 4096, "ms_per_step": 60.0}]}});
        let md = render(&r);
        assert!(md.contains("| model | policy | batch | context | ms/step | tokens/s | HBM floor ms | ratio to floor | HF eager ms | HF compiled ms | speedup vs HF compiled |\n"), "{md}");
        assert!(md.contains("| synthetic:llama-3.1-8b | full | 1 | 4096 | 5.000 | 200 | 4.000 | 1.25 | 60.00 | 8.00 | 1.60× |\n"), "{md}");
        // A CUDA row adds the backend column; its ratio is against CUDA full only, no CPU bound.
        r["e2e"].as_array_mut().unwrap().push(json!(
            {"backend": "cuda", "policy": "full", "target_context": 1024, "prompt_tokens": 1000.0, "decode_tok_s": [500.0]}));
        r["e2e"].as_array_mut().unwrap().push(json!(
            {"backend": "cuda", "policy": "freekv", "target_context": 1024, "prompt_tokens": 1000.0, "budget": 256.0,
             "decode_tok_s": [], "note": "e2e cuda freekv @ 1024: not supported"}));
        let md = render(&r);
        assert!(md.contains("| backend | policy |"));
        assert!(
            md.contains("| cpu | freekv | 1000 | 256 | 55.0 | n=1 | 18.18 | 1.10× | 2.20× |"),
            "{md}"
        );
        assert!(
            md.contains("| cuda | full | 1000 | - | 500.0 | n=1 | 2.00 | - | - | - | - |"),
            "{md}"
        );
        assert!(
            md.contains("| cuda | freekv | 1000 | 256 | - | n=1 | - | - | - | - | - |"),
            "{md}"
        );
        assert!(md.contains("not supported |"));
    }
}
