//! A task and a text become a chat prompt. The prompt is split where the request's own text begins:
//! everything before it (system prompt, few-shot examples, template) is the same for every request and
//! its KV state can be computed once (`prefix_cache.rs`).

use crate::error::Result;
use crate::lang::Lang;
use crate::library::{fill, Task};
use qwen2::{Message, Tokenizer};
use std::collections::BTreeMap;

/// Marks where the user text goes when rendering the prefix; no real text contains it.
const SLOT: &str = "\u{E000}DUET-USER-TEXT\u{E001}";

pub struct Prompt {
    /// The whole prompt text, ready to tokenize.
    pub text: String,
    /// The fixed part at the start of `text`.
    pub prefix: String,
}

/// Placeholder values for a task in a language: the task's defaults, overridden by `vars`.
pub fn variables(
    task: &Task,
    lang: Lang,
    vars: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut all: BTreeMap<String, String> = task
        .defaults
        .iter()
        .map(|(k, v)| (k.clone(), v.get(lang).to_string()))
        .collect();
    all.extend(vars.iter().map(|(k, v)| (k.clone(), v.clone())));
    all
}

/// The messages of a task's prompt: system, few-shot examples, earlier turns, then the user text.
pub fn messages(
    task: &Task,
    lang: Lang,
    vars: &BTreeMap<String, String>,
    history: &[Message],
    text: &str,
) -> Vec<Message> {
    let mut msgs = vec![Message::system(&fill(
        task.system.get(lang),
        &variables(task, lang, vars),
    ))];
    let same_lang: Vec<_> = task
        .examples
        .iter()
        .filter(|e| e.lang.as_deref().is_none_or(|l| l == lang.code()))
        .collect();
    for e in same_lang {
        let answer = match (&e.label, &e.output) {
            (Some(id), _) => task
                .label(id)
                .map(|l| l.display(lang).to_string())
                .unwrap_or_default(),
            (None, Some(o)) => o.clone(),
            (None, None) => continue,
        };
        msgs.push(Message::user(&e.text));
        msgs.push(Message::assistant(&answer));
    }
    msgs.extend_from_slice(history);
    msgs.push(Message::user(text));
    msgs
}

pub fn build(
    tok: &Tokenizer,
    task: &Task,
    lang: Lang,
    vars: &BTreeMap<String, String>,
    history: &[Message],
    text: &str,
) -> Result<Prompt> {
    let full = tok.render_chat(&messages(task, lang, vars, history, text), true)?;
    let with_slot = tok.render_chat(&messages(task, lang, vars, history, SLOT), true)?;
    let prefix = match with_slot.find(SLOT) {
        Some(i) if full.starts_with(&with_slot[..i]) => with_slot[..i].to_string(),
        _ => String::new(),
    };
    Ok(Prompt { text: full, prefix })
}
