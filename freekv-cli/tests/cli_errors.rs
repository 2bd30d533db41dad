//! Bad flags, files and prompts: every one ends the `freekv` binary with a non-zero exit and
//! exactly one line on stderr naming the problem (no usage block, no panic, no backtrace). Also
//! the host KV bound (`--max-host-kv-gib`) and `--ignore-eos`, on a tiny random model written to
//! a temporary folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use freekv_model::gguf::MetaValue;
use freekv_model::testing::{TinyConfig, tiny_random_model_bytes, tiny_random_model_writer};

struct Tmp(PathBuf);

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tiny_config() -> TinyConfig {
    TinyConfig {
        n_layers: 3,
        context_length: 256,
        ..TinyConfig::default()
    }
}

fn setup(name: &str) -> (Tmp, PathBuf) {
    let dir = std::env::temp_dir().join(format!("freekv-cli-errors-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny.gguf");
    std::fs::write(&model, tiny_random_model_bytes(5, &tiny_config()).unwrap()).unwrap();
    (Tmp(dir), model)
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn freekv(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_freekv"))
        .args(args)
        // Never fetch the default model from a test, never read a terminal.
        .env(
            "FREEKV_HOME",
            std::env::temp_dir().join("freekv-cli-errors-no-home"),
        )
        .env_remove("FREEKV_MODEL")
        .env_remove("FREEKV_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts a failed run with one stderr line that contains `want`.
fn assert_one_line_error(args: &[&str], want: &str) {
    let o = freekv(args);
    assert!(
        matches!(o.code, Some(c) if c != 0),
        "{args:?} should fail, exit {:?}, stdout {}",
        o.code,
        o.stdout
    );
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: stderr is not one line:\n{}",
        o.stderr
    );
    let line = lines[0];
    assert!(line.starts_with("freekv: error: "), "{args:?}: {line}");
    assert!(
        line.contains(want),
        "{args:?}: `{line}` does not name `{want}`"
    );
    for bad in ["panicked", "RUST_BACKTRACE", "Usage:"] {
        assert!(!line.contains(bad), "{args:?}: {line}");
    }
}

fn generate_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["generate", "--model", model, "--device", "cpu"];
    v.extend_from_slice(extra);
    v
}

#[test]
fn bad_generation_flags_give_one_clear_line() {
    let (_t, model) = setup("flags");
    let m = model.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["-n", "0", "hi"], "--max-new-tokens must be at least 1"),
        (&["--repeat", "0", "hi"], "--repeat must be at least 1"),
        (&["--temperature", "-1", "hi"], "--temperature"),
        (&["--temperature", "NaN", "hi"], "--temperature"),
        (&["--temperature", "inf", "hi"], "--temperature"),
        (&["--top-p", "0", "hi"], "--top-p"),
        (&["--top-p", "1.5", "hi"], "--top-p"),
        (&["--top-p", "-0.5", "hi"], "--top-p"),
        (
            &["--page-size", "0", "hi"],
            "--page-size must be at least 1",
        ),
        (
            &["--kv", "freekv", "--budget", "40", "hi"],
            "smaller than sink 16 + window 32 + one page",
        ),
        // Exactly sink + window leaves no page to select: refused too.
        (
            &["--kv", "freekv", "--budget", "48", "hi"],
            "smaller than sink 16 + window 32 + one page",
        ),
        (&["--window", "0", "hi"], "window must be at least 1"),
        (&["--tau", "1.5", "hi"], "--tau"),
        (&["--tau", "-1.01", "hi"], "--tau"),
        (&["--tau", "often", "hi"], "--tau"),
        (&["--tau", "nan", "hi"], "--tau"),
        (&["--kv", "lru", "hi"], "unknown KV policy `lru`"),
        (&["--kv", "quest,freekv", "hi"], "one --kv policy"),
        (&["--budget", "256,512", "hi"], "one --budget"),
        (&["--group-policy", "median", "hi"], "--group-policy"),
        (&["--summary", "mean", "hi"], "--summary"),
        (&["--recall", "later", "hi"], "recall mode"),
        (
            &["--dense-layers", "99", "hi"],
            "dense layer 99 does not exist",
        ),
        (&["--dense-layers", "0,x", "hi"], "dense layers"),
        (&["--max-host-kv-gib", "0", "hi"], "--max-host-kv-gib"),
        (&["--max-host-kv-gib", "-2", "hi"], "--max-host-kv-gib"),
        (&["--max-host-kv-gib", "nan", "hi"], "--max-host-kv-gib"),
        (&["--spare-pages", "some", "hi"], "--spare-pages"),
        (&["--spare-pages", "-1", "hi"], "--spare-pages"),
        (&["--reserve-sms", "-1", "hi"], "--reserve-sms"),
        (&["--reserve-sms", "half", "hi"], "--reserve-sms"),
        (&[""], "the prompt is empty"),
        (
            &["--prompt-ids", "1,2,99999"],
            "outside the model's vocabulary",
        ),
        (&["--prompt-ids", "1,x"], "--prompt-ids"),
        // Usage errors from the parser: one line, with the tip when there is one.
        (&["--system", "be brief", "hi"], "--chat"),
        (&["--bogus", "hi"], "--bogus"),
        (&["-n", "many", "hi"], "many"),
    ];
    for (extra, want) in cases {
        assert_one_line_error(&generate_args(m, extra), want);
    }
    // Exit codes: 2 for what the parser rejects, 1 for the rest.
    assert_eq!(freekv(&generate_args(m, &["--bogus", "hi"])).code, Some(2));
    assert_eq!(freekv(&generate_args(m, &["-n", "0", "hi"])).code, Some(1));
    assert_one_line_error(
        &["generate", "--model", m, "--device", "tpu", "hi"],
        "invalid value 'tpu' for '--device <DEVICE>'",
    );
    // A synthetic model on the CPU.
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "synthetic:llama-3.1-8b",
            "--device",
            "cpu",
            "--prompt-ids",
            "1",
        ],
        "CUDA decoder only",
    );
}

#[test]
fn bad_files_and_prompts_give_one_clear_line() {
    let (t, model) = setup("files");
    let m = model.to_str().unwrap();
    let dir = t.0.to_str().unwrap();
    let missing = t.0.join("missing.gguf");
    let text = t.0.join("notes.txt");
    std::fs::write(&text, "just some text, not a model").unwrap();
    let truncated = t.0.join("truncated.gguf");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let empty = t.0.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let latin1 = t.0.join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    let long = t.0.join("long.txt");
    std::fs::write(&long, "the cat and the hat ".repeat(200)).unwrap();

    let p = |path: &Path| path.to_str().unwrap().to_string();
    let (missing, text, truncated, empty, latin1, long) = (
        p(&missing),
        p(&text),
        p(&truncated),
        p(&empty),
        p(&latin1),
        p(&long),
    );
    let gen_model = |model: &str| {
        vec![
            "generate".to_string(),
            "--model".into(),
            model.into(),
            "--device".into(),
            "cpu".into(),
            "hi".into(),
        ]
    };
    let owned: Vec<(Vec<String>, &str)> = vec![
        (gen_model(&missing), "does not exist"),
        (gen_model(dir), "is not a file"),
        (gen_model(&text), "not a GGUF file"),
        (gen_model(&truncated), "truncated"),
        (
            generate_args(m, &["--prompt-file", &missing])
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "cannot read prompt file",
        ),
        (
            generate_args(m, &["--prompt-file", dir])
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "cannot read prompt file",
        ),
        (
            generate_args(m, &["--prompt-file", &empty])
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "the prompt is empty",
        ),
        (
            generate_args(m, &["--prompt-file", &latin1])
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "UTF-8",
        ),
        (
            generate_args(m, &["--prompt-file", &long])
                .iter()
                .map(|s| s.to_string())
                .collect(),
            "more than the model's context of 256 tokens",
        ),
        (
            vec!["info".into(), "--model".into(), text.clone()],
            "not a GGUF file",
        ),
        (
            vec![
                "tokenize".into(),
                "--model".into(),
                missing.clone(),
                "x".into(),
            ],
            "does not exist",
        ),
        (
            vec!["eval".into(), "--model".into(), m.into()],
            "eval needs --cases FILE",
        ),
        (
            vec![
                "eval".into(),
                "--model".into(),
                m.into(),
                "--cases".into(),
                missing.clone(),
            ],
            "cannot read --cases file",
        ),
        (
            vec![
                "eval".into(),
                "--model".into(),
                m.into(),
                "--cases".into(),
                text.clone(),
            ],
            "cases line 1: not JSON",
        ),
        (
            vec![
                "eval".into(),
                "--model".into(),
                m.into(),
                "--make-passkey".into(),
                "--depth".into(),
                "2".into(),
            ],
            "--depth",
        ),
    ];
    for (args, want) in &owned {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&args, want);
    }
}

#[test]
fn errors_before_the_device_probe_are_one_line_with_the_default_device() {
    // With `--device auto` a machine without a GPU prints a "using the CPU" line once the device
    // is probed; everything that can be checked earlier is, so these stay one line anywhere.
    let (t, model) = setup("auto");
    let m = model.to_str().unwrap();
    let long = t.0.join("long.txt");
    std::fs::write(&long, "the cat and the hat ".repeat(200)).unwrap();
    let long = long.to_str().unwrap();
    for (args, want) in [
        (
            vec!["generate", "--model", m, "--prompt-file", long],
            "more than the model's context",
        ),
        (
            vec![
                "generate", "--model", m, "--kv", "freekv", "--budget", "8", "x",
            ],
            "smaller than sink",
        ),
        (
            vec!["generate", "--model", m, "--dense-layers", "7", "x"],
            "dense layer 7",
        ),
        (
            vec!["generate", "--model", m, "--prompt-ids", "4000"],
            "outside the model's vocabulary",
        ),
    ] {
        assert_one_line_error(&args, want);
    }
}

#[test]
fn host_kv_limit_refuses_runs_that_do_not_fit() {
    let (_t, model) = setup("hostkv");
    let m = model.to_str().unwrap();
    // Tiny model: 3 layers × 2 KV heads × head dim 16 × (K, V) × 4 bytes = 768 bytes per token.
    // 100 + 20 tokens in pages of 8: 15 pages × 3 layers × 8 × 256 bytes = 92160 bytes; freekv
    // mirrors the 2 sparse layers (layer 0 is dense): 5/3 of that = 153600 bytes.
    let ids: Vec<String> = (0..100).map(|i| (3 + (i * 37) % 290).to_string()).collect();
    let ids = ids.join(",");
    let run = |gib: &str| {
        freekv(&[
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "--kv",
            "freekv",
            "--budget",
            "64",
            "--sink",
            "8",
            "--window",
            "16",
            "-n",
            "20",
            "--ignore-eos",
            "--json",
            "--prompt-ids",
            &ids,
            "--max-host-kv-gib",
            gib,
        ])
    };
    let gib = |bytes: f64| format!("{}", bytes / (1u64 << 30) as f64);
    let small = run(&gib(153_000.0));
    assert_eq!(small.code, Some(1), "{}", small.stderr);
    let line = small.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.contains("needs 0.000") && line.contains("raise --max-host-kv-gib or lower -n"),
        "{line}"
    );
    let enough = run(&gib(153_600.0));
    assert_eq!(enough.code, Some(0), "{}", enough.stderr);
    let v: serde_json::Value = serde_json::from_str(enough.stdout.trim()).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 20, "{v}");
    assert_eq!(v["stop"], "length");
}

#[test]
fn ignore_eos_generates_past_the_end_of_generation_token() {
    let (t, model) = setup("eos");
    let m = model.to_str().unwrap();
    let gen_json = |model: &str, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--device",
            "cpu",
            "-n",
            "12",
            "--json",
            "--prompt-ids",
            "5,6,7,8",
        ];
        args.extend_from_slice(extra);
        let o = freekv(&args);
        assert_eq!(o.code, Some(0), "{}", o.stderr);
        serde_json::from_str::<serde_json::Value>(o.stdout.trim()).unwrap()
    };
    // Make the first greedy token of this prompt the model's end-of-sequence token.
    let first = gen_json(m, &[])["generated_ids"][0].as_u64().unwrap();
    let mut w = tiny_random_model_writer(5, &tiny_config()).unwrap();
    w.add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(first as u32));
    let eos_model = t.0.join("eos.gguf");
    w.write_to(&eos_model).unwrap();
    let e = eos_model.to_str().unwrap();
    let stopped = gen_json(e, &[]);
    assert_eq!(stopped["stop"], "eog", "{stopped}");
    assert_eq!(stopped["generated_ids"].as_array().unwrap().len(), 1);
    let went_on = gen_json(e, &["--ignore-eos"]);
    assert_eq!(went_on["stop"], "length", "{went_on}");
    assert_eq!(went_on["generated_ids"].as_array().unwrap().len(), 12);
    assert_eq!(went_on["generated_ids"][0].as_u64(), Some(first));
}

#[test]
fn repeat_runs_each_generation_as_a_new_sequence() {
    let (_t, model) = setup("repeat");
    let m = model.to_str().unwrap();
    let o = freekv(&[
        "generate",
        "--model",
        m,
        "--device",
        "cpu",
        "--kv",
        "freekv",
        "--budget",
        "64",
        "--sink",
        "8",
        "--window",
        "16",
        "-n",
        "40",
        "--ignore-eos",
        "--repeat",
        "3",
        "--json",
        "--prompt-ids",
        "5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30",
    ]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let runs: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 3);
    // Greedy from the same prompt on a fresh sequence: the same tokens every time (a run that
    // kept state from the previous one would differ).
    for r in &runs {
        assert_eq!(r["generated_ids"].as_array().unwrap().len(), 40);
        assert_eq!(r["generated_ids"], runs[0]["generated_ids"]);
        assert_eq!(r["timings"]["prompt_tokens"], 26);
    }
    for i in 1..=3 {
        assert!(
            o.stderr
                .contains(&format!("freekv: run {i}/3: prompt 26 tokens")),
            "{}",
            o.stderr
        );
    }
}

#[test]
fn a_kv_cache_larger_than_the_memory_is_refused_up_front() {
    // A model whose metadata claims a context of 2^28 tokens: with -n that large, the KV cache
    // (768 bytes per token over 3 layers, 5/3 of it with freekv's host mirror) needs ~320 GiB.
    let (t, _) = setup("mem");
    let mut w = tiny_random_model_writer(5, &tiny_config()).unwrap();
    w.add_meta("llama.context_length", MetaValue::U32(1 << 28));
    let model = t.0.join("long-context.gguf");
    w.write_to(&model).unwrap();
    let need = (1u64 << 28) as f64 * 768.0 * 5.0 / 3.0;
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let l = m
                .lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .to_string();
            l.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map(|kib| kib * 1024.0);
    match available {
        Some(a) if a < need => {}
        _ => {
            println!("skipped: this machine has more memory than the test's KV cache, or no /proc");
            return;
        }
    }
    let m = model.to_str().unwrap();
    assert_one_line_error(
        &[
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "--kv",
            "freekv",
            "-n",
            "268435000",
            "hi",
        ],
        "of memory is available: lower -n or the prompt length",
    );
    // Bounded by the flag instead, the message names the flag.
    assert_one_line_error(
        &[
            "generate",
            "--model",
            m,
            "--device",
            "cpu",
            "-n",
            "268435000",
            "--max-host-kv-gib",
            "1",
            "hi",
        ],
        "above --max-host-kv-gib 1",
    );
}
