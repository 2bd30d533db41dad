//! GGUF files on their way into the engine: the tokenizer built from the file's vocabulary
//! (encoding and streaming decode of a fixed text) and the CPU model (load, one prefill token,
//! one decode step). Slower per input than `gguf`; seeds are complete tiny models.
#![no_main]

use std::sync::Arc;

use freekv_model::gguf::GgufFile;
use freekv_model::llama::LlamaModel;
use freekv_model::tokenizer::{StreamDecoder, Tokenizer};
use libfuzzer_sys::fuzz_target;

/// Models with more parameters than this are loaded but not run (keeps one input fast).
const MAX_RUN_PARAMS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes("fuzz.gguf", data.to_vec()) else {
        return;
    };
    if let Ok(tok) = Tokenizer::from_gguf(&g) {
        let text = "Hello <|im_start|>wörld 123\n\n  don't";
        if let Ok(ids) = tok.encode(text, true) {
            let mut s = StreamDecoder::new();
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&s.push(&tok, id).expect("encoded ids are in the vocabulary"));
            }
            streamed.push_str(&s.finish());
            assert_eq!(Ok(streamed), tok.decode(&ids).map_err(|e| e.to_string()));
        }
        let _ = tok.encode_prompt("<|im_end|>x");
    }
    let g = Arc::new(g);
    let Ok(model) = LlamaModel::new(g.clone()) else {
        return;
    };
    let params: u64 = g
        .tensors()
        .iter()
        .fold(0u64, |a, t| a.saturating_add(t.n_elements()));
    if params > MAX_RUN_PARAMS {
        return;
    }
    if let Ok(mut s) = model.session(4)
        && model.prefill(&mut s, &[0]).is_ok()
    {
        let logits = model.decode(&mut s, 0).map(<[f32]>::len);
        if let Ok(n) = logits {
            assert_eq!(n, model.vocab_size());
        }
    }
});
