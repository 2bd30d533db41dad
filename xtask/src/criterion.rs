//! Reading criterion's output: `target/criterion/<group>/<bench>/new/{benchmark,estimates}.json`
//! (criterion 0.8 layout). Times are in nanoseconds.

use anyhow::{Context, Result, anyhow};
use serde_json::Value;
use std::path::Path;
use std::time::SystemTime;

/// What one iteration processes, as declared by the benchmark (`Throughput`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Throughput {
    /// Bytes per iteration (binary or decimal units in criterion's display; same count here).
    Bytes(u64),
    /// Elements per iteration.
    Elements(u64),
}

/// One benchmark's estimates.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// `group/function[/value]`, as criterion prints it.
    pub id: String,
    /// The benchmark group (the first path component).
    pub group: String,
    /// Median time per iteration, ns.
    pub median_ns: f64,
    /// 95 % confidence interval of the median, ns.
    pub median_ci_ns: (f64, f64),
    /// Median absolute deviation, ns.
    pub mad_ns: f64,
    /// Mean, ns.
    pub mean_ns: f64,
    /// Standard deviation, ns.
    pub std_dev_ns: f64,
    /// Declared throughput per iteration.
    pub throughput: Option<Throughput>,
}

impl Estimate {
    /// The MAD relative to the median, in percent.
    pub fn spread_pct(&self) -> f64 {
        if self.median_ns > 0.0 {
            100.0 * self.mad_ns / self.median_ns
        } else {
            0.0
        }
    }

    /// Bytes per second at the median, when the benchmark declares bytes.
    pub fn bytes_per_s(&self) -> Option<f64> {
        match self.throughput {
            Some(Throughput::Bytes(b)) if self.median_ns > 0.0 => {
                Some(b as f64 / (self.median_ns * 1e-9))
            }
            _ => None,
        }
    }

    /// Elements per second at the median, when the benchmark declares elements.
    pub fn elements_per_s(&self) -> Option<f64> {
        match self.throughput {
            Some(Throughput::Elements(n)) if self.median_ns > 0.0 => {
                Some(n as f64 / (self.median_ns * 1e-9))
            }
            _ => None,
        }
    }

    /// JSON form for the results file.
    pub fn to_json(&self) -> Value {
        let (tk, tv) = match self.throughput {
            Some(Throughput::Bytes(b)) => ("bytes", Some(b)),
            Some(Throughput::Elements(n)) => ("elements", Some(n)),
            None => ("none", None),
        };
        serde_json::json!({
            "id": self.id, "group": self.group,
            "median_ns": self.median_ns,
            "median_ci_ns": [self.median_ci_ns.0, self.median_ci_ns.1],
            "mad_ns": self.mad_ns, "mean_ns": self.mean_ns, "std_dev_ns": self.std_dev_ns,
            "throughput_kind": tk, "throughput_per_iter": tv,
        })
    }

    /// Back from [`Estimate::to_json`].
    pub fn from_json(v: &Value) -> Result<Self> {
        let f = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| anyhow!("missing {k}"))
        };
        let ci = v.get("median_ci_ns").and_then(Value::as_array);
        let ci_at = |i: usize| {
            ci.and_then(|a| a.get(i))
                .and_then(Value::as_f64)
                .unwrap_or(0.0)
        };
        let per = v.get("throughput_per_iter").and_then(Value::as_u64);
        let throughput = match (v.get("throughput_kind").and_then(Value::as_str), per) {
            (Some("bytes"), Some(b)) => Some(Throughput::Bytes(b)),
            (Some("elements"), Some(n)) => Some(Throughput::Elements(n)),
            _ => None,
        };
        Ok(Self {
            id: v
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            group: v
                .get("group")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            median_ns: f("median_ns")?,
            median_ci_ns: (ci_at(0), ci_at(1)),
            mad_ns: f("mad_ns")?,
            mean_ns: f("mean_ns")?,
            std_dev_ns: f("std_dev_ns")?,
            throughput,
        })
    }
}

fn point(est: &Value, key: &str) -> Result<f64> {
    est.get(key)
        .and_then(|e| e.get("point_estimate"))
        .and_then(Value::as_f64)
        .ok_or_else(|| anyhow!("estimates.json: no {key}.point_estimate"))
}

fn parse_throughput(v: Option<&Value>) -> Option<Throughput> {
    let obj = v?.as_object()?;
    for (k, val) in obj {
        match k.as_str() {
            "Bytes" | "BytesDecimal" => return val.as_u64().map(Throughput::Bytes),
            "Elements" => return val.as_u64().map(Throughput::Elements),
            "ElementsAndBytes" => {
                return val
                    .get("bytes")
                    .and_then(Value::as_u64)
                    .map(Throughput::Bytes);
            }
            _ => {}
        }
    }
    None
}

/// Parses one benchmark from the texts of its `benchmark.json` and `estimates.json`.
pub fn parse(benchmark_json: &str, estimates_json: &str) -> Result<Estimate> {
    let b: Value = serde_json::from_str(benchmark_json).context("benchmark.json")?;
    let e: Value = serde_json::from_str(estimates_json).context("estimates.json")?;
    let id = b
        .get("full_id")
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("benchmark.json: no full_id"))?
        .to_string();
    let group = b
        .get("group_id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| id.split('/').next().unwrap_or_default().to_string());
    let ci = e
        .get("median")
        .and_then(|m| m.get("confidence_interval"))
        .ok_or_else(|| anyhow!("estimates.json: no median.confidence_interval"))?;
    let bound = |k: &str| ci.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    Ok(Estimate {
        id,
        group,
        median_ns: point(&e, "median")?,
        median_ci_ns: (bound("lower_bound"), bound("upper_bound")),
        mad_ns: point(&e, "median_abs_dev")?,
        mean_ns: point(&e, "mean")?,
        std_dev_ns: point(&e, "std_dev")?,
        throughput: parse_throughput(b.get("throughput")),
    })
}

/// Every benchmark under `dir` (criterion's output folder) whose `new/estimates.json` was written
/// at or after `since` (all when `None`), sorted by id.
pub fn collect(dir: &Path, since: Option<SystemTime>) -> Result<Vec<Estimate>> {
    let mut out = Vec::new();
    if dir.is_dir() {
        walk(dir, since, &mut out)?;
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn walk(dir: &Path, since: Option<SystemTime>, out: &mut Vec<Estimate>) -> Result<()> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in rd {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "new" {
            let est = path.join("estimates.json");
            let bench = path.join("benchmark.json");
            if !est.is_file() || !bench.is_file() {
                continue;
            }
            if let Some(t0) = since {
                let m = std::fs::metadata(&est)?.modified()?;
                if m < t0 {
                    continue;
                }
            }
            let e = std::fs::read_to_string(&est)?;
            let b = std::fs::read_to_string(&bench)?;
            out.push(parse(&b, &e).with_context(|| format!("parsing {}", path.display()))?);
        } else if name != "base" && name != "change" && name != "report" {
            walk(&path, since, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BENCH: &str = r#"{"group_id":"model","function_id":"prefill-64/2t","value_str":null,
        "throughput":{"Bytes":66355200},"full_id":"model/prefill-64/2t",
        "directory_name":"model/prefill-64_2t","title":"model/prefill-64/2t"}"#;
    const EST: &str = r#"{"mean":{"confidence_interval":{"confidence_level":0.95,"lower_bound":246141986.25,"upper_bound":258689296.45},"point_estimate":252762543.25,"standard_error":3209332.38},
        "median":{"confidence_interval":{"confidence_level":0.95,"lower_bound":247707113.75,"upper_bound":260810725.25},"point_estimate":253331371.75,"standard_error":2828868.76},
        "median_abs_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":529136.59,"upper_bound":17809002.0},"point_estimate":6904738.28,"standard_error":4618917.37},
        "slope":null,
        "std_dev":{"confidence_interval":{"confidence_level":0.95,"lower_bound":4796512.35,"upper_bound":14379361.07},"point_estimate":10683848.94,"standard_error":2577772.47}}"#;

    #[test]
    fn parses_criterion_08_files() {
        let e = parse(BENCH, EST).unwrap();
        assert_eq!(e.id, "model/prefill-64/2t");
        assert_eq!(e.group, "model");
        assert_eq!(e.median_ns, 253331371.75);
        assert_eq!(e.median_ci_ns, (247707113.75, 260810725.25));
        assert_eq!(e.mad_ns, 6904738.28);
        assert_eq!(e.throughput, Some(Throughput::Bytes(66355200)));
        let gbs = e.bytes_per_s().unwrap() / 1e9;
        assert!((gbs - 66355200.0 / 253331371.75).abs() < 1e-9);
        assert!((e.spread_pct() - 100.0 * 6904738.28 / 253331371.75).abs() < 1e-9);
        // Round trip through the results-file form.
        assert_eq!(Estimate::from_json(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn throughput_variants_and_errors() {
        let b = BENCH.replace(r#"{"Bytes":66355200}"#, r#"{"Elements":37}"#);
        let e = parse(&b, EST).unwrap();
        assert_eq!(e.throughput, Some(Throughput::Elements(37)));
        assert!(e.bytes_per_s().is_none());
        let b = BENCH.replace(r#"{"Bytes":66355200}"#, "null");
        assert_eq!(parse(&b, EST).unwrap().throughput, None);
        assert!(parse("{}", EST).is_err());
        assert!(parse(BENCH, "{\"mean\":{}}").is_err());
        assert!(parse(BENCH, "not json").is_err());
    }

    #[test]
    fn collects_only_new_files_in_the_tree() {
        let dir = std::env::temp_dir().join(format!("xtask-crit-{}", std::process::id()));
        let new = dir.join("grp/fn_1/new");
        std::fs::create_dir_all(&new).unwrap();
        std::fs::create_dir_all(dir.join("grp/fn_1/base")).unwrap();
        std::fs::write(new.join("benchmark.json"), BENCH).unwrap();
        std::fs::write(new.join("estimates.json"), EST).unwrap();
        std::fs::write(dir.join("grp/fn_1/base/benchmark.json"), "junk").unwrap();
        let all = collect(&dir, None).unwrap();
        assert_eq!(all.len(), 1);
        let later = SystemTime::now() + std::time::Duration::from_secs(3600);
        assert!(collect(&dir, Some(later)).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
