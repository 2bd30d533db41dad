//! The tokenizer and chat template of the default model (SmolLM2-135M-Instruct) against the
//! reference prompts. Skips with one line when the model file or the reference dir is absent.

use std::path::PathBuf;

use freekv_model::chat::{ChatMessage, ChatTemplate};
use freekv_model::gguf::GgufFile;
use freekv_model::tokenizer::{StreamDecoder, Tokenizer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const REFERENCE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/reference");

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

fn reference(name: &str) -> Option<serde_json::Value> {
    let path = PathBuf::from(REFERENCE_DIR).join(format!("{name}.json"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(serde_json::from_str(&text).unwrap()),
        Err(_) => {
            println!("skipped: reference dir not found ({})", path.display());
            None
        }
    }
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

fn first_diff(a: &[u32], b: &[u32]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

fn check_reference(tok: &Tokenizer, name: &str) {
    let Some(r) = reference(name) else { return };
    let text = r["prompt_text"].as_str().unwrap();
    let want = ids_of(&r["prompt_ids"]);
    assert_eq!(r["add_bos"].as_bool(), Some(false));
    let got = tok.encode_prompt(text).unwrap();
    if let Some(i) = first_diff(&got, &want) {
        let show = |ids: &[u32]| -> Vec<String> {
            ids.iter()
                .skip(i.saturating_sub(3))
                .take(8)
                .map(|&id| format!("{id}:{:?}", tok.token_str(id)))
                .collect()
        };
        panic!(
            "{name}: first difference at {i}\n got  {:?}\n want {:?}",
            show(&got),
            show(&want)
        );
    }
    assert_eq!(tok.decode(&got).unwrap(), text);
}

#[test]
fn spec_of_the_default_model() {
    let Some(g) = open() else { return };
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos());
    assert!(tok.is_eog(2), "<|im_end|> ends generation");
    assert!(tok.is_eog(0), "<|endoftext|> ends generation");
    assert!(!tok.is_eog(1), "<|im_start|> does not");
    assert!(!tok.is_eog(198));
    assert_eq!(tok.token_str(1), Some("<|im_start|>"));
    assert_eq!(tok.token_bytes(2), Some("<|im_end|>".as_bytes()));
    assert_eq!(tok.token_bytes(198), Some("\n".as_bytes()));
    assert_eq!(tok.token_bytes(49152), None);
}

#[test]
fn reference_prompts_encode_exactly() {
    let Some(g) = open() else { return };
    let tok = Tokenizer::from_gguf(&g).unwrap();
    check_reference(&tok, "chat_short");
    check_reference(&tok, "text_1k");
}

#[test]
fn digits_are_isolated_before_whitespace() {
    let Some(g) = open() else { return };
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let ids = tok.encode("\n\n   1.", false).unwrap();
    let strs: Vec<&str> = ids.iter().map(|&id| tok.token_str(id).unwrap()).collect();
    assert_eq!(strs, ["ĊĊĠĠĠ", "1", "."]);
    let ids = tok.encode("in 2024", false).unwrap();
    let strs: Vec<&str> = ids.iter().map(|&id| tok.token_str(id).unwrap()).collect();
    assert_eq!(strs, ["in", "Ġ", "2", "0", "2", "4"]);
}

#[test]
fn specials_only_when_parsed() {
    let Some(g) = open() else { return };
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.encode("<|im_start|>user", true).unwrap()[0], 1);
    let plain = tok.encode("<|im_start|>user", false).unwrap();
    assert!(!plain.contains(&1) && plain.len() > 2, "{plain:?}");
    assert_eq!(tok.decode(&plain).unwrap(), "<|im_start|>user");
}

const VARIED: &[&str] = &[
    "Hello, world!",
    "  leading and trailing spaces   ",
    "tabs\tand\t\ttabs\n\n\nnew lines\r\n",
    "Accents: café, naïve, Ångström, façade, über, Straße.",
    "CJK: 東京は日本の首都です。北京欢迎你。서울",
    "Emoji: 🦀🚀 👩‍👩‍👧‍👦 ✨ 🇫🇷",
    "fn main() {\n    let x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n}\n",
    "numbers 3.14159, 1e-9, 1,000,000 and ١٢٣ and Ⅻ",
    "It's, they'll, we've, I'd, you're, she'S",
    "mixed <|im_end|> text with specials <|endoftext|>",
    "",
    " ",
    "\u{0}\u{1}\u{7f} control chars \u{85}\u{a0}\u{2028}",
];

#[test]
fn round_trip_on_varied_text() {
    let Some(g) = open() else { return };
    let tok = Tokenizer::from_gguf(&g).unwrap();
    for &text in VARIED {
        for parse_special in [false, true] {
            let ids = tok.encode(text, parse_special).unwrap();
            assert_eq!(
                tok.decode(&ids).unwrap(),
                text,
                "parse_special={parse_special}"
            );
        }
    }
}

#[test]
fn stream_decoding_equals_decode() {
    let Some(g) = open() else { return };
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let alphabet: Vec<char> = "aé東🦀 \n1€ß".chars().collect();
    for round in 0..200 {
        let len = rng.random_range(0..40);
        let text: String = (0..len)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        let ids = tok.encode(&text, false).unwrap();
        let mut d = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            let piece = d.push(&tok, id).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "round {round}: broken UTF-8 emitted for {text:?}"
            );
            out.push_str(&piece);
        }
        assert_eq!(d.finish(), "");
        assert_eq!(out, text);
    }
}

#[test]
fn chat_template_matches_reference_prompt() {
    let Some(g) = open() else { return };
    let Some(r) = reference("chat_short") else {
        return;
    };
    let tpl = ChatTemplate::from_gguf(&g).unwrap().unwrap();
    assert_eq!(
        tpl.default_system(),
        Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    );
    let msgs: Vec<ChatMessage> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let want = r["prompt_text"].as_str().unwrap();
    assert_eq!(tpl.render(&msgs, true).unwrap(), want);
    assert_eq!(msgs.len(), 1);
    assert_eq!(tpl.prompt(None, &msgs[0].content).unwrap(), want);
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(
        tok.encode_prompt(&tpl.prompt(None, &msgs[0].content).unwrap())
            .unwrap(),
        ids_of(&r["prompt_ids"])
    );
}
