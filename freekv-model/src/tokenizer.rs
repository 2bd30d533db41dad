//! Byte-level BPE tokenizer (GPT-2 style) built from a GGUF vocabulary.
//!
//! The pipeline is the one of llama.cpp and HF `tokenizers` for `tokenizer.ggml.model = "gpt2"`:
//!
//! 1. special tokens (CONTROL when `parse_special`, USER_DEFINED always) are cut out of the text
//!    literally, leftmost first and longest first at one position;
//! 2. the remaining text is pre-tokenized: [`PreTokenizer`] (`smollm` isolates every digit, then
//!    applies the GPT-2 split regex; `llama-bpe` applies the Llama 3 regex; `gpt2`/`default` the
//!    GPT-2 regex alone; the `\s+(?!\S)` look-ahead is emulated so that splitting runs in linear
//!    time, and checked against the look-ahead regex in the tests);
//! 3. each piece is mapped byte by byte to the GPT-2 "byte-to-unicode" alphabet and merged by BPE
//!    rank (lowest rank first, leftmost on ties) with the GGUF's merge list; with `llama-bpe` a
//!    piece that is itself a token skips the merges (llama.cpp's `ignore_merges`).
//!
//! Decoding inverts the byte mapping for normal tokens; CONTROL and USER_DEFINED tokens decode to
//! their text. [`StreamDecoder`] turns a stream of ids into text without ever emitting half of a
//! multi-byte character.
//!
//! ```
//! use freekv_model::tokenizer::{byte_to_char, Tokenizer, TokenizerSpec};
//! // A tiny vocabulary: one special token, the 256 byte tokens and two merges.
//! let mut tokens = vec!["<|end|>".to_string()];
//! tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
//! tokens.extend(["hi".to_string(), "Ġhi".to_string()]);
//! let mut token_types = vec![3]; // CONTROL
//! token_types.resize(tokens.len(), 1); // NORMAL
//! let spec = TokenizerSpec {
//!     model: "gpt2".into(),
//!     pre: "gpt2".into(),
//!     tokens,
//!     token_types,
//!     merges: vec!["h i".into(), "Ġ hi".into()],
//!     bos: None,
//!     eos: Some(0),
//!     eot: None,
//!     add_bos: false,
//!     extra_eog: vec![],
//! };
//! let tok = Tokenizer::new(spec).unwrap();
//! let ids = tok.encode("hi hi<|end|>", true).unwrap();
//! assert_eq!(ids, vec![257, 258, 0]);
//! assert_eq!(tok.decode(&ids).unwrap(), "hi hi<|end|>");
//! assert!(tok.is_eog(0));
//! ```

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::ModelError;
use crate::gguf::{GgufFile, MetaValue};

/// Token type codes of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
pub mod token_type {
    /// Not set; treated as [`NORMAL`].
    pub const UNDEFINED: i32 = 0;
    /// An ordinary BPE token, stored in the byte-to-unicode alphabet.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control token such as `<|im_start|>`; matched in text only when specials are parsed.
    pub const CONTROL: i32 = 3;
    /// A user-defined token, stored as plain text and always matched literally in text.
    pub const USER_DEFINED: i32 = 4;
    /// An unused slot.
    pub const UNUSED: i32 = 5;
    /// A raw byte token (SentencePiece vocabularies); decoded like a normal token here.
    pub const BYTE: i32 = 6;
}

/// Texts of control tokens that end a generation turn (llama.cpp's list), in addition to the
/// EOS / EOT ids named in the metadata.
pub const EOG_TOKEN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

// ---------------------------------------------------------------------------------------------
// GPT-2 byte <-> unicode alphabet
// ---------------------------------------------------------------------------------------------

/// Number of code points used by the byte-to-unicode alphabet (`0..=323`).
const ALPHABET_END: usize = 324;

const fn is_printable_byte(b: usize) -> bool {
    (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)
}

/// `BYTE_TO_CHAR[b]`: the character that stands for byte `b` in token texts.
const BYTE_TO_CHAR: [char; 256] = {
    let mut table = ['\0'; 256];
    let mut extra = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let cp = if is_printable_byte(b) {
            b as u32
        } else {
            extra += 1;
            255 + extra
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
};

/// `CHAR_TO_BYTE[c]`: the byte a code point `c < 324` stands for, or -1.
const CHAR_TO_BYTE: [i16; ALPHABET_END] = {
    let mut table = [-1i16; ALPHABET_END];
    let mut b = 0usize;
    while b < 256 {
        table[BYTE_TO_CHAR[b] as usize] = b as i16;
        b += 1;
    }
    table
};

/// The character of the GPT-2 byte-level alphabet that stands for byte `b` (e.g. `b' '` → `'Ġ'`,
/// `b'\n'` → `'Ċ'`, printable ASCII maps to itself).
pub fn byte_to_char(b: u8) -> char {
    BYTE_TO_CHAR[usize::from(b)]
}

/// The byte a character of the GPT-2 byte-level alphabet stands for; `None` for characters
/// outside the alphabet.
pub fn char_to_byte(c: char) -> Option<u8> {
    let i = c as usize;
    CHAR_TO_BYTE.get(i).and_then(|&b| u8::try_from(b).ok())
}

/// Maps raw bytes to their byte-level text (the form token texts have in the vocabulary).
pub fn bytes_to_token_text(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| byte_to_char(b)).collect()
}

/// Maps byte-level token text back to raw bytes; characters outside the alphabet keep their
/// UTF-8 encoding.
pub fn token_text_to_bytes(text: &str, out: &mut Vec<u8>) {
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers
// ---------------------------------------------------------------------------------------------

/// GPT-2 split regex with HF ByteLevel's trailing `|\s+` alternative (the specification).
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 split regex (the specification).
pub const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

// What runs: the same regexes without the `\s+(?!\S)` alternative. They need no backtracking
// (fancy-regex hands them to the linear-time `regex` engine; the look-ahead versions overflow
// the backtracking stack on long whitespace runs), and `split_regex` restores the look-ahead:
// a match of the final `\s+` alternative that is followed by more text gives its last
// whitespace character back to the next piece. That is exactly what `\s+(?!\S)|\s+` does:
// the look-ahead alternative matches the whole run at the end of the text, the run minus its
// last character before a non-space, and `\s+` takes over only for a single character.
const GPT2_LINEAR: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
const LLAMA3_LINEAR: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+";

/// The pre-tokenizer families that are implemented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// The GPT-2 regex (`gpt2`, `default`).
    Gpt2,
    /// Every digit isolated, then the GPT-2 regex (`smollm`, `starcoder`, `refact`, `command-r`).
    DigitsGpt2,
    /// The Llama 3 regex, and whole-word vocabulary hits skip the merges (`llama-bpe`,
    /// `llama3`, `llama-v3`).
    Llama3,
}

impl PreTokenizerKind {
    /// The family for a `tokenizer.ggml.pre` value.
    pub fn from_name(name: &str) -> Result<Self, ModelError> {
        match name {
            "gpt2" | "default" => Ok(Self::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" => Ok(Self::DigitsGpt2),
            "llama-bpe" | "llama3" | "llama-v3" => Ok(Self::Llama3),
            other => Err(ModelError::Tokenizer(format!(
                "unsupported pre-tokenizer `{other}` (tokenizer.ggml.pre); supported: smollm, \
                 starcoder, refact, command-r, llama-bpe, llama3, llama-v3, gpt2, default"
            ))),
        }
    }
}

/// Splits text into the pieces that BPE merges within.
#[derive(Debug, Clone)]
pub struct PreTokenizer {
    kind: PreTokenizerKind,
    regex: fancy_regex::Regex,
}

impl PreTokenizer {
    /// The pre-tokenizer named by `tokenizer.ggml.pre`; an unknown name is an error.
    pub fn new(name: &str) -> Result<Self, ModelError> {
        let kind = PreTokenizerKind::from_name(name)?;
        let pattern = match kind {
            PreTokenizerKind::Gpt2 | PreTokenizerKind::DigitsGpt2 => GPT2_LINEAR,
            PreTokenizerKind::Llama3 => LLAMA3_LINEAR,
        };
        let regex = fancy_regex::Regex::new(pattern)
            .map_err(|e| ModelError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
        Ok(Self { kind, regex })
    }

    /// The family of this pre-tokenizer.
    pub fn kind(&self) -> PreTokenizerKind {
        self.kind
    }

    /// Appends the pieces of `text` to `out`; the pieces concatenate to `text`.
    pub fn split<'a>(&self, text: &'a str, out: &mut Vec<&'a str>) -> Result<(), ModelError> {
        if self.kind != PreTokenizerKind::DigitsGpt2 {
            return self.regex_split(text, out);
        }
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                let end = i + c.len_utf8();
                if start < i {
                    self.regex_split(slice(text, start, i)?, out)?;
                }
                out.push(slice(text, i, end)?);
                start = end;
            }
        }
        if start < text.len() {
            self.regex_split(slice(text, start, text.len())?, out)?;
        }
        Ok(())
    }

    fn regex_split<'a>(&self, text: &'a str, out: &mut Vec<&'a str>) -> Result<(), ModelError> {
        let mut pos = 0;
        while pos < text.len() {
            let found = self
                .regex
                .find_from_pos(text, pos)
                .map_err(|e| ModelError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
            let Some(m) = found.filter(|m| m.end() > m.start()) else {
                break;
            };
            if m.start() > pos {
                out.push(slice(text, pos, m.start())?);
            }
            let mut end = m.end();
            if end < text.len() && self.is_plain_whitespace_match(m.as_str()) {
                // Emulate `\s+(?!\S)`: leave the last whitespace character to the next piece.
                let mut chars = m.as_str().char_indices();
                if let (Some(_), Some((last, _))) = (chars.next(), chars.next_back()) {
                    end = m.start() + last;
                }
            }
            out.push(slice(text, m.start(), end)?);
            pos = end;
        }
        if pos < text.len() {
            out.push(slice(text, pos, text.len())?);
        }
        Ok(())
    }

    /// Whether a match came from the final `\s+` alternative: all whitespace, and for Llama 3
    /// without line breaks (a run with one is taken by `\s*[\r\n]+` first).
    fn is_plain_whitespace_match(&self, m: &str) -> bool {
        m.chars().all(char::is_whitespace)
            && (self.kind != PreTokenizerKind::Llama3 || !m.contains(['\r', '\n']))
    }
}

fn slice(text: &str, start: usize, end: usize) -> Result<&str, ModelError> {
    text.get(start..end)
        .ok_or_else(|| ModelError::Tokenizer(format!("internal: bad split {start}..{end}")))
}

// ---------------------------------------------------------------------------------------------
// Spec (what the GGUF says)
// ---------------------------------------------------------------------------------------------

/// Everything needed to build a [`Tokenizer`], as read from `tokenizer.ggml.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`; only `"gpt2"` (byte-level BPE) is implemented.
    pub model: String,
    /// `tokenizer.ggml.pre`, the pre-tokenizer name (see [`PreTokenizerKind::from_name`]).
    pub pre: String,
    /// Token texts, indexed by id (byte-level alphabet for normal tokens, plain text otherwise).
    pub tokens: Vec<String>,
    /// Token types ([`token_type`]); empty means all normal, otherwise one per token.
    pub token_types: Vec<i32>,
    /// Merges, `"left right"`, in rank order.
    pub merges: Vec<String>,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// End-of-turn id.
    pub eot: Option<u32>,
    /// Whether [`Tokenizer::encode_prompt`] prepends BOS.
    pub add_bos: bool,
    /// More end-of-generation ids (besides EOS, EOT and the control tokens named in
    /// [`EOG_TOKEN_TEXTS`], which are always end-of-generation).
    pub extra_eog: Vec<u32>,
}

fn meta<'g>(g: &'g GgufFile, key: &str) -> Result<&'g MetaValue, ModelError> {
    g.get(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))
}

fn bad(key: &str, msg: impl Into<String>) -> ModelError {
    ModelError::BadMetadata {
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn meta_str(v: &MetaValue, key: &str) -> Result<String, ModelError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(key, format!("expected a string, found {}", v.type_name())))
}

fn meta_str_array(v: &MetaValue, key: &str) -> Result<Vec<String>, ModelError> {
    let arr = v.as_array().ok_or_else(|| {
        bad(
            key,
            format!("expected an array of strings, found {}", v.type_name()),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, e)| {
            e.as_str().map(str::to_string).ok_or_else(|| {
                bad(
                    key,
                    format!("element {i}: expected a string, found {}", e.type_name()),
                )
            })
        })
        .collect()
}

fn meta_id(g: &GgufFile, key: &str) -> Result<Option<u32>, ModelError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => {
            let id = v
                .as_u64()
                .ok_or_else(|| bad(key, format!("expected a token id, found {}", v.type_name())))?;
            u32::try_from(id)
                .map(Some)
                .map_err(|_| bad(key, format!("token id {id} too large")))
        }
    }
}

impl TokenizerSpec {
    /// Reads the `tokenizer.ggml.*` keys of a GGUF file. Missing `tokenizer.ggml.pre` means
    /// `"default"`; missing `tokenizer.ggml.add_bos_token` means true for the Llama 3
    /// pre-tokenizer and false otherwise; `tokenizer.ggml.eom_token_id` goes to `extra_eog`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        const MODEL: &str = "tokenizer.ggml.model";
        const PRE: &str = "tokenizer.ggml.pre";
        const TOKENS: &str = "tokenizer.ggml.tokens";
        const TYPES: &str = "tokenizer.ggml.token_type";
        const MERGES: &str = "tokenizer.ggml.merges";
        const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";

        let model = meta_str(meta(g, MODEL)?, MODEL)?;
        let pre = match g.get(PRE) {
            Some(v) => meta_str(v, PRE)?,
            None => "default".to_string(),
        };
        let tokens = meta_str_array(meta(g, TOKENS)?, TOKENS)?;
        let token_types = match g.get(TYPES) {
            None => Vec::new(),
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| {
                    bad(
                        TYPES,
                        format!("expected an array of integers, found {}", v.type_name()),
                    )
                })?;
                arr.iter()
                    .enumerate()
                    .map(|(i, e)| {
                        e.as_i64()
                            .and_then(|t| i32::try_from(t).ok())
                            .ok_or_else(|| {
                                bad(
                                    TYPES,
                                    format!("element {i}: expected a small integer, found {e}"),
                                )
                            })
                    })
                    .collect::<Result<Vec<i32>, ModelError>>()?
            }
        };
        let merges = match g.get(MERGES) {
            Some(v) => meta_str_array(v, MERGES)?,
            None if model == "gpt2" => return Err(ModelError::MissingMetadata(MERGES.into())),
            None => Vec::new(),
        };
        let add_bos = match g.get(ADD_BOS) {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad(ADD_BOS, format!("expected a bool, found {}", v.type_name())))?,
            None => {
                matches!(
                    PreTokenizerKind::from_name(&pre),
                    Ok(PreTokenizerKind::Llama3)
                )
            }
        };
        let extra_eog = meta_id(g, "tokenizer.ggml.eom_token_id")?
            .into_iter()
            .collect();
        Ok(Self {
            model,
            pre,
            tokens,
            token_types,
            merges,
            bos: meta_id(g, "tokenizer.ggml.bos_token_id")?,
            eos: meta_id(g, "tokenizer.ggml.eos_token_id")?,
            eot: meta_id(g, "tokenizer.ggml.eot_token_id")?,
            add_bos,
            extra_eog,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// A small multiplicative hasher for the `u64` merge keys (FxHash's constant).
#[derive(Default, Clone, Copy)]
struct PairHasher(u64);

impl Hasher for PairHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type MergeMap = HashMap<u64, (u32, u32), BuildHasherDefault<PairHasher>>;

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// A special token that is matched literally in text.
#[derive(Debug, Clone)]
struct Special {
    id: u32,
    text: String,
    /// USER_DEFINED tokens are matched even when specials are not parsed.
    always: bool,
}

/// Marks a symbol that was merged into its left neighbour.
const DEAD: u32 = u32::MAX;
const NONE: usize = usize::MAX;

#[derive(Debug, Clone, Copy)]
struct Sym {
    id: u32,
    next: usize,
    prev: usize,
}

/// Pieces up to this many bytes are merged by rescanning ([`Tokenizer::bpe_short`]); longer
/// ones with a heap, in O(n log n).
const SHORT_PIECE: usize = 16;

/// Scratch space reused across the pieces of one `encode` call.
#[derive(Default)]
struct BpeWork {
    ids: Vec<u32>,
    syms: Vec<Sym>,
    heap: BinaryHeap<Reverse<(u32, usize, u32, u32)>>,
    text: String,
}

/// A GPT-2 byte-level BPE tokenizer. Immutable after construction, so `Send + Sync`.
pub struct Tokenizer {
    tokens: Vec<String>,
    types: Vec<i32>,
    /// Decoded bytes of every token, `bytes[offsets[id]..offsets[id + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    /// Token text (as stored) → id; byte-level tokens first, then the first occurrence wins.
    token_to_id: HashMap<String, u32>,
    /// The single-byte token of each byte, if the vocabulary has one.
    byte_token: [Option<u32>; 256],
    /// `(left, right)` → `(rank, merged id)`.
    merges: MergeMap,
    pre: PreTokenizer,
    specials: Vec<Special>,
    /// For each first byte, the indices into `specials` starting with it, longest first.
    specials_by_byte: Vec<Vec<usize>>,
    ignore_merges: bool,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    /// Sorted end-of-generation ids.
    eog: Vec<u32>,
}

// Compile-time check: a tokenizer can be shared across threads.
const _: fn() = || {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<StreamDecoder>();
};

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("pre", &self.pre.kind())
            .field("vocab_size", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("specials", &self.specials.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("eog", &self.eog)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer. Fails on an unsupported model or pre-tokenizer, on a token type list
    /// of the wrong length, on a malformed merge, and on out-of-range special ids. Merges whose
    /// parts or result are not in the vocabulary are skipped (as llama.cpp does).
    pub fn new(spec: TokenizerSpec) -> Result<Self, ModelError> {
        let _span = tracing::debug_span!("tokenizer.build", n_tokens = spec.tokens.len()).entered();
        if spec.model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "unsupported tokenizer model `{}` (tokenizer.ggml.model); only `gpt2` byte-level \
                 BPE is implemented",
                spec.model
            )));
        }
        let pre = PreTokenizer::new(&spec.pre)?;
        let n = spec.tokens.len();
        if n == 0 {
            return Err(ModelError::Tokenizer("the vocabulary is empty".into()));
        }
        let n_u32 = u32::try_from(n)
            .ok()
            .filter(|&v| v < DEAD)
            .ok_or_else(|| ModelError::Tokenizer(format!("vocabulary too large ({n} tokens)")))?;
        let types = if spec.token_types.is_empty() {
            vec![token_type::NORMAL; n]
        } else if spec.token_types.len() == n {
            spec.token_types
        } else {
            return Err(ModelError::Tokenizer(format!(
                "{} token types for {n} tokens",
                spec.token_types.len()
            )));
        };
        for (what, id) in [("bos", spec.bos), ("eos", spec.eos), ("eot", spec.eot)]
            .into_iter()
            .chain(
                spec.extra_eog
                    .iter()
                    .map(|&id| ("extra end-of-generation", Some(id))),
            )
        {
            if let Some(id) = id
                && id >= n_u32
            {
                return Err(ModelError::Tokenizer(format!(
                    "{what} token id {id} is outside the vocabulary ({n} tokens)"
                )));
            }
        }

        // Decoded bytes, the text index and the specials.
        let mut bytes = Vec::with_capacity(n * 4);
        let mut offsets = Vec::with_capacity(n + 1);
        let mut token_to_id = HashMap::with_capacity(n);
        let mut specials = Vec::new();
        let mut byte_token = [None; 256];
        offsets.push(0);
        for (id, (text, &ty)) in (0..n_u32).zip(spec.tokens.iter().zip(&types)) {
            let literal = matches!(ty, token_type::CONTROL | token_type::USER_DEFINED);
            // Tokens in the byte-level alphabet, which BPE produces and merges refer to.
            let bpe = !literal && !matches!(ty, token_type::UNKNOWN | token_type::UNUSED);
            if bpe {
                token_text_to_bytes(text, &mut bytes);
                token_to_id.entry(text.clone()).or_insert(id);
            } else {
                bytes.extend_from_slice(text.as_bytes());
            }
            offsets.push(bytes.len());
            if literal && !text.is_empty() {
                specials.push(Special {
                    id,
                    text: text.clone(),
                    always: ty == token_type::USER_DEFINED,
                });
            }
            if bpe {
                let mut chars = text.chars();
                if let (Some(c), None) = (chars.next(), chars.next())
                    && let Some(b) = char_to_byte(c)
                {
                    let slot = &mut byte_token[usize::from(b)];
                    if slot.is_none() {
                        *slot = Some(id);
                    }
                }
            }
        }

        // Other tokens are found by text too, unless a byte-level token has the same text.
        for (id, text) in (0..n_u32).zip(&spec.tokens) {
            if !token_to_id.contains_key(text.as_str()) {
                token_to_id.insert(text.clone(), id);
            }
        }

        let mut specials_by_byte = vec![Vec::new(); 256];
        let mut order: Vec<usize> = (0..specials.len()).collect();
        order.sort_by_key(|&i| (Reverse(specials[i].text.len()), specials[i].id));
        for i in order {
            if let Some(&b) = specials[i].text.as_bytes().first() {
                specials_by_byte[usize::from(b)].push(i);
            }
        }

        // Merges.
        let mut merges = MergeMap::with_capacity_and_hasher(spec.merges.len(), Default::default());
        let mut skipped = 0usize;
        let mut joined = String::new();
        for (rank, m) in spec.merges.iter().enumerate() {
            let rank =
                u32::try_from(rank).map_err(|_| ModelError::Tokenizer("too many merges".into()))?;
            // Split at the first space after the first character (llama.cpp: find(' ', 1)).
            let first_len = m.chars().next().map_or(0, char::len_utf8);
            let split = m
                .get(first_len..)
                .and_then(|rest| rest.find(' '))
                .map(|p| p + first_len)
                .ok_or_else(|| {
                    ModelError::Tokenizer(format!("merge {rank} `{m}` is not `left right`"))
                })?;
            let (left, right) = (&m[..split], &m[split + 1..]);
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            match (
                token_to_id.get(left),
                token_to_id.get(right),
                token_to_id.get(joined.as_str()),
            ) {
                (Some(&l), Some(&r), Some(&j)) => {
                    merges.entry(pair_key(l, r)).or_insert((rank, j));
                }
                _ => skipped += 1,
            }
        }
        if skipped > 0 {
            tracing::warn!(
                skipped,
                "tokenizer: merges with parts outside the vocabulary skipped"
            );
        }

        let mut eog: Vec<u32> = [spec.eos, spec.eot].into_iter().flatten().collect();
        eog.extend(&spec.extra_eog);
        for s in &specials {
            if EOG_TOKEN_TEXTS.contains(&s.text.as_str()) {
                eog.push(s.id);
            }
        }
        eog.sort_unstable();
        eog.dedup();

        Ok(Self {
            tokens: spec.tokens,
            types,
            bytes,
            offsets,
            token_to_id,
            byte_token,
            merges,
            ignore_merges: pre.kind() == PreTokenizerKind::Llama3,
            pre,
            specials,
            specials_by_byte,
            bos: spec.bos,
            eos: spec.eos,
            add_bos: spec.add_bos,
            eog,
        })
    }

    /// Reads the tokenizer of a GGUF model file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        Self::new(TokenizerSpec::from_gguf(g)?)
    }

    /// Encodes text without adding BOS. With `parse_special`, CONTROL tokens written in the text
    /// (e.g. `<|im_start|>`) become their ids; USER_DEFINED tokens always do.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, ModelError> {
        let _span = tracing::debug_span!("tokenizer.encode", bytes = text.len()).entered();
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut work = BpeWork::default();
        let mut pieces = Vec::new();
        let bytes = text.as_bytes();
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() {
            match self.special_at(&bytes[i..], parse_special) {
                Some((id, len)) => {
                    self.encode_plain(slice(text, start, i)?, &mut pieces, &mut work, &mut out)?;
                    out.push(id);
                    i += len;
                    start = i;
                }
                None => i += 1,
            }
        }
        self.encode_plain(
            slice(text, start, text.len())?,
            &mut pieces,
            &mut work,
            &mut out,
        )?;
        Ok(out)
    }

    /// Encodes a prompt: specials parsed, BOS prepended when the model asks for it
    /// (`add_bos`) and the text does not already start with the BOS token.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let ids = self.encode(text, true)?;
        match self.bos {
            Some(bos) if self.add_bos && ids.first() != Some(&bos) => {
                let mut with = Vec::with_capacity(ids.len() + 1);
                with.push(bos);
                with.extend(ids);
                Ok(with)
            }
            _ => Ok(ids),
        }
    }

    /// Decodes ids to text; byte sequences that are not valid UTF-8 become U+FFFD. An id outside
    /// the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        let mut buf = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            buf.extend_from_slice(self.bytes_or_err(id)?);
        }
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The raw bytes token `id` stands for (`None` outside the vocabulary).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let i = usize::try_from(id).ok()?;
        let start = *self.offsets.get(i)?;
        let end = *self.offsets.get(i + 1)?;
        self.bytes.get(start..end)
    }

    /// The token's text as stored in the vocabulary (byte-level alphabet for normal tokens).
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens
            .get(usize::try_from(id).ok()?)
            .map(String::as_str)
    }

    /// The token's type ([`token_type`]).
    pub fn token_type(&self, id: u32) -> Option<i32> {
        self.types.get(usize::try_from(id).ok()?).copied()
    }

    /// The id of a token text as stored in the vocabulary.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode_prompt` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `id` ends a generation: EOS, EOT, the extra ids of the spec, and control tokens
    /// named in [`EOG_TOKEN_TEXTS`] (`<|im_end|>`, `<|eot_id|>`, `<|end_of_text|>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> &PreTokenizer {
        &self.pre
    }

    fn bytes_or_err(&self, id: u32) -> Result<&[u8], ModelError> {
        self.token_bytes(id).ok_or_else(|| {
            ModelError::Tokenizer(format!(
                "token id {id} is outside the vocabulary ({} tokens)",
                self.tokens.len()
            ))
        })
    }

    /// The longest special token at the start of `rest`, if any: `(id, byte length)`.
    fn special_at(&self, rest: &[u8], parse_special: bool) -> Option<(u32, usize)> {
        let first = *rest.first()?;
        self.specials_by_byte
            .get(usize::from(first))?
            .iter()
            .filter_map(|&i| self.specials.get(i))
            .find(|s| (parse_special || s.always) && rest.starts_with(s.text.as_bytes()))
            .map(|s| (s.id, s.text.len()))
    }

    /// Pre-tokenizes and BPE-encodes text that holds no special tokens.
    fn encode_plain<'a>(
        &self,
        text: &'a str,
        pieces: &mut Vec<&'a str>,
        work: &mut BpeWork,
        out: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        if text.is_empty() {
            return Ok(());
        }
        pieces.clear();
        self.pre.split(text, pieces)?;
        for piece in pieces.iter() {
            self.bpe_piece(piece.as_bytes(), work, out)?;
        }
        Ok(())
    }

    /// BPE over a short piece: rescan all adjacent pairs after each merge (quadratic, but
    /// cheaper than the heap for the few symbols of a typical word).
    fn bpe_short(
        &self,
        piece: &[u8],
        work: &mut BpeWork,
        out: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        let ids = &mut work.ids;
        ids.clear();
        for &b in piece {
            ids.push(self.byte_id(b)?);
        }
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for (i, w) in ids.windows(2).enumerate() {
                if let [l, r] = *w
                    && let Some(&(rank, merged)) = self.merges.get(&pair_key(l, r))
                    && best.is_none_or(|(b, _, _)| rank < b)
                {
                    best = Some((rank, i, merged));
                }
            }
            let Some((_, i, merged)) = best else { break };
            if let Some(slot) = ids.get_mut(i) {
                *slot = merged;
            }
            ids.remove(i + 1);
        }
        out.extend_from_slice(ids);
        Ok(())
    }

    fn byte_id(&self, b: u8) -> Result<u32, ModelError> {
        self.byte_token[usize::from(b)].ok_or_else(|| {
            ModelError::Tokenizer(format!("the vocabulary has no token for byte 0x{b:02x}"))
        })
    }

    /// BPE over one pre-tokenized piece: lowest merge rank first, leftmost on ties.
    fn bpe_piece(
        &self,
        piece: &[u8],
        work: &mut BpeWork,
        out: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        if self.ignore_merges {
            work.text.clear();
            work.text.extend(piece.iter().map(|&b| byte_to_char(b)));
            if let Some(&id) = self.token_to_id.get(work.text.as_str()) {
                out.push(id);
                return Ok(());
            }
        }
        if piece.len() <= SHORT_PIECE {
            return self.bpe_short(piece, work, out);
        }
        let syms = &mut work.syms;
        syms.clear();
        for (i, &b) in piece.iter().enumerate() {
            let id = self.byte_id(b)?;
            syms.push(Sym {
                id,
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 < piece.len() { i + 1 } else { NONE },
            });
        }
        let heap = &mut work.heap;
        heap.clear();
        for (i, w) in syms.windows(2).enumerate() {
            if let Some(&(rank, _)) = self.merges.get(&pair_key(w[0].id, w[1].id)) {
                heap.push(Reverse((rank, i, w[0].id, w[1].id)));
            }
        }
        while let Some(Reverse((_, pos, left, right))) = heap.pop() {
            // Entries go stale when a neighbour was merged first; the pair must still be there.
            let Some(&cur) = syms.get(pos) else { continue };
            if cur.id != left || cur.next == NONE {
                continue;
            }
            let nx = cur.next;
            let Some(&next) = syms.get(nx) else { continue };
            if next.id != right {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&pair_key(left, right)) else {
                continue;
            };
            syms[pos].id = merged;
            syms[pos].next = next.next;
            syms[nx].id = DEAD;
            if let Some(after) = syms.get_mut(next.next) {
                after.prev = pos;
            }
            if let Some(p) = syms.get(cur.prev)
                && let Some(&(rank, _)) = self.merges.get(&pair_key(p.id, merged))
            {
                heap.push(Reverse((rank, cur.prev, p.id, merged)));
            }
            if let Some(a) = syms.get(next.next)
                && let Some(&(rank, _)) = self.merges.get(&pair_key(merged, a.id))
            {
                heap.push(Reverse((rank, pos, merged, a.id)));
            }
        }
        let mut i = if syms.is_empty() { NONE } else { 0 };
        while let Some(s) = syms.get(i) {
            out.push(s.id);
            i = s.next;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming decode
// ---------------------------------------------------------------------------------------------

/// Turns a stream of token ids into text pieces, holding back the bytes of a character that is
/// split across tokens until it is complete.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one token and returns the text that became complete (possibly empty). Only complete
    /// UTF-8 is returned: an incomplete trailing sequence waits for the next token; bytes that
    /// can never be valid become U+FFFD. An id outside the vocabulary is an error.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String, ModelError> {
        self.pending.extend_from_slice(tok.bytes_or_err(id)?);
        Ok(self.drain_complete())
    }

    /// Returns whatever is still held back, invalid bytes replaced by U+FFFD, and resets.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    /// Number of bytes held back.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    fn drain_complete(&mut self) -> String {
        let mut out = String::new();
        let mut consumed = 0;
        while let Some(rest) = self.pending.get(consumed..) {
            if rest.is_empty() {
                break;
            }
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    if let Some(Ok(s)) = rest.get(..valid).map(std::str::from_utf8) {
                        out.push_str(s);
                    }
                    match e.error_len() {
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            consumed += valid + bad;
                        }
                        None => {
                            consumed += valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..consumed.min(self.pending.len()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        let p = PreTokenizer::new(pre).unwrap();
        let mut out = Vec::new();
        p.split(text, &mut out).unwrap();
        assert_eq!(out.concat(), text, "pieces must concatenate to the input");
        out.into_iter().map(String::from).collect()
    }

    #[test]
    fn byte_alphabet_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c), "duplicate char for byte {b}");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(byte_to_char(b'\t'), 'ĉ');
        assert_eq!(byte_to_char(b'a'), 'a');
        assert_eq!(char_to_byte('€'), None);
        assert_eq!(char_to_byte('Ő'), None); // U+0150 = 336, just past the alphabet
    }

    #[test]
    fn smollm_isolates_digits_before_whitespace_rules() {
        assert_eq!(split("smollm", "\n\n   1."), ["\n\n   ", "1", "."]);
        assert_eq!(
            split("smollm", "abc 2024!"),
            ["abc", " ", "2", "0", "2", "4", "!"]
        );
        // Without digit isolation the space joins the number.
        assert_eq!(split("gpt2", "abc 2024!"), ["abc", " 2024", "!"]);
        assert_eq!(split("gpt2", "\n\n   1."), ["\n\n  ", " 1", "."]);
    }

    #[test]
    fn gpt2_whitespace_lookahead() {
        assert_eq!(split("gpt2", "a   b"), ["a", "  ", " b"]);
        assert_eq!(split("gpt2", "a   "), ["a", "   "]);
        assert_eq!(split("gpt2", "x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(split("gpt2", "I'll don't"), ["I", "'ll", " don", "'t"]);
        assert_eq!(
            split("gpt2", "\thello  \t world"),
            ["\t", "hello", "  \t", " world"]
        );
    }

    #[test]
    fn llama3_split() {
        assert_eq!(
            split("llama-bpe", "Hello world 12345!!\n\n"),
            ["Hello", " world", " ", "123", "45", "!!\n\n"]
        );
        assert_eq!(
            split("llama-bpe", "I'LL go  now"),
            ["I", "'LL", " go", " ", " now"]
        );
        assert_eq!(split("llama-bpe", "a \n\n b"), ["a", " \n\n", " b"]);
    }

    /// The specification: the look-ahead regex run by fancy-regex's backtracking engine.
    fn oracle_split(kind: PreTokenizerKind, re: &fancy_regex::Regex, text: &str) -> Vec<String> {
        let regex_split = |t: &str, out: &mut Vec<String>| {
            let mut last = 0;
            for m in re.find_iter(t) {
                let m = m.unwrap();
                if m.start() > last {
                    out.push(t[last..m.start()].to_string());
                }
                out.push(m.as_str().to_string());
                last = m.end();
            }
            if last < t.len() {
                out.push(t[last..].to_string());
            }
        };
        let mut out = Vec::new();
        if kind != PreTokenizerKind::DigitsGpt2 {
            regex_split(text, &mut out);
            return out;
        }
        let mut start = 0;
        for (i, c) in text.char_indices() {
            if c.is_numeric() {
                regex_split(&text[start..i], &mut out);
                out.push(c.to_string());
                start = i + c.len_utf8();
            }
        }
        regex_split(&text[start..], &mut out);
        out
    }

    #[test]
    fn linear_split_equals_lookahead_regex() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = " \t\n\r\u{a0}\u{2028}\u{3000}aZéS'tTLl1٣Ⅻ.,!-_東🦀"
            .chars()
            .collect();
        let mut rng = StdRng::seed_from_u64(5);
        for pre in ["gpt2", "smollm", "llama-bpe"] {
            let p = PreTokenizer::new(pre).unwrap();
            let pattern = if p.kind() == PreTokenizerKind::Llama3 {
                LLAMA3_PATTERN
            } else {
                GPT2_PATTERN
            };
            let oracle = fancy_regex::Regex::new(pattern).unwrap();
            for _ in 0..5000 {
                let len = rng.random_range(0..24);
                let text: String = (0..len)
                    .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                    .collect();
                let mut got = Vec::new();
                p.split(&text, &mut got).unwrap();
                assert_eq!(
                    got,
                    oracle_split(p.kind(), &oracle, &text),
                    "{pre} {text:?}"
                );
            }
        }
    }

    #[test]
    fn long_whitespace_runs_do_not_overflow() {
        let text = format!("{}x{}", " \t".repeat(600_000), "\n ".repeat(600_000));
        for pre in ["gpt2", "smollm", "llama-bpe"] {
            let pieces = split(pre, &text);
            assert!(pieces.len() <= 4, "{pre}: {} pieces", pieces.len());
        }
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        let e = PreTokenizer::new("qwen2").unwrap_err();
        assert!(
            e.to_string().contains("unsupported pre-tokenizer `qwen2`"),
            "{e}"
        );
    }

    #[test]
    fn stream_decoder_holds_back_partial_characters() {
        let mut d = StreamDecoder::new();
        d.pending.extend_from_slice(&[0xE2, 0x82]);
        assert_eq!(d.drain_complete(), "");
        assert_eq!(d.pending_len(), 2);
        d.pending.push(0xAC);
        assert_eq!(d.drain_complete(), "€");
        d.pending.extend_from_slice(&[b'a', 0xFF, b'b', 0xF0, 0x9F]);
        assert_eq!(d.drain_complete(), "a\u{FFFD}b");
        assert_eq!(d.finish(), "\u{FFFD}");
        assert_eq!(d.pending_len(), 0);
    }
}
