//! `Runner`: one loaded model, the prompt library and the prefix cache. It runs a task on a text, either
//! classifying (label scoring) or generating text.

use crate::error::{Error, Result};
use crate::lang::Lang;
use crate::library::{placeholders, Library, OutputKind, Task};
use crate::prefix_cache::PromptCache;
use crate::prompt;
use crate::trace::TraceEvent;
use qwen2::{GenerateOptions, KvCache, Logits, Message, Model, SamplingParams, Tokenizer};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassifyMode {
    /// Score every label's tokens after the prompt; always returns a label.
    Scoring,
    /// The article's way: greedy, at most 5 new tokens, then look for a label name in the text.
    Generation,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabelScore {
    pub label: String,
    pub display: String,
    /// log P(label tokens | prompt), up to a constant shared by all labels (the first position's
    /// normaliser, which label scoring never computes).
    pub logprob: f32,
    /// The label's bias from its task file, added to `logprob` before the labels are compared.
    pub bias: f32,
    /// `logprob + bias` normalised over the labels; the label with the largest wins.
    pub prob: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Classification {
    /// The label id (e.g. `positive`); `None` only in generation mode when no label was found.
    pub label: Option<String>,
    pub display: String,
    pub emoji: String,
    pub confidence: f32,
    pub scores: Vec<LabelScore>,
    /// What the model wrote, in generation mode.
    pub raw: Option<String>,
    #[serde(skip)]
    pub elapsed: Duration,
}

#[derive(Debug, Clone)]
pub struct TextOutput {
    pub text: String,
    pub ids: Vec<u32>,
    pub stop_reason: qwen2::StopReason,
    pub first_token: Duration,
    pub elapsed: Duration,
}

pub struct Runner {
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub library: Library,
    pub cache: PromptCache,
    /// Told how far a long prompt has got (its prefix, its request part, each in runs), if set.
    pub prefill_progress: Option<qwen2::PrefillProgress>,
}

/// Default bound on the prefix cache's memory.
pub const DEFAULT_PREFIX_CACHE_BYTES: usize = 256 << 20;

impl Runner {
    pub fn new(model: Arc<Model>, tokenizer: Arc<Tokenizer>, library: Library) -> Self {
        Runner {
            model,
            tokenizer,
            library,
            cache: PromptCache::new(DEFAULT_PREFIX_CACHE_BYTES),
            prefill_progress: None,
        }
    }

    /// `prefill_progress` as the engine's callback (which does nothing when it is unset).
    fn progress(&self) -> impl Fn(usize, usize) + Sync {
        let progress = self.prefill_progress.clone();
        move |done, total| qwen2::PrefillProgress::report(&progress, done, total)
    }

    fn context(&self) -> usize {
        self.model.config.max_position_embeddings
    }

    #[allow(clippy::too_many_arguments)]
    /// Renders and tokenizes a task's prompt, and readies a KV cache holding its cached prefix.
    /// Returns the cache and the ids still to run.
    fn prepare(
        &mut self,
        task: &Task,
        lang: Lang,
        vars: &BTreeMap<String, String>,
        history: &[Message],
        text: &str,
        extra: usize,
        trace: &mut dyn FnMut(TraceEvent),
    ) -> Result<(KvCache, Vec<u32>)> {
        if text.trim().is_empty() {
            return Err(Error::Invalid("the text is empty".into()));
        }
        let p = prompt::build(&self.tokenizer, task, lang, vars, history, text)?;
        trace(TraceEvent::Prompt {
            task: task.name.clone(),
            text: p.text.clone(),
            prefix_chars: p.prefix.chars().count(),
        });
        let ids = self.tokenizer.encode(&p.text)?;
        let prefix_ids = self.tokenizer.encode(&p.prefix)?;
        let needed = ids.len() + extra;
        if needed > self.context() {
            return Err(Error::Invalid(format!(
                "the text is too long: its prompt needs {} tokens plus {extra} for the answer, the model's context holds {}",
                ids.len(),
                self.context()
            )));
        }
        let t = Instant::now();
        // Only a prefix made of library text (system prompt, examples, label names, defaults) may be kept
        // on disk, never one holding the user's words: earlier turns, or a pipeline value taken from the
        // text (the input itself, an earlier step's output) that the system prompt puts before the text.
        // Values reach the prefix only through the system prompt's placeholders, so those decide, not a
        // search of the prefix for each value: a short message that also occurs in a worked example
        // ("great", "好") would keep its prefix off the disk, and every one-shot run would prefill it.
        // A conversation's prefix goes to disk only up to its first turn: the prefix the same prompt
        // has without history, which one-shot commands use too.
        let library_only = placeholders(task.system.get(lang)).into_iter().all(|name| {
            vars.get(name)
                .is_none_or(|v| v.is_empty() || self.library.is_library_text(v))
        });
        let persist_len = match (library_only, history.is_empty()) {
            (false, _) => 0,
            (true, true) => prefix_ids.len(),
            (true, false) => {
                let first = prompt::build(&self.tokenizer, task, lang, vars, &[], text)?;
                let first_ids = self.tokenizer.encode(&first.prefix)?;
                if prefix_ids.starts_with(&first_ids) {
                    first_ids.len()
                } else {
                    0
                }
            }
        };
        let report = self.progress();
        let prepared =
            self.cache
                .prepare(&self.model, &prefix_ids, &ids, needed, persist_len, &report)?;
        trace(TraceEvent::Timing {
            stage: "PromptCache::prepare".into(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        });
        trace(TraceEvent::Cache {
            hit: prepared.hit,
            from_disk: prepared.from_disk,
            extended_from: prepared.extended_from,
            prefix_tokens: prepared.reused,
            cache_bytes: self.cache.bytes(),
            entries: self.cache.len(),
        });
        trace(TraceEvent::Tokens {
            ids: ids.iter().map(|&i| (i, self.tokenizer.piece(i))).collect(),
            cached: prepared.reused,
        });
        let rest = ids[prepared.reused..].to_vec();
        Ok((prepared.cache, rest))
    }

    /// Classifies `text` with a labels task.
    pub fn classify(
        &mut self,
        task_name: &str,
        text: &str,
        lang: Lang,
        vars: &BTreeMap<String, String>,
        mode: ClassifyMode,
        trace: &mut dyn FnMut(TraceEvent),
    ) -> Result<Classification> {
        let start = Instant::now();
        let task = self.library.task(task_name)?.clone();
        if task.kind != OutputKind::Labels {
            return Err(Error::Invalid(format!(
                "task {task_name} does not output labels"
            )));
        }
        // Each label's answer tokens. The few-shot prompt makes the label the whole answer, so the answer
        // is scored up to the label (scoring the end-of-turn token after it too measured no more accurate
        // and cost a second forward pass per label).
        let mut label_ids = Vec::new();
        for l in &task.labels {
            let ids = self.tokenizer.encode(l.display(lang))?;
            if ids.is_empty() {
                return Err(Error::Invalid(format!(
                    "task {task_name}: label {} has no tokens",
                    l.id
                )));
            }
            label_ids.push(ids);
        }
        let longest = label_ids.iter().map(Vec::len).max().unwrap_or(0).max(5);
        let (mut cache, rest) = self.prepare(&task, lang, vars, &[], text, longest, trace)?;

        if mode == ClassifyMode::Generation {
            let opts = GenerateOptions {
                max_new_tokens: 5,
                eos_ids: self.model.config.eos_token_ids.clone(),
                ..Default::default()
            };
            let g = qwen2::generate(
                &self.model,
                &self.tokenizer,
                &mut cache,
                &rest,
                &opts,
                &mut |_| true,
            )?;
            let found = find_label(&task, &g.text);
            let label = found.map(|l| l.id.clone());
            return Ok(Classification {
                display: found
                    .map(|l| l.display(lang).to_string())
                    .unwrap_or_else(|| g.text.trim().to_string()),
                emoji: found.map(|l| l.emoji.clone()).unwrap_or_default(),
                confidence: if found.is_some() { 1.0 } else { 0.0 },
                label,
                scores: Vec::new(),
                raw: Some(g.text),
                elapsed: start.elapsed(),
            });
        }

        // The first token of every label is scored from the last hidden state, multiplying only those rows
        // of the output matrix (a few of its 151936): the log-softmax normaliser of that position is the
        // same for every label, so it cancels when the scores are normalised over the labels. Later tokens
        // of a multi-token label need their own full normaliser.
        let prompt_len = cache.len() + rest.len();
        let report = self.progress();
        let hidden =
            self.model
                .prefill_last_hidden(&rest, &mut cache, qwen2::PREFILL_CHUNK, &report)?;
        let last = &hidden[hidden.len() - self.model.config.hidden_size..];
        let first_ids: Vec<usize> = label_ids.iter().map(|ids| ids[0] as usize).collect();
        let mut first = vec![0f32; first_ids.len()];
        self.model
            .output_matrix()
            .matmul_rows(&first_ids, last, 1, &mut first);
        let vocab = self.model.config.vocab_size;
        let mut scores = Vec::new();
        for ((l, ids), &first_logit) in task.labels.iter().zip(&label_ids).zip(&first) {
            let mut lp = first_logit;
            if ids.len() > 1 {
                cache.truncate(prompt_len);
                let rows = self
                    .model
                    .forward(&ids[..ids.len() - 1], &mut cache, Logits::All)?;
                for (i, &next) in ids[1..].iter().enumerate() {
                    lp += log_softmax(&rows[i * vocab..(i + 1) * vocab])[next as usize];
                }
            }
            scores.push(LabelScore {
                label: l.id.clone(),
                display: l.display(lang).to_string(),
                logprob: lp,
                bias: l.bias,
                prob: 0.0,
            });
        }
        // A damaged model scores every label NaN, and one of them would still win, with no word of why.
        if let Some(s) = scores.iter().find(|s| !s.logprob.is_finite()) {
            return Err(
                qwen2::Error::NotFinite(format!("the score of label {}", s.display)).into(),
            );
        }
        let probs = label_probs(&scores);
        for (s, p) in scores.iter_mut().zip(probs) {
            s.prob = p;
        }
        trace(TraceEvent::Labels {
            scores: scores.clone(),
        });
        trace(TraceEvent::Timing {
            stage: "Runner::classify (request tokens + label scoring)".into(),
            ms: start.elapsed().as_secs_f64() * 1e3,
        });
        let best = scores
            .iter()
            .enumerate()
            .max_by(|a, b| (a.1.logprob + a.1.bias).total_cmp(&(b.1.logprob + b.1.bias)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let l = &task.labels[best];
        Ok(Classification {
            label: Some(l.id.clone()),
            display: l.display(lang).to_string(),
            emoji: l.emoji.clone(),
            confidence: scores[best].prob,
            scores,
            raw: None,
            elapsed: start.elapsed(),
        })
    }

    /// Runs a text or list task, streaming text pieces to `on_text` (return `false` to stop).
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &mut self,
        task_name: &str,
        text: &str,
        lang: Lang,
        vars: &BTreeMap<String, String>,
        history: &[Message],
        max_tokens: Option<usize>,
        trace: &mut dyn FnMut(TraceEvent),
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<TextOutput> {
        let start = Instant::now();
        let task = self.library.task(task_name)?.clone();
        let max_new = max_tokens.unwrap_or(task.max_tokens);
        let (mut cache, rest) = self.prepare(&task, lang, vars, history, text, max_new, trace)?;
        let prepared = start.elapsed();
        let opts = GenerateOptions {
            max_new_tokens: max_new,
            sampling: SamplingParams {
                temperature: task.temperature,
                top_p: task.top_p,
                repetition_penalty: task.repetition_penalty,
                ..Default::default()
            },
            eos_ids: self.model.config.eos_token_ids.clone(),
            top_candidates: 5,
            prefill_progress: self.prefill_progress.clone(),
            avoid: task.avoid.clone(),
            ..Default::default()
        };
        let tok = self.tokenizer.clone();
        let g = qwen2::generate(
            &self.model,
            &self.tokenizer,
            &mut cache,
            &rest,
            &opts,
            &mut |ev| {
                if ev.id != u32::MAX {
                    trace(TraceEvent::Token {
                        id: ev.id,
                        piece: tok.piece(ev.id),
                        candidates: ev
                            .candidates
                            .iter()
                            .map(|(i, l)| (tok.piece(*i), *l))
                            .collect(),
                    });
                }
                if let Some(av) = ev.avoided {
                    trace(TraceEvent::Avoided {
                        phrase: av.phrase.to_string(),
                        token: av.token + 1,
                        piece: tok.piece(av.id),
                    });
                }
                ev.text.is_empty() || on_text(ev.text)
            },
        )?;
        trace(TraceEvent::Timing {
            stage: format!("qwen2::generate prefill ({} tokens)", g.prefill_tokens),
            ms: g.prefill.as_secs_f64() * 1e3,
        });
        trace(TraceEvent::Timing {
            stage: format!("qwen2::generate decode ({} tokens)", g.ids.len()),
            ms: g.decode.as_secs_f64() * 1e3,
        });
        Ok(TextOutput {
            text: g.text.trim().to_string(),
            ids: g.ids,
            stop_reason: g.stop_reason,
            first_token: prepared + g.first_token,
            elapsed: start.elapsed(),
        })
    }
}

/// The first label whose display name (either language) or id appears in `text`.
pub fn find_label<'a>(task: &'a Task, text: &str) -> Option<&'a crate::library::Label> {
    let lower = text.to_lowercase();
    task.labels
        .iter()
        .filter_map(|l| {
            [
                l.zh.to_lowercase(),
                l.en.to_lowercase(),
                l.id.to_lowercase(),
            ]
            .iter()
            .filter_map(|name| lower.find(name.as_str()))
            .min()
            .map(|pos| (pos, l))
        })
        .min_by_key(|(pos, _)| *pos)
        .map(|(_, l)| l)
}

/// Each label's probability among the labels: the softmax of `logprob + bias`.
fn label_probs(scores: &[LabelScore]) -> Vec<f32> {
    let biased: Vec<f32> = scores.iter().map(|s| s.logprob + s.bias).collect();
    let max = biased.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = biased.iter().map(|b| (b - max).exp()).sum();
    biased.iter().map(|b| (b - max).exp() / sum).collect()
}

pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    x.iter().map(|v| v - lse).collect()
}

/// Splits a list answer into items.
pub fn split_list(text: &str) -> Vec<String> {
    text.split([',', '，', '、', '\n', ';', '；'])
        .map(|s| {
            s.trim()
                .trim_start_matches(|c: char| {
                    c.is_ascii_digit() || c == '.' || c == '-' || c == '*'
                })
                .trim()
        })
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{label_probs, LabelScore};

    fn score(logprob: f32, bias: f32) -> LabelScore {
        LabelScore {
            label: String::new(),
            display: String::new(),
            logprob,
            bias,
            prob: 0.0,
        }
    }

    /// Worked by hand: scores 2.0 and 1.5 without bias give e^0.5 / (1 + e^0.5) = 0.622459 to the first;
    /// a bias of 0.55 on the second makes it 2.05 against 2.0, e^0.05 / (1 + e^0.05) = 0.512497.
    #[test]
    fn a_bias_shifts_the_labels_probabilities() {
        let p = label_probs(&[score(2.0, 0.0), score(1.5, 0.0)]);
        assert!(
            (p[0] - 0.622459).abs() < 1e-6 && (p[1] - 0.377541).abs() < 1e-6,
            "{p:?}"
        );
        let p = label_probs(&[score(2.0, 0.0), score(1.5, 0.55)]);
        assert!(
            (p[1] - 0.512497).abs() < 1e-6 && (p[0] - 0.487503).abs() < 1e-6,
            "{p:?}"
        );
    }
}
