//! Tokenizer and chat-template tests on small hand-built vocabularies (no model file needed).

use std::collections::{HashMap, HashSet};

use freekv_model::ModelError;
use freekv_model::chat::{ChatMessage, ChatTemplate};
use freekv_model::gguf::{GgufFile, GgufWriter, MetaValue};
use freekv_model::tokenizer::{
    StreamDecoder, Tokenizer, TokenizerSpec, byte_to_char, bytes_to_token_text, token_type,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A vocabulary: the given specials first, then the 256 byte tokens, then one token per merge.
fn spec(pre: &str, specials: &[(&str, i32)], merges: &[String]) -> TokenizerSpec {
    let mut tokens: Vec<String> = specials.iter().map(|(t, _)| t.to_string()).collect();
    let mut token_types: Vec<i32> = specials.iter().map(|&(_, ty)| ty).collect();
    tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    for m in merges {
        let joined = m.replacen(' ', "", 1);
        if seen.insert(joined.clone()) {
            tokens.push(joined);
        }
    }
    token_types.resize(tokens.len(), token_type::NORMAL);
    TokenizerSpec {
        model: "gpt2".into(),
        pre: pre.into(),
        tokens,
        token_types,
        merges: merges.to_vec(),
        bos: None,
        eos: None,
        eot: None,
        add_bos: false,
        extra_eog: vec![],
    }
}

fn merges(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn strs(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&id| tok.token_str(id).unwrap().to_string())
        .collect()
}

/// Independent reference: string symbols, lowest rank first, leftmost on ties (the algorithm
/// of the GPT-2 paper code), applied to each pre-tokenized piece.
fn reference_encode(
    tok: &Tokenizer,
    ranks: &HashMap<(String, String), usize>,
    text: &str,
) -> Vec<u32> {
    let mut pieces = Vec::new();
    tok.pre_tokenizer().split(text, &mut pieces).unwrap();
    let mut out = Vec::new();
    for piece in pieces {
        let mut syms: Vec<String> = piece.bytes().map(|b| byte_to_char(b).to_string()).collect();
        loop {
            let best = (0..syms.len().saturating_sub(1))
                .filter_map(|i| {
                    ranks
                        .get(&(syms[i].clone(), syms[i + 1].clone()))
                        .map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
        out.extend(syms.iter().map(|s| tok.token_id(s).unwrap()));
    }
    out
}

/// Random merges over the byte-level alphabet of `alphabet`'s characters.
fn random_merges(rng: &mut StdRng, alphabet: &str, n: usize) -> Vec<String> {
    let mut pool: Vec<String> = alphabet
        .bytes()
        .map(|b| byte_to_char(b).to_string())
        .collect();
    pool.sort();
    pool.dedup();
    let mut out = Vec::new();
    let mut made = HashSet::new();
    while out.len() < n {
        let l = pool[rng.random_range(0..pool.len())].clone();
        let r = pool[rng.random_range(0..pool.len())].clone();
        if !made.insert((l.clone(), r.clone())) {
            continue;
        }
        out.push(format!("{l} {r}"));
        pool.push(format!("{l}{r}"));
    }
    out
}

fn random_text(rng: &mut StdRng, alphabet: &[char], max_len: usize) -> String {
    let len = rng.random_range(0..=max_len);
    (0..len)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
        .collect()
}

#[test]
fn merges_apply_by_rank_then_leftmost() {
    let tok = Tokenizer::new(spec("gpt2", &[], &merges(&["a a", "b c", "a bc"]))).unwrap();
    assert_eq!(strs(&tok, &tok.encode("aaa", false).unwrap()), ["aa", "a"]);
    assert_eq!(
        strs(&tok, &tok.encode("aaaa", false).unwrap()),
        ["aa", "aa"]
    );
    // "a a" has the lowest rank, so "abc" after "a" does not merge "a"+"bc" first.
    assert_eq!(
        strs(&tok, &tok.encode("aabc", false).unwrap()),
        ["aa", "bc"]
    );
    assert_eq!(strs(&tok, &tok.encode("abc", false).unwrap()), ["abc"]);
}

#[test]
fn bpe_matches_reference_on_random_merges() {
    let mut rng = StdRng::seed_from_u64(42);
    // Separators give short pieces (merged by rescanning), letters only give long pieces
    // (merged with the heap); both must agree with the reference.
    for (alphabet_str, max_len) in [("abcé 1\n", 60), ("abé", 200)] {
        let alphabet: Vec<char> = alphabet_str.chars().collect();
        for pre in ["gpt2", "smollm", "llama-bpe"] {
            for _ in 0..5 {
                let m = random_merges(&mut rng, alphabet_str, 80);
                let s = spec(pre, &[], &m);
                let mut ranks = HashMap::new();
                for (i, mm) in m.iter().enumerate() {
                    let (l, r) = mm.split_once(' ').unwrap();
                    ranks.entry((l.to_string(), r.to_string())).or_insert(i);
                }
                let tok = Tokenizer::new(s).unwrap();
                for _ in 0..100 {
                    let text = random_text(&mut rng, &alphabet, max_len);
                    let got = tok.encode(&text, false).unwrap();
                    assert_eq!(tok.decode(&got).unwrap(), text);
                    if pre != "llama-bpe" {
                        assert_eq!(got, reference_encode(&tok, &ranks, &text), "{pre} {text:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn long_runs_encode_quickly_and_correctly() {
    // A run of 20k spaces is one piece; BPE must not be quadratic in it.
    let tok = Tokenizer::new(spec("smollm", &[], &merges(&["Ġ Ġ", "ĠĠ ĠĠ"]))).unwrap();
    let text = " ".repeat(20_001);
    let ids = tok.encode(&text, false).unwrap();
    assert_eq!(ids.len(), 5001);
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn llama3_whole_words_skip_merges() {
    let mut s = spec("llama-bpe", &[], &merges(&["a b"]));
    s.tokens.push("abc".into());
    s.token_types.push(token_type::NORMAL);
    let tok = Tokenizer::new(s.clone()).unwrap();
    assert_eq!(strs(&tok, &tok.encode("abc", false).unwrap()), ["abc"]);
    s.pre = "gpt2".into();
    let tok = Tokenizer::new(s).unwrap();
    assert_eq!(strs(&tok, &tok.encode("abc", false).unwrap()), ["ab", "c"]);
}

#[test]
fn specials_longest_first_and_by_type() {
    let specials = [
        ("<s>", token_type::CONTROL),
        ("<s>x", token_type::CONTROL),
        ("@@", token_type::USER_DEFINED),
        ("<|im_end|>", token_type::CONTROL),
    ];
    let tok = Tokenizer::new(spec("gpt2", &specials, &[])).unwrap();
    let ids = tok.encode("a<s>xy<s>@@", true).unwrap();
    assert_eq!(strs(&tok, &ids), ["a", "<s>x", "y", "<s>", "@@"]);
    // Without parse_special control tokens are plain text; user-defined ones still match.
    let ids = tok.encode("a<s>@@", false).unwrap();
    assert_eq!(strs(&tok, &ids), ["a", "<", "s", ">", "@@"]);
    // Control and user-defined tokens decode to their text.
    assert_eq!(
        tok.decode(&tok.encode("q<|im_end|>@@ ", true).unwrap())
            .unwrap(),
        "q<|im_end|>@@ "
    );
    assert!(tok.is_eog(3), "<|im_end|> is end-of-generation by name");
    assert!(!tok.is_eog(0));
}

#[test]
fn eog_and_bos_handling() {
    let specials = [
        ("<|begin_of_text|>", token_type::CONTROL),
        ("<|end_of_text|>", token_type::CONTROL),
        ("<|eot_id|>", token_type::CONTROL),
        ("<|eom_id|>", token_type::CONTROL),
        ("<|other|>", token_type::CONTROL),
    ];
    let mut s = spec("llama-bpe", &specials, &[]);
    s.bos = Some(0);
    s.add_bos = true;
    s.extra_eog = vec![10];
    let tok = Tokenizer::new(s).unwrap();
    assert_eq!(tok.eog_ids(), &[1, 2, 3, 10]);
    assert!(!tok.is_eog(4) && !tok.is_eog(0));
    assert_eq!(tok.encode_prompt("hi").unwrap()[0], 0);
    assert_eq!(
        tok.encode("hi", true).unwrap().first(),
        Some(&(5 + u32::from(b'h')))
    );
    // A prompt that already starts with BOS does not get a second one.
    let ids = tok.encode_prompt("<|begin_of_text|>hi").unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 0).count(), 1);
}

#[test]
fn round_trip_on_varied_text() {
    let mut rng = StdRng::seed_from_u64(3);
    let m = random_merges(&mut rng, "the quick brown fox\n\t", 150);
    for pre in ["smollm", "llama-bpe", "gpt2"] {
        let tok = Tokenizer::new(spec(pre, &[("<|im_end|>", token_type::CONTROL)], &m)).unwrap();
        for text in [
            "The quick brown fox jumps over the lazy dog.",
            "  trailing spaces   \t\n\n",
            "Accents: café, naïve, Ångström, Straße",
            "CJK: 東京は日本の首都です。서울",
            "Emoji 🦀🚀 👩‍👩‍👧‍👦 🇫🇷",
            "fn main() {\n\tlet x = vec![1, 2, 3];\n}\r\n",
            "it's they'LL 1234567 ٣٤ <|im_end|>",
            "",
        ] {
            for parse_special in [false, true] {
                let ids = tok.encode(text, parse_special).unwrap();
                assert_eq!(tok.decode(&ids).unwrap(), text, "{pre} {parse_special}");
            }
        }
    }
}

#[test]
fn stream_decoder_never_emits_broken_utf8() {
    let mut rng = StdRng::seed_from_u64(11);
    let alphabet: Vec<char> = "aZ é€東🦀\n😀ß".chars().collect();
    let m = random_merges(&mut rng, "aé€東🦀", 40);
    // With no merges every byte is its own token, so every multi-byte char is split.
    for tok in [
        Tokenizer::new(spec("gpt2", &[], &[])).unwrap(),
        Tokenizer::new(spec("gpt2", &[], &m)).unwrap(),
    ] {
        for _ in 0..300 {
            let text = random_text(&mut rng, &alphabet, 50);
            let ids = tok.encode(&text, false).unwrap();
            let mut d = StreamDecoder::new();
            let mut out = String::new();
            for &id in &ids {
                let piece = d.push(&tok, id).unwrap();
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "broken UTF-8 emitted for {text:?}"
                );
                out.push_str(&piece);
            }
            assert_eq!(d.pending_len(), 0);
            assert_eq!(d.finish(), "");
            assert_eq!(out, text);
        }
    }
}

#[test]
fn stream_decoder_flushes_invalid_bytes_lossily() {
    let tok = Tokenizer::new(spec("gpt2", &[], &[])).unwrap();
    let id = |b: u8| tok.token_id(&bytes_to_token_text(&[b])).unwrap();
    let mut d = StreamDecoder::new();
    assert_eq!(d.push(&tok, id(0xF0)).unwrap(), "");
    assert_eq!(d.push(&tok, id(0x9F)).unwrap(), "");
    // 'x' cannot continue the sequence: the broken prefix becomes one U+FFFD.
    assert_eq!(d.push(&tok, id(b'x')).unwrap(), "\u{FFFD}x");
    assert_eq!(d.push(&tok, id(0xE2)).unwrap(), "");
    assert_eq!(d.finish(), "\u{FFFD}");
    assert_eq!(tok.decode(&[id(0xE2), id(b'a')]).unwrap(), "\u{FFFD}a");
    assert!(d.push(&tok, 999).is_err());
}

#[test]
fn errors_are_clear() {
    let tok = Tokenizer::new(spec("gpt2", &[], &[])).unwrap();
    let e = tok.decode(&[256]).unwrap_err();
    assert!(
        e.to_string()
            .contains("token id 256 is outside the vocabulary"),
        "{e}"
    );

    let mut s = spec("gpt2", &[], &[]);
    s.tokens.retain(|t| t != "z");
    s.token_types.truncate(s.tokens.len());
    let tok = Tokenizer::new(s).unwrap();
    let e = tok.encode("z", false).unwrap_err();
    assert!(e.to_string().contains("no token for byte 0x7a"), "{e}");

    let cases: Vec<(TokenizerSpec, &str)> = vec![
        (
            TokenizerSpec {
                model: "llama".into(),
                ..spec("gpt2", &[], &[])
            },
            "unsupported tokenizer model `llama`",
        ),
        (spec("qwen2", &[], &[]), "unsupported pre-tokenizer `qwen2`"),
        (
            TokenizerSpec {
                merges: vec!["ab".into()],
                ..spec("gpt2", &[], &[])
            },
            "merge 0 `ab`",
        ),
        (
            TokenizerSpec {
                token_types: vec![1; 3],
                ..spec("gpt2", &[], &[])
            },
            "3 token types for 256 tokens",
        ),
        (
            TokenizerSpec {
                bos: Some(256),
                ..spec("gpt2", &[], &[])
            },
            "bos token id 256",
        ),
        (
            TokenizerSpec {
                tokens: vec![],
                token_types: vec![],
                ..spec("gpt2", &[], &[])
            },
            "empty",
        ),
    ];
    for (s, want) in cases {
        let e = Tokenizer::new(s).unwrap_err();
        assert!(matches!(e, ModelError::Tokenizer(_)), "{e:?}");
        assert!(e.to_string().contains(want), "{e} does not mention {want}");
    }
}

#[test]
fn merges_outside_the_vocabulary_are_skipped() {
    let mut s = spec("gpt2", &[], &merges(&["a b"]));
    s.merges.insert(0, "x y".into()); // "xy" is not a token
    let tok = Tokenizer::new(s).unwrap();
    assert_eq!(
        strs(&tok, &tok.encode("xyab", false).unwrap()),
        ["x", "y", "ab"]
    );
}

const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

fn llama3_gguf(with_template: Option<&str>) -> GgufFile {
    let specials = [
        ("<|begin_of_text|>", token_type::CONTROL),
        ("<|end_of_text|>", token_type::CONTROL),
        ("<|start_header_id|>", token_type::CONTROL),
        ("<|end_header_id|>", token_type::CONTROL),
        ("<|eot_id|>", token_type::CONTROL),
    ];
    let s = spec(
        "llama-bpe",
        &specials,
        &merges(&[
            "Ċ Ċ", "u s", "us e", "use r", "H i", "s y", "sy s", "sys t", "syst e", "syste m",
        ]),
    );
    let mut w = GgufWriter::new();
    let strings =
        |v: &[String]| MetaValue::Array(v.iter().map(|t| MetaValue::String(t.clone())).collect());
    w.add_meta("general.architecture", MetaValue::String("llama".into()))
        .add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()))
        .add_meta("tokenizer.ggml.pre", MetaValue::String("llama-bpe".into()))
        .add_meta("tokenizer.ggml.tokens", strings(&s.tokens))
        .add_meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(s.token_types.iter().map(|&t| MetaValue::I32(t)).collect()),
        )
        .add_meta("tokenizer.ggml.merges", strings(&s.merges))
        .add_meta("tokenizer.ggml.bos_token_id", MetaValue::U32(0))
        .add_meta("tokenizer.ggml.eos_token_id", MetaValue::U32(1))
        .add_meta("tokenizer.ggml.eot_token_id", MetaValue::U32(4));
    if let Some(t) = with_template {
        w.add_meta("tokenizer.chat_template", MetaValue::String(t.into()));
    }
    GgufFile::from_bytes("llama3-tiny.gguf", w.to_bytes().unwrap()).unwrap()
}

#[test]
fn llama3_template_and_tokenizer_from_gguf() {
    let g = llama3_gguf(Some(LLAMA3_TEMPLATE));
    let s = TokenizerSpec::from_gguf(&g).unwrap();
    assert_eq!(s.pre, "llama-bpe");
    assert!(s.add_bos, "add_bos defaults to true for llama-bpe");
    assert_eq!((s.bos, s.eos, s.eot), (Some(0), Some(1), Some(4)));
    let tok = Tokenizer::new(s).unwrap();
    assert!(tok.is_eog(1) && tok.is_eog(4) && !tok.is_eog(2));

    let tpl = ChatTemplate::from_gguf(&g).unwrap().unwrap();
    assert_eq!(tpl, ChatTemplate::Llama3);
    let prompt = tpl
        .render(
            &[ChatMessage::system("Be brief."), ChatMessage::user(" Hi\n")],
            true,
        )
        .unwrap();
    assert_eq!(
        prompt,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let ids = tok.encode_prompt(&prompt).unwrap();
    assert_eq!(
        ids.iter().filter(|&&i| i == 0).count(),
        1,
        "exactly one BOS"
    );
    let texts = strs(&tok, &ids);
    assert_eq!(
        &texts[..4],
        [
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "system",
            "<|end_header_id|>"
        ]
    );
    assert_eq!(texts.iter().filter(|t| *t == "<|eot_id|>").count(), 2);
    assert!(texts.contains(&"user".to_string()) && texts.contains(&"ĊĊ".to_string()));
    assert_eq!(texts.last().map(String::as_str), Some("ĊĊ"));
    assert_eq!(tok.decode(&ids).unwrap(), prompt);
}

#[test]
fn chat_template_absent_or_unknown() {
    assert_eq!(ChatTemplate::from_gguf(&llama3_gguf(None)).unwrap(), None);
    let e = ChatTemplate::from_gguf(&llama3_gguf(Some("[INST] {{ m }} [/INST]"))).unwrap_err();
    assert!(matches!(e, ModelError::Template(_)), "{e:?}");
}

#[test]
fn spec_from_gguf_reports_missing_and_mistyped_keys() {
    let mut w = GgufWriter::new();
    w.add_meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    let g = GgufFile::from_bytes("a.gguf", w.to_bytes().unwrap()).unwrap();
    let e = TokenizerSpec::from_gguf(&g).unwrap_err();
    assert!(
        matches!(&e, ModelError::MissingMetadata(k) if k == "tokenizer.ggml.tokens"),
        "{e:?}"
    );

    w.add_meta(
        "tokenizer.ggml.tokens",
        MetaValue::Array(vec![MetaValue::String("a".into())]),
    )
    .add_meta("tokenizer.ggml.merges", MetaValue::Array(vec![]))
    .add_meta("tokenizer.ggml.pre", MetaValue::U32(3));
    let g = GgufFile::from_bytes("b.gguf", w.to_bytes().unwrap()).unwrap();
    let e = TokenizerSpec::from_gguf(&g).unwrap_err();
    assert!(
        matches!(&e, ModelError::BadMetadata { key, .. } if key == "tokenizer.ggml.pre"),
        "{e:?}"
    );
}

#[test]
fn merges_resolve_to_byte_level_tokens_not_specials_of_the_same_text() {
    let mut s = spec("gpt2", &[("ab", token_type::CONTROL)], &merges(&["a b"]));
    s.tokens.push("ab".into());
    s.token_types.push(token_type::NORMAL);
    let normal_ab = u32::try_from(s.tokens.len() - 1).unwrap();
    let tok = Tokenizer::new(s).unwrap();
    assert_eq!(tok.encode("ab", false).unwrap(), [normal_ab]);
    assert_eq!(tok.encode("ab", true).unwrap(), [0]);
    assert_eq!(tok.token_id("ab"), Some(normal_ab));
}

/// The SmolLM2-135M-Instruct chat template, as stored in its GGUF (`tokenizer.chat_template`).
const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chatml_render_equals_reference_prompt() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/chat_short.json"
    );
    let Ok(text) = std::fs::read_to_string(path) else {
        println!("skipped: reference dir not found");
        return;
    };
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    let msgs: Vec<ChatMessage> = r["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let tpl = ChatTemplate::detect(SMOLLM2_TEMPLATE).unwrap();
    assert_eq!(
        tpl.render(&msgs, true).unwrap(),
        r["prompt_text"].as_str().unwrap()
    );
}
