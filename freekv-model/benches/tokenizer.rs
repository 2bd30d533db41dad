//! Tokenizer throughput with the default model's vocabulary (SmolLM2, 49,152 tokens, 48,900
//! merges, `smollm` pre-tokenizer).
//!
//! Benchmarks (filter with a substring, e.g. `cargo bench -p freekv-model --bench tokenizer -- encode`):
//! * `build`: `Tokenizer::from_gguf` on the already-parsed GGUF (vocabulary and merge tables);
//! * `encode/text-5k`: the reference `text_1k.txt` repeated 5 times (about 4,900 tokens);
//! * `encode/chat`: the reference chat prompt (37 tokens, specials parsed);
//! * `decode/text-5k`, `stream/text-5k`: the ids of `encode/text-5k` back to text, at once and one
//!   token at a time through `StreamDecoder`.
//!
//! Throughput is input bytes per second. Needs the default model (see `FREEKV_MODEL`) and the
//! reference texts; prints one line and does nothing when either is absent.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use freekv_model::gguf::GgufFile;
use freekv_model::tokenizer::{StreamDecoder, Tokenizer};

const REFERENCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference");
const CHAT_PROMPT: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";

use freekv_model::testing::default_model_path;

fn tokenizer_benches(c: &mut Criterion) {
    let Some(path) = default_model_path() else {
        println!("skipped: default model not cached");
        return;
    };
    let Ok(text_1k) = std::fs::read_to_string(PathBuf::from(REFERENCE_DIR).join("text_1k.txt"))
    else {
        println!("skipped: reference dir not found");
        return;
    };
    let g = GgufFile::open(path).expect("open the default model");
    let tok = Tokenizer::from_gguf(&g).expect("build the tokenizer");

    c.bench_function("build", |b| {
        b.iter(|| Tokenizer::from_gguf(black_box(&g)).expect("build"))
    });

    let text = text_1k.repeat(5);
    let ids = tok.encode(&text, false).expect("encode");
    println!(
        "encode/text-5k: {} bytes -> {} tokens",
        text.len(),
        ids.len()
    );

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("text-5k", |b| {
        b.iter(|| tok.encode(black_box(&text), false).expect("encode"))
    });
    group.throughput(Throughput::Bytes(CHAT_PROMPT.len() as u64));
    group.bench_function("chat", |b| {
        b.iter(|| tok.encode_prompt(black_box(CHAT_PROMPT)).expect("encode"))
    });
    group.finish();

    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("text-5k", |b| {
        b.iter(|| tok.decode(black_box(&ids)).expect("decode"))
    });
    group.finish();

    let mut group = c.benchmark_group("stream");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("text-5k", |b| {
        b.iter(|| {
            let mut d = StreamDecoder::new();
            let mut n = 0;
            for &id in black_box(&ids) {
                n += d.push(&tok, id).expect("push").len();
            }
            n + d.finish().len()
        })
    });
    group.finish();
}

criterion_group!(benches, tokenizer_benches);
criterion_main!(benches);
