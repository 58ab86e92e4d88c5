//! Evaluation over a labeled TSV file (`label<TAB>text` per line): accuracy, per-label confusion and
//! latency, for label scoring and generation mode side by side.

use crate::error::{Error, Result};
use crate::lang::Lang;
use crate::runner::{ClassifyMode, Runner};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct Example {
    pub line: usize,
    pub label: String,
    pub text: String,
}

/// Reads the file; labels may be ids or display names in either language.
pub fn read_tsv(content: &str, task: &crate::library::Task) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in content.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (label, text) = line
            .split_once('\t')
            .ok_or_else(|| Error::Invalid(format!("line {}: expected `label<TAB>text`", i + 1)))?;
        let l = task
            .labels
            .iter()
            .find(|l| {
                [&l.id, &l.zh, &l.en]
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(label.trim()))
            })
            .ok_or_else(|| Error::Invalid(format!("line {}: unknown label {label:?}", i + 1)))?;
        out.push(Example {
            line: i + 1,
            label: l.id.clone(),
            text: text.trim().to_string(),
        });
    }
    if out.is_empty() {
        return Err(Error::Invalid("no examples in the file".into()));
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeReport {
    pub mode: String,
    pub accuracy: f64,
    pub correct: usize,
    pub total: usize,
    /// Predictions that were no label at all (generation mode only).
    pub unparsed: usize,
    /// `confusion[gold][predicted]` = count
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
    pub mean_ms: f64,
    pub p95_ms: f64,
    /// The predicted label of each example, in order (`(none)` when generation found none).
    pub predictions: Vec<String>,
}

pub fn evaluate(
    runner: &mut Runner,
    task: &str,
    examples: &[Example],
    mode: ClassifyMode,
    lang: Option<Lang>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ModeReport> {
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut times = Vec::new();
    let (mut correct, mut unparsed) = (0, 0);
    let mut predictions = Vec::with_capacity(examples.len());
    for (i, ex) in examples.iter().enumerate() {
        let lang = lang.unwrap_or_else(|| Lang::detect(&ex.text));
        let c = runner.classify(task, &ex.text, lang, &BTreeMap::new(), mode, &mut |_| {})?;
        times.push(c.elapsed.as_secs_f64() * 1e3);
        let pred = c.label.clone().unwrap_or_else(|| "(none)".into());
        if c.label.is_none() {
            unparsed += 1;
        }
        if pred == ex.label {
            correct += 1;
        }
        *confusion
            .entry(ex.label.clone())
            .or_default()
            .entry(pred.clone())
            .or_default() += 1;
        predictions.push(pred);
        progress(i + 1, examples.len());
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let p95 = sorted[((sorted.len() as f64 * 0.95).ceil() as usize).clamp(1, sorted.len()) - 1];
    Ok(ModeReport {
        mode: match mode {
            ClassifyMode::Scoring => "scoring".into(),
            ClassifyMode::Generation => "generation".into(),
        },
        accuracy: correct as f64 / examples.len() as f64,
        correct,
        total: examples.len(),
        unparsed,
        confusion,
        mean_ms: mean,
        p95_ms: p95,
        predictions,
    })
}
