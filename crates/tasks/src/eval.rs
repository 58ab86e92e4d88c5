//! Evaluation over a labeled TSV file (`label<TAB>text` or `text<TAB>label` per line): accuracy,
//! per-label confusion and latency, for label scoring and generation mode side by side.

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

/// Reads the file: one example a line, its label and its text separated by a tab, the label first (as
/// the shipped set has it) or last (as many published sets do). Labels may be ids or display names in
/// either language, in any case. Blank lines, `#` comments and a header line before the first example
/// (one column named `label`) are skipped.
pub fn read_tsv(content: &str, task: &crate::library::Task) -> Result<Vec<Example>> {
    if task.labels.is_empty() {
        return Err(Error::Invalid(format!(
            "{} has no labels to score; evaluate a labels task (such as sentiment or intent)",
            task.name
        )));
    }
    let label_named = |name: &str| {
        task.labels.iter().find(|l| {
            [&l.id, &l.zh, &l.en]
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.trim()))
        })
    };
    let mut out = Vec::new();
    let mut before_first = true;
    for (i, line) in content.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let at_top = std::mem::replace(&mut before_first, false);
        let (first, rest) = line
            .split_once('\t')
            .ok_or_else(|| Error::Invalid(format!("line {}: expected `label<TAB>text`", i + 1)))?;
        let (before_last, last) = line.rsplit_once('\t').unwrap_or((first, rest));
        let (label, text) = match (label_named(first), label_named(last)) {
            (Some(l), _) => (l, rest),
            (None, Some(l)) => (l, before_last),
            (None, None)
                if at_top
                    && [first, last]
                        .iter()
                        .any(|c| c.trim().eq_ignore_ascii_case("label")) =>
            {
                continue;
            }
            (None, None) => {
                let known: Vec<String> = task
                    .labels
                    .iter()
                    .map(|l| format!("{}/{}", l.en, l.zh))
                    .collect();
                return Err(Error::Invalid(format!(
                    "line {}: no label in the first or the last column (labels of {}: {})",
                    i + 1,
                    task.name,
                    known.join(", ")
                )));
            }
        };
        out.push(Example {
            line: i + 1,
            label: label.id.clone(),
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

#[cfg(test)]
mod tests {
    use super::read_tsv;
    use crate::library::Library;

    fn read(content: &str) -> crate::error::Result<Vec<(String, String)>> {
        let (library, errors) = Library::load_with_shipped(&[]).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let task = library.task("sentiment").unwrap();
        Ok(read_tsv(content, task)?
            .into_iter()
            .map(|e| (e.label, e.text))
            .collect())
    }

    fn pair(label: &str, text: &str) -> (String, String) {
        (label.to_string(), text.to_string())
    }

    #[test]
    fn the_label_may_come_first_or_last_and_a_header_is_skipped() {
        let got =
            read("text\tlabel\r\nGreat service!\tPositive\n# a comment\n\n负面\t太慢了\n").unwrap();
        assert_eq!(
            got,
            [
                pair("positive", "Great service!"),
                pair("negative", "太慢了")
            ]
        );
        let got = read("label\ttext\n正面\t不错\nnegative\tBroken\tand late\n").unwrap();
        assert_eq!(
            got,
            [
                pair("positive", "不错"),
                pair("negative", "Broken\tand late")
            ]
        );
    }

    #[test]
    fn a_line_without_a_label_is_an_error_that_names_it() {
        let err = read("positive\tfine\nneutral\tso-so\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("negative/负面"),
            "{err}"
        );
        // A header is only a header before the first example.
        let err = read("positive\tfine\nlabel\ttext\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
        let err = read("no tab here\n").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(read("# only a comment\n").is_err());
    }

    #[test]
    fn a_task_without_labels_cannot_be_evaluated() {
        let (library, _) = Library::load_with_shipped(&[]).unwrap();
        let err = read_tsv("positive\tfine\n", library.task("reply").unwrap()).unwrap_err();
        assert!(err.to_string().contains("no labels"), "{err}");
    }
}
