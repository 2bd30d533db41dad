//! The eval JSONL reader on arbitrary text; accepted cases survive a write/read round trip and
//! tokenize (or fail with an error) on a small vocabulary.
#![no_main]

use std::sync::OnceLock;

use freekv_model::eval::parse_cases;
use freekv_model::testing::{TinyConfig, tiny_random_model};
use freekv_model::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let g = tiny_random_model(0, &TinyConfig::default()).expect("tiny model");
        Tokenizer::from_gguf(&g).expect("tiny tokenizer")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(cases) = parse_cases(&text) else {
        return;
    };
    assert!(!cases.is_empty());
    let again: String = cases.iter().map(|c| c.to_json_line() + "\n").collect();
    let back = parse_cases(&again).expect("a written case reads back");
    assert_eq!(back.len(), cases.len());
    for (a, b) in cases.iter().zip(&back) {
        assert_eq!(
            (&a.id, &a.prompt, &a.prompt_ids, &a.answer, a.max_new_tokens),
            (&b.id, &b.prompt, &b.prompt_ids, &b.answer, b.max_new_tokens)
        );
        let _ = a.tokens(tokenizer());
    }
});
