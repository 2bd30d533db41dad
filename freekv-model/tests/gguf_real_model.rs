//! The default model file (SmolLM2-135M-Instruct Q4_1) parses with the expected layout and values.
//! Skips with one line when the file is not cached.

use freekv_model::GgmlType;
use freekv_model::config::LlamaConfig;
use freekv_model::gguf::GgufFile;

use freekv_model::testing::default_model_path;

fn open() -> Option<GgufFile> {
    match default_model_path() {
        Some(p) => Some(GgufFile::open(p).unwrap()),
        None => {
            println!("skipped: default model not cached");
            None
        }
    }
}

fn mean_abs(x: &[f32]) -> f64 {
    x.iter().map(|v| v.abs() as f64).sum::<f64>() / x.len() as f64
}

#[test]
fn layout_and_metadata() {
    let Some(g) = open() else { return };
    assert_eq!(g.version(), 3);
    assert_eq!(g.tensors().len(), 272);
    assert_eq!(g.metadata().len(), 33);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset(), 1_785_664);
    assert_eq!(
        g.get("general.architecture").and_then(|v| v.as_str()),
        Some("llama")
    );
    assert_eq!(
        g.get("tokenizer.ggml.pre").and_then(|v| v.as_str()),
        Some("smollm")
    );
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[1].as_str(), Some("<|im_start|>"));
    let merges = g
        .get("tokenizer.ggml.merges")
        .and_then(|v| v.as_array())
        .unwrap();
    assert_eq!(merges.len(), 48900);

    let count = |ty| g.tensors().iter().filter(|t| t.ty == ty).count();
    assert_eq!(count(GgmlType::F32), 61);
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::Q8_0), 1);
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ty, GgmlType::Q8_0);
    assert_eq!(embd.dims, vec![576, 49152]);
    assert_eq!(embd.n_elements(), 576 * 49152);
    assert_eq!(embd.n_bytes, 576 * 49152 / 32 * 34);
    assert!(g.tensor("output.weight").is_none());
    assert_eq!(
        g.tensor("blk.0.ffn_down.weight").unwrap().dims,
        vec![1536, 576]
    );
    assert_eq!(
        g.tensor("blk.29.attn_k.weight").unwrap().dims,
        vec![576, 192]
    );
    // The last tensor ends within the file.
    let end = g
        .tensors()
        .iter()
        .map(|t| g.data_offset() + t.offset + t.n_bytes)
        .max()
        .unwrap();
    assert!(end <= g.file_size());

    let s = g.summary();
    assert!(s.contains("general.architecture = \"llama\""), "{s}");
    assert!(
        s.contains("tokenizer.ggml.tokens = [49152 items of string]"),
        "{s}"
    );
    assert!(s.contains("tensors: 272"), "{s}");
}

#[test]
fn config() {
    let Some(g) = open() else { return };
    let c = LlamaConfig::from_gguf(&g).unwrap();
    assert_eq!(c.arch, "llama");
    assert_eq!(c.n_layers, 30);
    assert_eq!(c.hidden, 576);
    assert_eq!(c.n_heads, 9);
    assert_eq!(c.n_kv_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.ffn_hidden, 1536);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.context_length, 8192);
    assert_eq!(c.rope_dim, 64);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_eps, 1e-5);
    assert!(c.tied_embeddings);
    assert!(c.rope_freq_factors.is_none());
    let f = c.inv_freqs();
    assert_eq!(f.len(), 32);
    assert_eq!(f[0], 1.0);
    let want = 100000f64.powf(-62.0 / 64.0);
    assert!(((f[31] as f64 - want) / want).abs() < 1e-6);
}

#[test]
fn dequantized_magnitudes() {
    let Some(g) = open() else { return };
    // Reference magnitudes: blk.0.attn_q and output_norm from rust-notes §3.4; token_embd from an
    // independent Python parse of the file (0.098976; the notes' 0.092 did not reproduce).
    let e = g.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(e.len(), 576 * 49152);
    let m = mean_abs(&e);
    assert!((m - 0.098976).abs() < 1e-4, "token_embd mean |x| = {m}");
    let q = g.tensor_f32("blk.0.attn_q.weight").unwrap();
    let m = mean_abs(&q);
    assert!((m - 0.191079).abs() < 1e-4, "blk.0.attn_q mean |x| = {m}");
    let n = g.tensor_f32("output_norm.weight").unwrap();
    let m = mean_abs(&n);
    assert!((m - 1.81).abs() < 0.015, "output_norm mean |x| = {m}");
    assert!(e.iter().chain(&q).chain(&n).all(|x| x.is_finite()));
}

#[test]
fn every_tensor_dequantizes() {
    let Some(g) = open() else { return };
    for t in g.tensors() {
        let v = g.tensor_f32(&t.name).unwrap();
        assert_eq!(v.len() as u64, t.n_elements(), "{}", t.name);
        assert!(v.iter().all(|x| x.is_finite()), "{}", t.name);
    }
}
