//! `Tokenizer`: text ⇄ token ids (the `tokenizers` crate, pure Rust) and the chat template that turns a
//! conversation into the exact prompt text the model was trained on.

use crate::error::{Error, Result};
use crate::weights::gguf::BpeSpec;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn system(content: &str) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: &str) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: &str) -> Self {
        Self::new("assistant", content)
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The model's own Jinja chat template; `None` falls back to plain ChatML.
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and the chat template from `tokenizer_config.json` of a Hugging Face dir.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let template = if cfg_path.is_file() {
            let cfg = crate::config::read_json(&cfg_path)?;
            match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                // A list of named templates: take the default one.
                Some(serde_json::Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(String::from)),
                _ => None,
            }
        } else {
            None
        };
        let template =
            template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        // A BPE tokenizer (every Qwen2) is read by our quicker reader; anything else, and any error,
        // by `tokenizers`' own, straight from the text.
        let cannot = |e: &dyn std::fmt::Display| {
            Error::Tokenizer(format!("{}: cannot build tokenizer: {e}", path.display()))
        };
        let inner = match crate::tokenizer_json::read_bpe(&text) {
            Some(inner) => inner.map_err(|e| cannot(&e))?,
            None => {
                // `tokenizers`' reader panics on some malformed JSON (a syntax error inside a decoder,
                // found by fuzzing) instead of returning an error: the syntax is checked first.
                serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| cannot(&e))?;
                text.parse().map_err(|e| cannot(&e))?
            }
        };
        Ok(Tokenizer {
            inner,
            chat_template: template,
        })
    }

    pub fn from_json(json: &serde_json::Value, chat_template: Option<String>) -> Result<Self> {
        // Through text rather than `from_value(json.clone())`: `tokenizers` buffers a large `Value` again
        // on its way through, which took most of the load time (1.8 → 1.0 s of CPU for the default model).
        let inner: tokenizers::Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e| Error::Tokenizer(format!("cannot build tokenizer: {e}")))?;
        Ok(Tokenizer {
            inner,
            chat_template,
        })
    }

    /// Builds the tokenizer a GGUF file describes directly with `tokenizers`' builders: the same pipeline
    /// as [`BpeSpec::to_json`] read back by [`Tokenizer::from_json`] (a test checks they agree), in a
    /// fraction of the time.
    pub fn from_bpe(spec: BpeSpec, chat_template: Option<String>) -> Result<Self> {
        use tokenizers::models::bpe::{Vocab, BPE};
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::pre_tokenizers::sequence::Sequence;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};
        let err = |e: tokenizers::Error| Error::Tokenizer(format!("cannot build tokenizer: {e}"));
        // Later duplicates win, as in a JSON object read into a map.
        let vocab: Vocab = spec
            .vocab
            .into_iter()
            .enumerate()
            .map(|(id, t)| (t, id as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, spec.merges)
            .build()
            .map_err(err)?;
        let byte_level = ByteLevel::new(false, false, false);
        let split = Split::new(
            SplitPattern::Regex(crate::weights::gguf::QWEN2_SPLIT_REGEX.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_normalizer(Some(tokenizers::normalizers::unicode::NFC))
            .with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])))
            .with_post_processor(Some(byte_level))
            .with_decoder(Some(byte_level));
        let added: Vec<AddedToken> = spec
            .added
            .into_iter()
            .map(|t| AddedToken {
                content: t.content,
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
                special: t.special,
            })
            .collect();
        inner.add_tokens(&added);
        Ok(Tokenizer {
            inner,
            chat_template,
        })
    }

    /// Text → ids, with special tokens written in the text recognised (as transformers does) and no
    /// BOS added (Qwen adds none).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The vocabulary entry of one id, as text (byte-level pieces decoded; for traces).
    pub fn piece(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Renders a conversation with the model's chat template, exactly as transformers'
    /// `apply_chat_template(..., tokenize=False)` does (same Jinja settings: trim_blocks, lstrip_blocks).
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let Some(template) = &self.chat_template else {
            return Ok(render_chatml(messages, add_generation_prompt));
        };
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| Error::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => "",
            eos_token => "<|im_end|>",
        })
        .map_err(|e| Error::Template(e.to_string()))
    }
}

/// Plain ChatML, for models without a template.
pub fn render_chatml(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str(&format!(
            "<|im_start|>{}\n{}<|im_end|>\n",
            m.role, m.content
        ));
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

/// Turns a growing list of token ids into text pieces that are always whole UTF-8: a character whose
/// bytes are split across tokens is held back until its last byte arrives.
///
/// Each push decodes a short window, not every id so far (which made a long generation quadratic): the
/// ids from `prefix` on, with `ids[prefix..read]` already emitted. The window starts where an earlier
/// piece ended whole, so its text is exactly the tail of the full decode.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    /// All text emitted so far.
    emitted: String,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the new complete text, possibly empty.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let (before, now) = self.window(tok)?;
        // An incomplete multi-byte character decodes to U+FFFD at the end: wait for the next token. So
        // does an id that adds no text (a skipped special token): the window grows until one does.
        if now.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        match now.strip_prefix(before.as_str()) {
            Some(new) if !new.is_empty() => {
                let new = new.to_string();
                self.emit(&new);
                Ok(new)
            }
            _ => Ok(String::new()),
        }
    }

    /// Whatever is still held back (at the end of generation), lossily decoded.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let (before, now) = self.window(tok)?;
        let rest = now.strip_prefix(before.as_str()).unwrap_or("").to_string();
        self.emit(&rest);
        Ok(rest)
    }

    /// The window's emitted text, and its text with the ids after it.
    fn window(&self, tok: &Tokenizer) -> Result<(String, String)> {
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        Ok((before, now))
    }

    fn emit(&mut self, piece: &str) {
        self.emitted.push_str(piece);
        self.prefix = self.read;
        self.read = self.ids.len();
    }

    pub fn text(&self) -> &str {
        &self.emitted
    }
}
