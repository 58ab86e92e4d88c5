//! Pipelines: steps run in order on one text, each able to use earlier steps' outputs in its prompt
//! (`{sentiment}`, `{keywords}`, `{input}` …). The dual task is the pipeline `analyze`.

use crate::error::{Error, Result};
use crate::lang::Lang;
use crate::library::{fill, OutputKind};
use crate::runner::{split_list, Classification, ClassifyMode, Runner, TextOutput};
use crate::trace::TraceEvent;
use std::collections::BTreeMap;

/// The texts the dual task is timed on, by `duet bench` and by the criterion benches, named by their
/// length in characters: one near each end of the latency target's "under 50 characters", then one of
/// about 100 (the "~100-character input"). The label's time grows with the request's new tokens
/// (each runs through every layer), so a short input alone would say little about a longer one.
pub const BENCH_INPUTS: [(&str, &str); 3] = [
    ("15 chars", "今天的实验终于成功了，太棒了！"),
    (
        "46 chars",
        "我上周在你们店买的蓝牙耳机用了不到一周左边就没有声音了，联系客服三天都没人回复，真让人失望！",
    ),
    (
        "99 chars",
        "我上周在你们店里买的洗衣机今天送到了，可是安装师傅迟到了三个小时，而且装好以后机器一直漏水，厨房地板都泡坏了。打了好几次客服电话都没人接，在线留言也没有人回复，真的很失望，希望尽快给我一个解决方案。",
    ),
];

/// How long the dual task took on one text, in milliseconds from its start.
#[derive(Debug, Clone, Copy)]
pub struct DualTaskTimes {
    /// The sentiment label decided.
    pub label_ms: f64,
    /// The reply's first text streamed (`None` without a reply).
    pub first_token_ms: Option<f64>,
    /// Everything done.
    pub total_ms: f64,
}

#[derive(Debug, Clone)]
pub enum StepOutput {
    Label(Classification),
    Text(TextOutput),
    List(Vec<String>, TextOutput),
}

impl StepOutput {
    /// The value later steps see for `{step_name}`.
    pub fn as_variable(&self) -> String {
        match self {
            StepOutput::Label(c) => c.display.clone(),
            StepOutput::Text(t) => t.text.clone(),
            StepOutput::List(items, _) => items.join(", "),
        }
    }
}

pub enum PipelineEvent<'a> {
    StepStart {
        task: &'a str,
        kind: OutputKind,
    },
    /// A piece of streamed text from the current step.
    Text(&'a str),
    StepDone {
        task: &'a str,
        output: &'a StepOutput,
    },
    Trace(TraceEvent),
}

#[derive(Debug, Clone)]
pub struct PipelineResult {
    pub name: String,
    pub steps: Vec<(String, StepOutput)>,
}

impl Runner {
    /// Runs a single task as a one-step pipeline, or a pipeline by name.
    pub fn run(
        &mut self,
        name: &str,
        text: &str,
        lang: Lang,
        opts: &RunOptions,
        on_event: &mut dyn FnMut(PipelineEvent) -> bool,
    ) -> Result<PipelineResult> {
        let (steps, bind, input_from) = if let Some(p) = self.library.pipelines.get(name) {
            (p.steps.clone(), p.bind.clone(), p.input_from.clone())
        } else if self.library.tasks.contains_key(name) {
            (vec![name.to_string()], BTreeMap::new(), BTreeMap::new())
        } else {
            return Err(Error::Unknown(name.to_string()));
        };
        // Trace events and streamed text both go to the caller while a step runs: share the callback.
        let on_event = std::cell::RefCell::new(on_event);
        let emit = |e: PipelineEvent| (on_event.borrow_mut())(e);
        let mut vars: BTreeMap<String, String> = opts.vars.clone();
        vars.insert("input".into(), text.to_string());
        let mut done = Vec::new();
        for step in &steps {
            if opts.skip.contains(step) {
                continue;
            }
            let task = self.library.task(step)?.clone();
            let mut step_vars = vars.clone();
            if let Some(b) = bind.get(step) {
                for (k, v) in b {
                    step_vars.insert(k.clone(), fill(v.get(lang), &vars));
                }
            }
            let input = match input_from.get(step) {
                Some(from) => vars.get(from).cloned().unwrap_or_else(|| text.to_string()),
                None => text.to_string(),
            };
            emit(PipelineEvent::StepStart {
                task: step,
                kind: task.kind,
            });
            let mut trace = |e: TraceEvent| {
                emit(PipelineEvent::Trace(e));
            };
            let out = match task.kind {
                OutputKind::Labels => StepOutput::Label(self.classify(
                    step,
                    &input,
                    lang,
                    &step_vars,
                    opts.classify_mode,
                    &mut trace,
                )?),
                kind => {
                    let mut on_text = |s: &str| emit(PipelineEvent::Text(s));
                    let t = self.generate(
                        step,
                        &input,
                        lang,
                        &step_vars,
                        &opts.history,
                        opts.max_new_tokens,
                        &mut trace,
                        &mut on_text,
                    )?;
                    if kind == OutputKind::List {
                        StepOutput::List(split_list(&t.text), t)
                    } else {
                        StepOutput::Text(t)
                    }
                }
            };
            vars.insert(step.clone(), out.as_variable());
            if !emit(PipelineEvent::StepDone {
                task: step,
                output: &out,
            }) {
                done.push((step.clone(), out));
                break;
            }
            done.push((step.clone(), out));
        }
        Ok(PipelineResult {
            name: name.to_string(),
            steps: done,
        })
    }

    /// Runs the dual task (the pipeline `analyze`, as `duet analyze` does) on `text` and times it: the
    /// label, then a reply of at most `reply_tokens` new tokens (`None`: the label alone). What `duet
    /// bench` and the criterion benches measure, through the same path as a user's request.
    pub fn time_dual_task(
        &mut self,
        text: &str,
        lang: Lang,
        reply_tokens: Option<usize>,
    ) -> Result<DualTaskTimes> {
        let opts = RunOptions {
            max_new_tokens: reply_tokens,
            skip: if reply_tokens.is_none() {
                vec!["reply".into()]
            } else {
                Vec::new()
            },
            ..RunOptions::default()
        };
        let start = std::time::Instant::now();
        let ms = || start.elapsed().as_secs_f64() * 1e3;
        let (mut label_ms, mut first_token_ms) = (None, None);
        self.run("analyze", text, lang, &opts, &mut |ev| {
            match ev {
                // As `duet analyze` reports its timings: the label is the pipeline's labels step.
                PipelineEvent::StepDone {
                    output: StepOutput::Label(_),
                    ..
                } => {
                    label_ms.get_or_insert(ms());
                }
                PipelineEvent::Text(_) => {
                    first_token_ms.get_or_insert(ms());
                }
                _ => {}
            }
            true
        })?;
        let total_ms = ms();
        Ok(DualTaskTimes {
            label_ms: label_ms.unwrap_or(total_ms),
            first_token_ms,
            total_ms,
        })
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub classify_mode: ClassifyMode,
    pub max_new_tokens: Option<usize>,
    /// Steps to leave out (e.g. `reply` for `--no-reply`).
    pub skip: Vec<String>,
    pub vars: BTreeMap<String, String>,
    pub history: Vec<qwen2::Message>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            classify_mode: ClassifyMode::Scoring,
            max_new_tokens: None,
            skip: Vec::new(),
            vars: BTreeMap::new(),
            history: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Each timing input's name is its length in characters (a name once said "~100" of 79), and the
    /// first two are under the latency target's 50.
    #[test]
    fn bench_inputs_are_named_by_their_length() {
        for (name, text) in super::BENCH_INPUTS {
            assert_eq!(name, format!("{} chars", text.chars().count()));
        }
        assert!(super::BENCH_INPUTS[..2]
            .iter()
            .all(|(_, t)| t.chars().count() < 50));
    }
}
