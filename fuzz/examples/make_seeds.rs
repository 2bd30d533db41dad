//! Writes seed corpora for the fuzz targets into `corpus/<target>/` (git-ignored; libFuzzer adds
//! what it finds there):
//! `cargo run --example make_seeds` from the `fuzz/` folder.

use std::path::Path;

use freekv_model::GgmlType;
use freekv_model::gguf::{GgufWriter, MetaValue, TinyLlamaSpec};
use freekv_model::testing::{TinyConfig, tiny_random_model_writer};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

/// GGUF seeds serve both GGUF targets.
fn write_gguf(name: &str, bytes: &[u8]) {
    write("gguf", name, bytes);
    write("gguf_model", name, bytes);
}

fn main() -> Result<(), freekv_model::ModelError> {
    // GGUF: a complete tiny model (smallest shapes), an untied F16 one, metadata-only files.
    let tiny = TinyLlamaSpec {
        n_layers: 1,
        hidden: 32,
        n_heads: 2,
        n_kv_heads: 1,
        ffn_hidden: 32,
        vocab_size: 259,
        context_length: 64,
        ..TinyLlamaSpec::default()
    };
    write_gguf("tiny-q4_1", &tiny.writer()?.to_bytes()?);
    let f16 = TinyLlamaSpec {
        weight_type: GgmlType::F16,
        embd_type: GgmlType::F32,
        tied: false,
        ..tiny.clone()
    };
    write_gguf("tiny-f16-untied", &f16.writer()?.to_bytes()?);
    let q8 = TinyConfig {
        n_layers: 1,
        hidden: 32,
        n_heads: 2,
        n_kv_heads: 1,
        ffn_hidden: 32,
        context_length: 64,
        matrix_type: GgmlType::Q8_0,
        ..TinyConfig::default()
    };
    write_gguf(
        "tiny-merges-chat",
        &tiny_random_model_writer(1, &q8)?.to_bytes()?,
    );
    let mut meta = GgufWriter::new();
    meta.add_meta("general.architecture", MetaValue::String("llama".into()))
        .add_meta("general.alignment", MetaValue::U32(64))
        .add_meta(
            "nested",
            MetaValue::Array(vec![MetaValue::Array(vec![
                MetaValue::I8(-1),
                MetaValue::I8(2),
            ])]),
        )
        .add_meta("f", MetaValue::F64(1.5))
        .add_meta("b", MetaValue::Bool(true));
    meta.add_tensor_f32("x", &[32, 2], GgmlType::Q8_0, &[0.5; 64])?;
    // Every dequantized type, with arbitrary block bytes (NaN and infinite scales included).
    let mut bytes = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                bytes ^= bytes << 13;
                bytes ^= bytes >> 7;
                bytes ^= bytes << 17;
                bytes as u8
            })
            .collect()
    };
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
    ] {
        let n_bytes = ty.bytes_for(512).expect("512 elements");
        meta.add_tensor_bytes(
            format!("t.{}", ty.name()),
            &[256, 2],
            ty,
            noise(n_bytes as usize),
        )?;
    }
    write_gguf("meta-and-one-tensor", &meta.to_bytes()?);
    write_gguf("header-v2", &meta.set_version(2).to_bytes()?);

    // Tokenizer: mode byte then text (0x80 = parse specials) or ids (0x40).
    for (i, text) in [
        "Hello world, the cat sat on the mat.",
        "<|im_start|>user\nHi 12345<|im_end|>\n",
        "  spaces   and\ttabs\n\n\r\nnew lines  ",
        "ünïcödé 日本語 🦀 emoji",
        "don't can't I'll we've they're it's",
    ]
    .iter()
    .enumerate()
    {
        for sel in [0u8, 1, 2, 0x80, 0x82] {
            let mut b = vec![sel];
            b.extend_from_slice(text.as_bytes());
            write("tokenizer", &format!("text-{i}-{sel:02x}"), &b);
        }
    }
    let mut ids = vec![0x40u8];
    for id in [
        1u16,
        100,
        200,
        0xC3 + 3,
        0xA9 + 3,
        258,
        300,
        2,
        0xF0 + 3,
        0x9F + 3,
    ] {
        ids.extend_from_slice(&id.to_le_bytes());
    }
    write("tokenizer", "ids", &ids);

    // Chat: the unstructured bytes of a few conversations.
    write("chat", "smollm", b"\x00{% for message in messages %}{{ '<|im_start|>system\\nYou are nice.<|im_end|>\\n' }}\x00\x02user\x00hello\x00assistant\x00hi\x00\x01");
    write(
        "chat",
        "llama3",
        b"\x02\x03system\x00 be brief \x00user\x00  why?\x00\x01",
    );

    // Eval JSONL.
    write(
        "eval_jsonl",
        "cases",
        br#"{"id": "a", "prompt": "The key is 1234. The key is", "answer": "1234", "max_new_tokens": 8, "meta": {"depth": 0.5}}
{"prompt_ids": [1, 2, 3, 4], "answer": 42}

{"id": 7, "prompt": "x", "answer": "y", "meta": [1, {"a": null}]}
"#,
    );
    Ok(())
}
