//! Chat templates: detection and default-system extraction on arbitrary Jinja text, and rendering
//! of arbitrary conversations. Roles that the renderer accepts never break the structure.
#![no_main]

use freekv_model::chat::{ChatMessage, ChatTemplate};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let template = match u.int_in_range(0..=2u8)? {
        0 => {
            let jinja: &str = u.arbitrary()?;
            match ChatTemplate::detect(jinja) {
                Some(t) => t,
                None => return Ok(()),
            }
        }
        1 => ChatTemplate::ChatMl {
            default_system: u.arbitrary()?,
        },
        _ => ChatTemplate::Llama3,
    };
    let n = u.int_in_range(0..=6usize)?;
    let mut messages = Vec::with_capacity(n);
    for _ in 0..n {
        let role: String = u.arbitrary()?;
        let content: String = u.arbitrary()?;
        messages.push(ChatMessage::new(role, content));
    }
    let gen_prompt: bool = u.arbitrary()?;
    if let Ok(out) = template.render(&messages, gen_prompt) {
        for m in &messages {
            assert!(!m.role.is_empty() && !m.role.contains("<|"));
            let c = match template {
                ChatTemplate::Llama3 => m.content.trim(),
                ChatTemplate::ChatMl { .. } => m.content.as_str(),
            };
            assert!(out.contains(c));
        }
        if gen_prompt {
            assert!(out.ends_with("assistant\n") || out.ends_with("assistant<|end_header_id|>\n\n"));
        }
    }
    let system: Option<&str> = u.arbitrary()?;
    let user: &str = u.arbitrary()?;
    let _ = template.prompt(system, user);
    let _ = template.default_system();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
