//! The KV flags of `freekv generate` and the `freekv eval` subcommand, end to end on a tiny random
//! model written to a temporary file.

use std::path::PathBuf;
use std::process::Command;

use freekv_model::testing::{TinyConfig, tiny_random_model_bytes};

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn setup(name: &str) -> (Tmp, PathBuf) {
    let dir = std::env::temp_dir().join(format!("freekv-kv-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = TinyConfig {
        n_layers: 3,
        context_length: 1024,
        ..TinyConfig::default()
    };
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, tiny_random_model_bytes(5, &cfg).unwrap()).unwrap();
    (Tmp(dir), model)
}

fn freekv(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_freekv"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_kv_flags_give_one_clear_line() {
    let (_t, model) = setup("flags");
    let m = model.to_str().unwrap();
    for (flags, want) in [
        (
            vec!["--kv", "freekv", "--budget", "40"],
            "smaller than sink 16 + window 32",
        ),
        (vec!["--kv", "freekv", "--page-size", "0"], "--page-size"),
        (vec!["--kv", "freekv", "--tau", "1.5"], "--tau"),
        (vec!["--kv", "freekv", "--tau", "-1.5"], "--tau"),
        (
            vec!["--kv", "freekv", "--dense-layers", "3"],
            "dense layer 3",
        ),
        (vec!["--kv", "lru"], "unknown KV policy"),
        (vec!["--kv", "quest", "--summary", "mean"], "--summary"),
        (vec!["--kv", "quest,freekv"], "one --kv policy"),
    ] {
        let mut args = vec!["generate", "--model", m, "--device", "cpu", "-n", "2"];
        args.extend(flags.iter().copied());
        args.push("the cat");
        let (ok, _, err) = freekv(&args);
        assert!(!ok, "{flags:?} should fail");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{flags:?}: {err}");
        assert!(lines[0].contains(want), "{flags:?}: {err}");
    }
}

#[test]
fn generate_with_a_sparse_policy_reports_statistics() {
    let (_t, model) = setup("gen");
    let m = model.to_str().unwrap();
    let ids: Vec<String> = (0..200).map(|i| (3 + (i * 37) % 290).to_string()).collect();
    let ids = ids.join(",");
    let (ok, out, err) = freekv(&[
        "generate",
        "--model",
        m,
        "--device",
        "cpu",
        "-n",
        "6",
        "--json",
        "--kv",
        "freekv",
        "--budget",
        "64",
        "--page-size",
        "4",
        "--sink",
        "4",
        "--window",
        "8",
        "--tau",
        "0.5",
        "--prompt-ids",
        &ids,
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["kv_policy"], "freekv");
    assert!(
        v["kv_stats"]["sparse_layer_steps"].as_u64().unwrap() > 0,
        "{v}"
    );
    assert!(err.contains("kv freekv: sparse"), "{err}");
}

#[test]
fn eval_passkey_cases_and_fidelity() {
    let (t, model) = setup("eval");
    let m = model.to_str().unwrap();
    let (ok, cases, err) = freekv(&[
        "eval",
        "--model",
        m,
        "--make-passkey",
        "--length",
        "300",
        "--n",
        "2",
        "--seed",
        "4",
        "--depth",
        "0.5",
    ]);
    assert!(ok, "{err}");
    assert_eq!(cases.lines().count(), 2);
    let cases_path = t.0.join("cases.jsonl");
    std::fs::write(&cases_path, &cases).unwrap();
    let out_path = t.0.join("res.jsonl");
    let (ok, acc, err) = freekv(&[
        "eval",
        "--model",
        m,
        "--cases",
        cases_path.to_str().unwrap(),
        "--kv",
        "full,arkvale,freekv",
        "--budget",
        "64,128",
        "--page-size",
        "4",
        "--sink",
        "4",
        "--window",
        "8",
        "--out",
        out_path.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // full + 2 budgets × 2 policies = 5 accuracy lines.
    assert_eq!(acc.lines().count(), 5, "{acc}");
    assert!(acc.contains("freekv@128"), "{acc}");
    let res = std::fs::read_to_string(&out_path).unwrap();
    assert_eq!(
        res.lines().count(),
        2 * 5 + 1,
        "one line per (case, policy) + accuracy"
    );
    assert!(res.lines().last().unwrap().contains("\"accuracy\""));

    // A bad line is named.
    std::fs::write(&cases_path, format!("{cases}{{\"prompt\": 3}}\n")).unwrap();
    let (ok, _, err) = freekv(&[
        "eval",
        "--model",
        m,
        "--cases",
        cases_path.to_str().unwrap(),
        "--page-size",
        "4",
        "--sink",
        "4",
        "--window",
        "8",
    ]);
    assert!(!ok);
    assert!(err.contains("line 3"), "{err}");

    // Fidelity of a budget covering the text is exact.
    let text_path = t.0.join("text.txt");
    std::fs::write(
        &text_path,
        "the cat and the hat and the dog on a log. ".repeat(8),
    )
    .unwrap();
    let (ok, out, err) = freekv(&[
        "eval",
        "--model",
        m,
        "--fidelity",
        "--text",
        text_path.to_str().unwrap(),
        "--positions",
        "20",
        "--kv",
        "quest",
        "--budget",
        "1024",
        "--page-size",
        "4",
        "--sink",
        "4",
        "--window",
        "8",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["fidelity"][0]["top1_agreement"], 1.0, "{v}");
    assert_eq!(v["fidelity"][0]["mean_kl"], 0.0, "{v}");
}
