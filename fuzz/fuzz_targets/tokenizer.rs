//! The tokenizer on arbitrary text and ids, over a small synthetic vocabulary (the tiny test
//! model's: 3 specials, 256 byte tokens, 41 merges) with each pre-tokenizer family.
//!
//! Checked properties besides "no panic": encoding valid UTF-8 and decoding gives the text back
//! (byte-level BPE is lossless), and streaming decode of any id sequence concatenates to the
//! one-shot decode.
#![no_main]

use std::sync::OnceLock;

use freekv_model::testing::{TinyConfig, tiny_random_model};
use freekv_model::tokenizer::{StreamDecoder, Tokenizer, TokenizerSpec};
use libfuzzer_sys::fuzz_target;

fn tokenizers() -> &'static [Tokenizer] {
    static T: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    T.get_or_init(|| {
        let cfg = TinyConfig {
            n_layers: 1,
            ..TinyConfig::default()
        };
        let g = tiny_random_model(0, &cfg).expect("tiny model");
        let spec = TokenizerSpec::from_gguf(&g).expect("tiny tokenizer spec");
        ["smollm", "gpt2", "llama-bpe"]
            .iter()
            .map(|pre| {
                Tokenizer::new(TokenizerSpec {
                    pre: (*pre).to_string(),
                    ..spec.clone()
                })
                .expect("tiny tokenizer")
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let toks = tokenizers();
    let tok = &toks[usize::from(sel) % toks.len()];
    let parse_special = sel & 0x80 != 0;
    if sel & 0x40 == 0 {
        // Text mode.
        let text = String::from_utf8_lossy(rest);
        let ids = tok.encode(&text, parse_special).expect("encode never fails on this vocabulary");
        let back = tok.decode(&ids).expect("ids from encode are in the vocabulary");
        assert_eq!(back, text, "encode/decode round trip");
        let _ = tok.encode_prompt(&text);
    } else {
        // Id mode: little-endian u16 ids, some outside the vocabulary.
        let n = tok.vocab_size() as u32;
        let ids: Vec<u32> = rest
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])) % (n + 8))
            .collect();
        let mut s = StreamDecoder::new();
        let mut streamed = String::new();
        let mut valid = Vec::new();
        for &id in &ids {
            match s.push(tok, id) {
                Ok(piece) => {
                    streamed.push_str(&piece);
                    valid.push(id);
                }
                Err(_) => assert!(id >= n, "id {id} is in the vocabulary"),
            }
        }
        streamed.push_str(&s.finish());
        assert_eq!(s.pending_len(), 0);
        assert_eq!(streamed, tok.decode(&valid).expect("valid ids"));
        if ids.iter().any(|&id| id >= n) {
            assert!(tok.decode(&ids).is_err());
        }
    }
});
