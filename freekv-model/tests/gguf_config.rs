//! LlamaConfig from GGUF metadata: defaults, other architectures' prefixes, RoPE scaling, and
//! clear errors for missing or inconsistent values. Also the tiny random model builder.

use freekv_model::GgmlType;
use freekv_model::ModelError;
use freekv_model::config::LlamaConfig;
use freekv_model::gguf::{GgufFile, GgufWriter, MetaValue, TinyLlamaSpec};

/// Metadata of a small model under `arch`, with a matching F32 token_embd [64, 300].
fn writer(arch: &str) -> GgufWriter {
    let mut w = GgufWriter::new();
    let k = |s: &str| format!("{arch}.{s}");
    w.add_meta("general.architecture", MetaValue::String(arch.into()))
        .add_meta(k("block_count"), MetaValue::U32(3))
        .add_meta(k("embedding_length"), MetaValue::U32(64))
        .add_meta(k("attention.head_count"), MetaValue::U32(4))
        .add_meta(k("attention.head_count_kv"), MetaValue::U32(2))
        .add_meta(k("feed_forward_length"), MetaValue::U32(96))
        .add_meta(k("context_length"), MetaValue::U64(4096))
        .add_meta(k("rope.freq_base"), MetaValue::F32(10000.0))
        .add_meta(k("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-6))
        .add_meta(k("vocab_size"), MetaValue::U32(300));
    w.add_tensor_bytes(
        "token_embd.weight",
        &[64, 300],
        GgmlType::F32,
        vec![0; 64 * 300 * 4],
    )
    .unwrap();
    w
}

fn config(w: &GgufWriter) -> Result<LlamaConfig, ModelError> {
    LlamaConfig::from_gguf(&GgufFile::from_bytes("cfg.gguf", w.to_bytes().unwrap()).unwrap())
}

#[track_caller]
fn bad_key(r: Result<LlamaConfig, ModelError>, key: &str) -> String {
    match r {
        Err(ModelError::BadMetadata { key: k, msg }) => {
            assert_eq!(k, key, "{msg}");
            msg
        }
        other => panic!("expected BadMetadata for {key}, got {other:?}"),
    }
}

#[test]
fn reads_llama_keys_with_defaults() {
    let c = config(&writer("llama")).unwrap();
    assert_eq!(
        (
            c.n_layers,
            c.hidden,
            c.n_heads,
            c.n_kv_heads,
            c.head_dim,
            c.ffn_hidden
        ),
        (3, 64, 4, 2, 16, 96)
    );
    assert_eq!(
        (c.vocab_size, c.context_length, c.rope_dim),
        (300, 4096, 16)
    );
    assert_eq!((c.rope_theta, c.rms_eps), (10000.0, 1e-6));
    assert!(c.tied_embeddings && c.rope_freq_factors.is_none());
    assert_eq!(c.group_size(), 2);
    // theta^(-2i/16) = 10^(-i/2): i = 0, 1, 4, 7.
    let f = c.inv_freqs();
    assert_eq!(f.len(), 8);
    for (i, want) in [
        (0, 1.0f32),
        (1, 0.316_227_77),
        (4, 0.01),
        (7, 0.000_316_227_77),
    ] {
        assert!(
            (f[i] - want).abs() <= 1e-6 * want,
            "{i}: {} vs {want}",
            f[i]
        );
    }
}

#[test]
fn optional_keys_fall_back() {
    let mut w = GgufWriter::new();
    w.add_meta("general.architecture", MetaValue::String("llama".into()))
        .add_meta("llama.block_count", MetaValue::U32(1))
        .add_meta("llama.embedding_length", MetaValue::U32(64))
        .add_meta("llama.attention.head_count", MetaValue::U32(4))
        .add_meta("llama.feed_forward_length", MetaValue::U32(96))
        .add_meta("llama.context_length", MetaValue::U32(128))
        .add_meta(
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(1e-5),
        );
    w.add_tensor_bytes(
        "token_embd.weight",
        &[64, 10],
        GgmlType::F32,
        vec![0; 64 * 10 * 4],
    )
    .unwrap();
    w.add_tensor_bytes(
        "output.weight",
        &[64, 10],
        GgmlType::F32,
        vec![0; 64 * 10 * 4],
    )
    .unwrap();
    // No KV head count (= heads), no RoPE base (10000), no vocab size key and no token list
    // (token_embd rows), separate output head.
    let c = config(&w).unwrap();
    assert_eq!(
        (c.n_kv_heads, c.rope_theta, c.vocab_size, c.tied_embeddings),
        (4, 10000.0, 10, false)
    );
    // A token list gives the vocabulary size when the key is absent.
    w.add_meta(
        "tokenizer.ggml.tokens",
        MetaValue::Array((0..10).map(|i| MetaValue::String(i.to_string())).collect()),
    );
    assert_eq!(config(&w).unwrap().vocab_size, 10);
}

#[test]
fn other_architectures_use_their_prefix() {
    for arch in ["qwen2", "mistral"] {
        let c = config(&writer(arch)).unwrap();
        assert_eq!(c.arch, arch);
        assert_eq!((c.n_layers, c.n_heads, c.n_kv_heads), (3, 4, 2));
    }
    // llama keys under another architecture name are not read.
    let mut w = writer("llama");
    w.add_meta("general.architecture", MetaValue::String("qwen2".into()));
    assert!(matches!(config(&w), Err(ModelError::MissingMetadata(k)) if k == "qwen2.block_count"));
}

#[test]
fn missing_and_malformed_values() {
    let mut w = GgufWriter::new();
    w.add_meta("x", MetaValue::U8(0));
    assert!(
        matches!(config(&w), Err(ModelError::MissingMetadata(k)) if k == "general.architecture")
    );
    let mut w = writer("llama");
    w.add_meta("general.architecture", MetaValue::U32(1));
    bad_key(config(&w), "general.architecture");

    let required = [
        "block_count",
        "embedding_length",
        "attention.head_count",
        "feed_forward_length",
        "context_length",
    ];
    for key in required.iter().chain(&["attention.layer_norm_rms_epsilon"]) {
        let base = writer("llama").to_bytes().unwrap();
        let g = GgufFile::from_bytes("cfg.gguf", base).unwrap();
        let mut w = GgufWriter::new();
        for (k, v) in g.metadata() {
            if *k != format!("llama.{key}") {
                w.add_meta(k.clone(), v.clone());
            }
        }
        w.add_tensor_bytes(
            "token_embd.weight",
            &[64, 300],
            GgmlType::F32,
            vec![0; 64 * 300 * 4],
        )
        .unwrap();
        assert!(
            matches!(config(&w), Err(ModelError::MissingMetadata(k)) if k == format!("llama.{key}")),
            "{key}"
        );
    }

    let cases: Vec<(&str, MetaValue, &str)> = vec![
        ("llama.block_count", MetaValue::U32(0), "outside"),
        ("llama.block_count", MetaValue::U64(1 << 40), "outside"),
        (
            "llama.block_count",
            MetaValue::I32(-3),
            "non-negative integer",
        ),
        (
            "llama.block_count",
            MetaValue::String("3".into()),
            "non-negative integer",
        ),
        (
            "llama.attention.head_count",
            MetaValue::Array(vec![MetaValue::U32(4); 3]),
            "per-layer",
        ),
        (
            "llama.attention.head_count",
            MetaValue::U32(5),
            "do not divide the embedding length",
        ),
        (
            "llama.attention.head_count_kv",
            MetaValue::U32(3),
            "do not divide 4 query heads",
        ),
        (
            "llama.attention.key_length",
            MetaValue::U32(15),
            "must be even",
        ),
        (
            "llama.attention.value_length",
            MetaValue::U32(32),
            "differs",
        ),
        (
            "llama.rope.dimension_count",
            MetaValue::U32(32),
            "at most the head dimension",
        ),
        (
            "llama.rope.dimension_count",
            MetaValue::U32(7),
            "must be even",
        ),
        (
            "llama.rope.freq_base",
            MetaValue::F32(0.5),
            "greater than 1",
        ),
        (
            "llama.rope.freq_base",
            MetaValue::F64(f64::INFINITY),
            "not finite",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::F32(0.0),
            "(0, 1)",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            MetaValue::Bool(true),
            "expected a number",
        ),
    ];
    for (key, value, needle) in cases {
        let mut w = writer("llama");
        w.add_meta(key, value.clone());
        let msg = bad_key(config(&w), key);
        assert!(msg.contains(needle), "{key} = {value:?}: {msg}");
    }
}

#[test]
fn embedding_tensor_is_checked() {
    let mut w = writer("llama");
    w.add_meta("llama.vocab_size", MetaValue::U32(301));
    let e = config(&w).unwrap_err().to_string();
    assert!(
        e.contains("token_embd.weight") && e.contains("[64, 301]"),
        "{e}"
    );
    let mut w = GgufWriter::new();
    let g = GgufFile::from_bytes("cfg.gguf", writer("llama").to_bytes().unwrap()).unwrap();
    for (k, v) in g.metadata() {
        w.add_meta(k.clone(), v.clone());
    }
    assert!(matches!(config(&w), Err(ModelError::MissingTensor(t)) if t == "token_embd.weight"));
}

#[test]
fn llama3_rope_scaling_from_metadata() {
    let mut w = writer("llama");
    w.add_meta("llama.attention.head_count", MetaValue::U32(1))
        .add_meta("llama.attention.head_count_kv", MetaValue::U32(1))
        .add_meta("llama.attention.key_length", MetaValue::U32(128))
        .add_meta("llama.rope.freq_base", MetaValue::F32(500000.0))
        .add_meta(
            "llama.rope.scaling.type",
            MetaValue::String("llama3".into()),
        )
        .add_meta("llama.rope.scaling.factor", MetaValue::F32(8.0));
    let c = config(&w).unwrap();
    let f = c.rope_freq_factors.clone().unwrap();
    assert_eq!(f.len(), 64);
    // Hand-computed (Python, float64) with low 1, high 4, original context 8192: wavelengths
    // 2π·500000^(i/64) below 2048 keep factor 1, above 8192 get 8, in between blend smoothly.
    for (i, want) in [
        (0, 1.0),
        (28, 1.0),
        (29, 1.207_483_9),
        (30, 1.553_414_6),
        (34, 5.257_326_6),
        (35, 8.0),
        (63, 8.0),
    ] {
        assert!(
            (f[i] - want).abs() <= 1e-5 * want,
            "factor {i}: {} vs {want}",
            f[i]
        );
    }
    let inv = c.inv_freqs();
    let plain = 500000f64.powf(-60.0 / 128.0);
    assert!(((inv[30] as f64) - plain / 1.553_414_6).abs() <= 1e-6 * plain);

    // Explicit low/high/original context change the band.
    w.add_meta(
        "llama.rope.scaling.original_context_length",
        MetaValue::U32(1024),
    );
    let g = config(&w).unwrap().rope_freq_factors.unwrap();
    assert!(
        g[25] > f[25],
        "a shorter original context scales more frequencies"
    );
    w.add_meta("llama.rope.scaling.high_freq_factor", MetaValue::F32(0.5));
    bad_key(config(&w), "llama.rope.scaling.high_freq_factor");
}

#[test]
fn other_rope_scaling_types() {
    let mut w = writer("llama");
    w.add_meta("llama.rope.scaling.type", MetaValue::String("none".into()));
    assert!(config(&w).unwrap().rope_freq_factors.is_none());
    w.add_meta(
        "llama.rope.scaling.type",
        MetaValue::String("linear".into()),
    );
    assert!(
        matches!(config(&w), Err(ModelError::MissingMetadata(k)) if k == "llama.rope.scaling.factor")
    );
    w.add_meta("llama.rope.scaling.factor", MetaValue::F32(4.0));
    let c = config(&w).unwrap();
    assert_eq!(c.rope_freq_factors, Some(vec![4.0; 8]));
    assert!((c.inv_freqs()[4] - 0.0025).abs() < 1e-9);
    w.add_meta("llama.rope.scaling.factor", MetaValue::F32(0.5));
    bad_key(config(&w), "llama.rope.scaling.factor");
    w.add_meta("llama.rope.scaling.type", MetaValue::String("yarn".into()));
    let msg = bad_key(config(&w), "llama.rope.scaling.type");
    assert!(msg.contains("yarn"), "{msg}");
}

#[test]
fn rope_freqs_tensor_wins() {
    let mut w = writer("llama");
    w.add_meta("llama.rope.scaling.type", MetaValue::String("yarn".into()));
    let factors = [1.0f32, 1.0, 1.5, 2.0, 3.0, 4.0, 8.0, 8.0];
    w.add_tensor_f32("rope_freqs.weight", &[8], GgmlType::F32, &factors)
        .unwrap();
    let c = config(&w).unwrap();
    assert_eq!(c.rope_freq_factors.as_deref(), Some(&factors[..]));
    assert!((c.inv_freqs()[4] - 0.01 / 3.0).abs() < 1e-9);

    let mut w = writer("llama");
    w.add_tensor_f32("rope_freqs.weight", &[4], GgmlType::F32, &[1.0; 4])
        .unwrap();
    assert!(matches!(config(&w), Err(ModelError::Shape(m)) if m.contains("rope_freqs")));
    let mut w = writer("llama");
    w.add_tensor_f32(
        "rope_freqs.weight",
        &[8],
        GgmlType::F32,
        &[1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    )
    .unwrap();
    assert!(matches!(config(&w), Err(ModelError::Shape(m)) if m.contains("invalid factor")));
}

#[test]
fn tiny_llama_builds_a_consistent_model() {
    let spec = TinyLlamaSpec::default();
    let bytes = spec.writer().unwrap().to_bytes().unwrap();
    assert_eq!(
        bytes,
        spec.writer().unwrap().to_bytes().unwrap(),
        "deterministic"
    );
    let g = GgufFile::from_bytes("tiny.gguf", bytes).unwrap();
    let c = LlamaConfig::from_gguf(&g).unwrap();
    assert_eq!(
        (c.n_layers, c.hidden, c.n_heads, c.n_kv_heads, c.head_dim),
        (2, 64, 4, 2, 16)
    );
    assert_eq!(
        (
            c.ffn_hidden,
            c.vocab_size,
            c.context_length,
            c.tied_embeddings
        ),
        (128, 320, 256, true)
    );
    assert_eq!(g.tensors().len(), 1 + 2 * 9 + 1);
    assert_eq!(g.tensor("blk.1.attn_k.weight").unwrap().dims, vec![64, 32]);
    assert_eq!(
        g.tensor("blk.0.ffn_down.weight").unwrap().dims,
        vec![128, 64]
    );
    assert_eq!(
        g.tensor("blk.0.ffn_down.weight").unwrap().ty,
        GgmlType::Q4_1
    );
    assert_eq!(g.tensor("token_embd.weight").unwrap().ty, GgmlType::Q8_0);
    let tokens = g
        .get("tokenizer.ggml.tokens")
        .and_then(MetaValue::as_array)
        .unwrap();
    assert_eq!(tokens.len(), 320);
    assert_eq!(tokens[2].as_str(), Some("<|im_end|>"));
    assert_eq!(tokens[3 + b' ' as usize].as_str(), Some("Ġ"));
    // Weights are random, scaled by 1/sqrt(fan_in); norms are near 1.
    let q = g.tensor_f32("blk.0.attn_q.weight").unwrap();
    let mean_abs = q.iter().map(|x| x.abs()).sum::<f32>() / q.len() as f32;
    assert!((mean_abs - 0.5 / 8.0).abs() < 0.01, "{mean_abs}");
    let n = g.tensor_f32("output_norm.weight").unwrap();
    assert!(n.iter().all(|x| (0.89..1.11).contains(x)));

    let other = TinyLlamaSpec {
        tied: false,
        weight_type: GgmlType::F32,
        seed: 9,
        ..spec.clone()
    };
    let g = GgufFile::from_bytes("tiny.gguf", other.writer().unwrap().to_bytes().unwrap()).unwrap();
    assert!(!LlamaConfig::from_gguf(&g).unwrap().tied_embeddings);
    assert_eq!(g.tensor("output.weight").unwrap().dims, vec![64, 320]);
    assert!(
        TinyLlamaSpec {
            n_heads: 3,
            ..spec.clone()
        }
        .writer()
        .is_err()
    );
    assert!(
        TinyLlamaSpec {
            vocab_size: 100,
            ..spec.clone()
        }
        .writer()
        .is_err()
    );
    assert!(
        TinyLlamaSpec {
            hidden: 48,
            n_heads: 3,
            n_kv_heads: 1,
            ..spec
        }
        .writer()
        .is_err(),
        "48 is not Q4_1 blocks"
    );
}
