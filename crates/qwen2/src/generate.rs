//! The decode loop: prefill the prompt (in runs, with progress, when it is long), then one token at a
//! time until an eos id or `max_new_tokens`, streaming whole-UTF-8 text pieces to a callback. Phrases to
//! avoid send it back to where one began ([`crate::phrase_guard`]).

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::model::{Logits, Model, PREFILL_CHUNK};
use crate::phrase_guard::PhraseGuard;
use crate::sampler::{top_k, Sampler, SamplingParams};
use crate::tokenizer::{TextStream, Tokenizer};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Keep going past eos ids (for benchmarks).
    pub ignore_eos: bool,
    /// Stop on any of these.
    pub eos_ids: Vec<u32>,
    /// Report this many top candidates for each step (0 = none; for `--trace` and `--top-logits`).
    pub top_candidates: usize,
    /// Told how far a long prompt's prefill has got (see [`Model::prefill`]).
    pub prefill_progress: Option<PrefillProgress>,
    /// Phrases the text must not contain (ASCII case ignored): where one appears, generation goes back
    /// to the token it began in and takes the best other token there ([`crate::phrase_guard`]).
    pub avoid: Vec<String>,
}

/// A caller's view of a long prompt's prefill: called with (tokens done, tokens in all) after each run.
#[derive(Clone)]
pub struct PrefillProgress(pub std::sync::Arc<dyn Fn(usize, usize) + Send + Sync>);

impl PrefillProgress {
    /// Reports to `progress`, if there is one.
    pub fn report(progress: &Option<PrefillProgress>, done: usize, total: usize) {
        if let Some(p) = progress {
            (p.0)(done, total);
        }
    }
}

impl std::fmt::Debug for PrefillProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrefillProgress")
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            sampling: SamplingParams::greedy(),
            ignore_eos: false,
            eos_ids: Vec::new(),
            top_candidates: 0,
            prefill_progress: None,
            avoid: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    Length,
    /// The callback asked to stop (e.g. Ctrl-C).
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::Eos => "eos",
            StopReason::Length => "length",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// What the callback sees for each generated token.
pub struct TokenEvent<'a> {
    pub id: u32,
    /// New complete text (may be empty while a character is incomplete; empty for eos).
    pub text: &'a str,
    /// The best candidates at this step, best first (empty unless asked for).
    pub candidates: &'a [(u32, f32)],
    /// This token completed a phrase to avoid: generation goes back and replaces generated token
    /// `token` (its text was never shown).
    pub avoided: Option<Avoided<'a>>,
}

/// A phrase to avoid that the text came to contain, and where generation went back to.
#[derive(Debug, Clone, Copy)]
pub struct Avoided<'a> {
    pub phrase: &'a str,
    /// The index among the generated tokens of the one replaced, and its id, now ruled out there.
    pub token: usize,
    pub id: u32,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    pub stop_reason: StopReason,
    /// Top candidates at the last prompt position (the first generated step).
    pub first_top: Vec<(u32, f32)>,
    pub prefill_tokens: usize,
    pub prefill: Duration,
    /// Time from the start until the first token was chosen.
    pub first_token: Duration,
    pub decode: Duration,
    /// Times a phrase to avoid sent generation back.
    pub rewinds: usize,
}

/// Appends `prompt` to `cache` (which may already hold a cached prefix) and generates.
/// The callback returns `false` to stop early.
pub fn generate(
    model: &Model,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: &mut dyn FnMut(TokenEvent) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt has no tokens".into()));
    }
    let start = Instant::now();
    let mut history: Vec<u32> = prompt.to_vec();
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stream = TextStream::new();
    let mut ids = Vec::new();
    // The text's length after each generated token, and how much of it the callback has been given.
    let mut ends: Vec<usize> = Vec::new();
    let mut shown = 0;
    let mut guard = PhraseGuard::new(&opts.avoid);
    let prompt_end = cache.len() + prompt.len();

    let report = |done, total| PrefillProgress::report(&opts.prefill_progress, done, total);
    let mut logits = model.prefill(prompt, cache, Logits::Last, PREFILL_CHUNK, &report)?;
    let prefill = start.elapsed();
    let first_top = top_k(&logits, opts.top_candidates.max(1));
    // Going back to the first token needs the prompt's logits again.
    let first_logits = guard.is_active().then(|| logits.clone());
    let mut first_token = Duration::ZERO;
    let decode_start = Instant::now();
    let mut stop_reason = StopReason::Length;

    while ids.len() < opts.max_new_tokens {
        guard.rule_out(ids.len(), &mut logits);
        let candidates = if opts.top_candidates > 0 {
            top_k(&logits, opts.top_candidates)
        } else {
            Vec::new()
        };
        let id = sampler.sample(&mut logits, &history);
        // Every logit of a damaged model is NaN, and the sampler would still pick a token from them
        // (greedy decoding the first of the vocabulary), so the answer would be noise: say so instead.
        if !logits[id as usize].is_finite() {
            return Err(Error::NotFinite(format!(
                "the score of new token {}",
                ids.len() + 1
            )));
        }
        if ids.is_empty() {
            first_token = start.elapsed();
        }
        let is_eos = !opts.ignore_eos && opts.eos_ids.contains(&id);
        if is_eos {
            on_token(TokenEvent {
                id,
                text: "",
                candidates: &candidates,
                avoided: None,
            });
            stop_reason = StopReason::Eos;
            break;
        }
        ids.push(id);
        history.push(id);
        stream.push(tokenizer, id)?;
        ends.push(stream.text().len());

        if let Some(found) = guard.find(stream.text(), shown, &ends) {
            // Back to the token the phrase began in, that choice ruled out there. Nothing from it on
            // was shown: `safe_len` held it back.
            let (back, replaced) = (found.token, ids[found.token]);
            guard.go_back(back, replaced);
            ids.truncate(back);
            history.truncate(prompt.len() + back);
            ends.truncate(back);
            stream = TextStream::new();
            for &t in &ids {
                stream.push(tokenizer, t)?;
            }
            let avoided = Avoided {
                phrase: &found.phrase,
                token: back,
                id: replaced,
            };
            if !on_token(TokenEvent {
                id,
                text: "",
                candidates: &candidates,
                avoided: Some(avoided),
            }) {
                stop_reason = StopReason::Cancelled;
                break;
            }
            // The logits that chose the replaced token: the prompt's, or the step's again.
            logits = if back == 0 {
                cache.truncate(prompt_end);
                first_logits
                    .clone()
                    .expect("kept while the guard can find a phrase")
            } else {
                cache.truncate(prompt_end + back - 1);
                model.forward(&[ids[back - 1]], cache, Logits::Last)?
            };
            continue;
        }
        let safe = guard.safe_len(stream.text(), shown, &ends);
        let piece = stream.text()[shown..safe].to_string();
        shown = safe;
        if !on_token(TokenEvent {
            id,
            text: &piece,
            candidates: &candidates,
            avoided: None,
        }) {
            stop_reason = StopReason::Cancelled;
            break;
        }
        if ids.len() >= opts.max_new_tokens {
            break;
        }
        if cache.len() >= cache.capacity() {
            // The context is full: stop cleanly rather than fail mid-answer.
            stop_reason = StopReason::Length;
            break;
        }
        logits = model.forward(&[id], cache, Logits::Last)?;
    }
    // What was held back (no phrase can be completed now), and an incomplete last character.
    stream.finish(tokenizer)?;
    if shown < stream.text().len() {
        on_token(TokenEvent {
            id: u32::MAX,
            text: &stream.text()[shown..],
            candidates: &[],
            avoided: None,
        });
    }
    Ok(Generation {
        text: stream.text().to_string(),
        ids,
        stop_reason,
        first_top,
        prefill_tokens: prompt.len(),
        prefill,
        first_token,
        decode: decode_start.elapsed(),
        rewinds: guard.rewinds(),
    })
}
