//! Pipelines: steps run in order on one text, each able to use earlier steps' outputs in its prompt
//! (`{sentiment}`, `{keywords}`, `{input}` …). The dual task is the pipeline `analyze`.

use crate::error::{Error, Result};
use crate::lang::Lang;
use crate::library::{fill, OutputKind};
use crate::runner::{split_list, Classification, ClassifyMode, Runner, TextOutput};
use crate::trace::TraceEvent;
use std::collections::BTreeMap;

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
