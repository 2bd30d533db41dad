//! Chat prompt templates: ChatML (SmolLM2, Qwen, ...) and Llama 3.
//!
//! GGUF files carry their template as Jinja text in `tokenizer.chat_template`. Instead of a Jinja
//! interpreter, the template is recognised by its markers and rendered natively; the ChatML
//! default system prompt (inserted when the conversation does not start with a system message)
//! is extracted from the Jinja text.
//!
//! ```
//! use freekv_model::chat::ChatTemplate;
//! let t = ChatTemplate::ChatMl { default_system: Some("You are helpful.".into()) };
//! assert_eq!(
//!     t.prompt(None, "Hi").unwrap(),
//!     "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
//!      <|im_start|>assistant\n"
//! );
//! ```

use crate::ModelError;
use crate::gguf::GgufFile;

/// The GGUF metadata key holding the Jinja chat template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A recognised chat template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` per message; `default_system` is inserted as a
    /// first system message when the conversation does not start with one.
    ChatMl {
        /// The template's built-in system prompt, if it has one.
        default_system: Option<String>,
    },
    /// `<|begin_of_text|>` then `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`
    /// per message (content trimmed, as the Llama 3 template does).
    Llama3,
}

impl ChatTemplate {
    /// The template of a GGUF file: `Ok(None)` when the file has no `tokenizer.chat_template`,
    /// an error when it has one that is neither ChatML nor Llama 3.
    pub fn from_gguf(g: &GgufFile) -> Result<Option<Self>, ModelError> {
        let Some(v) = g.get(CHAT_TEMPLATE_KEY) else {
            return Ok(None);
        };
        let text = v.as_str().ok_or_else(|| ModelError::BadMetadata {
            key: CHAT_TEMPLATE_KEY.to_string(),
            msg: format!("expected a string, found {}", v.type_name()),
        })?;
        Self::detect(text).map(Some).ok_or_else(|| {
            ModelError::Template(
                "unsupported chat template (neither ChatML `<|im_start|>` nor Llama 3 \
                 `<|start_header_id|>` markers); use a raw prompt"
                    .into(),
            )
        })
    }

    /// Recognises a Jinja template text by its markers; `None` when it is neither ChatML nor
    /// Llama 3.
    pub fn detect(template: &str) -> Option<Self> {
        if template.contains("<|im_start|>") {
            Some(Self::ChatMl {
                default_system: extract_chatml_default_system(template),
            })
        } else if template.contains("<|start_header_id|>") {
            Some(Self::Llama3)
        } else {
            None
        }
    }

    /// Renders a conversation; with `add_generation_prompt`, ends with the assistant header so
    /// that the model writes the reply. Roles must be non-empty and hold no whitespace or `<|`.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let mut out = String::new();
        for m in messages {
            check_role(&m.role)?;
        }
        match self {
            Self::ChatMl { default_system } => {
                for (i, m) in messages.iter().enumerate() {
                    if i == 0
                        && m.role != "system"
                        && let Some(sys) = default_system
                    {
                        push_chatml(&mut out, "system", sys);
                    }
                    push_chatml(&mut out, &m.role, &m.content);
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
            Self::Llama3 => {
                if !messages.is_empty() {
                    out.push_str("<|begin_of_text|>");
                }
                for m in messages {
                    push_llama3_header(&mut out, &m.role);
                    out.push_str(m.content.trim());
                    out.push_str("<|eot_id|>");
                }
                if add_generation_prompt {
                    push_llama3_header(&mut out, "assistant");
                }
            }
        }
        Ok(out)
    }

    /// A one-turn prompt ready for generation. `system = None` uses the template's default
    /// system prompt (if any); `Some(text)` sends `text` as the system message.
    pub fn prompt(&self, system: Option<&str>, user: &str) -> Result<String, ModelError> {
        let mut messages = Vec::with_capacity(2);
        if let Some(sys) = system {
            messages.push(ChatMessage::system(sys));
        }
        messages.push(ChatMessage::user(user));
        self.render(&messages, true)
    }

    /// The default system prompt (ChatML templates that have one).
    pub fn default_system(&self) -> Option<&str> {
        match self {
            Self::ChatMl { default_system } => default_system.as_deref(),
            Self::Llama3 => None,
        }
    }
}

fn check_role(role: &str) -> Result<(), ModelError> {
    if role.is_empty() || role.contains(char::is_whitespace) || role.contains("<|") {
        return Err(ModelError::Template(format!(
            "invalid role {role:?}: must be non-empty, without whitespace or `<|`"
        )));
    }
    Ok(())
}

fn push_chatml(out: &mut String, role: &str, content: &str) {
    out.push_str("<|im_start|>");
    out.push_str(role);
    out.push('\n');
    out.push_str(content);
    out.push_str("<|im_end|>\n");
}

fn push_llama3_header(out: &mut String, role: &str) {
    out.push_str("<|start_header_id|>");
    out.push_str(role);
    out.push_str("<|end_header_id|>\n\n");
}

/// Longest default system prompt that is extracted (a longer literal is not taken for one).
const MAX_DEFAULT_SYSTEM_BYTES: usize = 16 * 1024;
/// Quoted `<|im_start|>system` literals examined at most (real templates have one or two).
/// With [`MAX_DEFAULT_SYSTEM_BYTES`] this keeps the extraction linear in the template's size:
/// without the bounds, a template of N such literals with escaped quotes between them took
/// O(N²) (9 s for 336 KB), and a model file can carry any template.
const MAX_SYSTEM_LITERALS: usize = 16;

/// Finds a string literal of the form `'<|im_start|>system\n...<|im_end|>` (quoted with `'` or
/// `"`, `\n` either escaped or literal) whose system text is a constant, and returns that text
/// unescaped. Literals that are interrupted (e.g. `... + messages[0]['content'] + ...`) are
/// skipped; at most [`MAX_SYSTEM_LITERALS`] literals are examined, each for at most
/// [`MAX_DEFAULT_SYSTEM_BYTES`] of text.
fn extract_chatml_default_system(template: &str) -> Option<String> {
    const OPEN: &str = "<|im_start|>system";
    const CLOSE: &str = "<|im_end|>";
    let mut examined = 0;
    for (idx, _) in template.match_indices(OPEN) {
        let quote = match template
            .get(..idx)
            .and_then(|before| before.chars().next_back())
        {
            Some(q @ ('\'' | '"')) => q,
            _ => continue,
        };
        if examined == MAX_SYSTEM_LITERALS {
            break;
        }
        examined += 1;
        let Some(after) = template.get(idx + OPEN.len()..) else {
            continue;
        };
        let body = if let Some(b) = after.strip_prefix('\n') {
            b
        } else if let Some(b) = after.strip_prefix("\\n") {
            b
        } else {
            continue;
        };
        let mut text = String::new();
        let mut chars = body.char_indices();
        let mut found = false;
        while let Some((i, c)) = chars.next() {
            if i > MAX_DEFAULT_SYSTEM_BYTES {
                break;
            }
            if body.get(i..).is_some_and(|r| r.starts_with(CLOSE)) {
                found = true;
                break;
            }
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => text.push('\n'),
                    Some((_, 't')) => text.push('\t'),
                    Some((_, 'r')) => text.push('\r'),
                    Some((_, other)) => text.push(other),
                    None => break,
                },
                c if c == quote => break,
                c => text.push(c),
            }
        }
        if found && !text.is_empty() {
            return Some(text);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn extracts_smollm2_default_system() {
        let t = ChatTemplate::detect(SMOLLM2).unwrap();
        assert_eq!(
            t.default_system(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
    }

    #[test]
    fn extracts_escaped_default_system() {
        let tpl = r#"{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou\'re Qwen.\tBe nice.<|im_end|>\n' }}{%- endif %}"#;
        let t = ChatTemplate::detect(tpl).unwrap();
        assert_eq!(t.default_system(), Some("You're Qwen.\tBe nice."));
    }

    #[test]
    fn no_default_system_when_system_is_dynamic() {
        let tpl = "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}";
        assert_eq!(
            ChatTemplate::detect(tpl),
            Some(ChatTemplate::ChatMl {
                default_system: None
            })
        );
    }

    #[test]
    fn detects_llama3_and_rejects_unknown() {
        let tpl = "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}";
        assert_eq!(ChatTemplate::detect(tpl), Some(ChatTemplate::Llama3));
        assert_eq!(
            ChatTemplate::detect("[INST] {{ message['content'] }} [/INST]"),
            None
        );
    }

    #[test]
    fn chatml_explicit_system_replaces_default() {
        let t = ChatTemplate::detect(SMOLLM2).unwrap();
        let p = t.prompt(Some("Be brief."), "Hi").unwrap();
        assert_eq!(
            p,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let multi = t
            .render(
                &[
                    ChatMessage::user("a"),
                    ChatMessage::assistant("b"),
                    ChatMessage::user("c"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            multi,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
        );
    }

    #[test]
    fn llama3_render() {
        let p = ChatTemplate::Llama3
            .prompt(Some("Sys"), "  Hello \n")
            .unwrap();
        assert_eq!(
            p,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            ChatTemplate::Llama3.prompt(None, "Q").unwrap(),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn extraction_is_bounded_on_adversarial_templates() {
        // Literals with escaped quotes between them: every one scanned to the end of the
        // template took quadratic time (found while writing the `chat` fuzz target). 1 MB now
        // takes a few milliseconds.
        let unit = "'<|im_start|>system\n\\";
        let t = unit.repeat(50_000);
        assert_eq!(
            ChatTemplate::detect(&t),
            Some(ChatTemplate::ChatMl {
                default_system: None
            })
        );
        // The bounds keep real templates working: a default after a few dynamic literals.
        let tpl = format!(
            "{}{{{{ '<|im_start|>system\nBe kind.<|im_end|>\n' }}}}",
            "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>' }}".repeat(3)
        );
        assert_eq!(
            ChatTemplate::detect(&tpl).unwrap().default_system(),
            Some("Be kind.")
        );
        let long = format!("'<|im_start|>system\n{}<|im_end|>'", "x".repeat(20_000));
        assert_eq!(ChatTemplate::detect(&long).unwrap().default_system(), None);
    }

    #[test]
    fn bad_roles_are_errors() {
        for role in ["", "us er", "a<|im_end|>", "x\n"] {
            let m = [ChatMessage::new(role, "hi")];
            assert!(ChatTemplate::Llama3.render(&m, true).is_err(), "{role:?}");
            assert!(
                ChatTemplate::ChatMl {
                    default_system: None
                }
                .render(&m, true)
                .is_err()
            );
        }
    }
}
