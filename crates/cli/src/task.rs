//! `duet task NAME` runs any task or pipeline; `duet tasks` lists them.

use crate::common::{lang_for, load_runner, print_trace, stream, Global};
use crate::input::{for_each_line, Line};
use anyhow::{bail, Result};
use tasks::pipeline::RunOptions;
use tasks::{PipelineEvent, StepOutput};

#[derive(clap::Args)]
pub struct Args {
    /// Task or pipeline name (see `duet tasks`); with --route, leave it out.
    pub name: Option<String>,
    /// The text, or `-` for one text per line from stdin.
    pub text: Option<String>,
    /// Let the router choose the task or pipeline.
    #[arg(long)]
    pub route: bool,
    /// One JSON object per input (steps, outputs, timings) instead of streamed text.
    #[arg(long)]
    pub json: bool,
    /// Bound the length of each generated output.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_new_tokens: Option<u32>,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// The tasks and pipelines as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn list(g: &Global, a: &ListArgs) -> Result<()> {
    let user_dirs: Vec<_> = g.tasks_dir.iter().cloned().collect();
    let (lib, errors) = tasks::Library::load_with_shipped(&user_dirs)?;
    for e in errors {
        eprintln!("duet: warning: {e}");
    }
    if a.json {
        let tasks: Vec<_> = lib
            .tasks
            .values()
            .map(|t| serde_json::json!({"name": t.name, "kind": "task", "description": t.description, "output": t.kind.as_str(),
                "labels": t.labels.iter().map(|l| &l.id).collect::<Vec<_>>()}))
            .chain(lib.pipelines.values().map(|p| {
                serde_json::json!({"name": p.name, "kind": "pipeline", "description": p.description, "output": "steps", "steps": p.steps})
            }))
            .collect();
        println!("{}", serde_json::Value::Array(tasks));
        return Ok(());
    }
    println!("Tasks:");
    for t in lib.tasks.values() {
        let labels = if t.labels.is_empty() {
            String::new()
        } else {
            format!(
                " [{}]",
                t.labels
                    .iter()
                    .map(|l| l.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        println!(
            "  {:<16} {:<7} {}{labels}",
            t.name,
            t.kind.as_str(),
            t.description
        );
    }
    println!("Pipelines:");
    for p in lib.pipelines.values() {
        println!(
            "  {:<16} {:<7} {} ({})",
            p.name,
            "steps",
            p.description,
            p.steps.join(" → ")
        );
    }
    Ok(())
}

pub fn run(g: &Global, a: &Args) -> Result<()> {
    // With --route the single positional argument is the text.
    let (name, text) = match (a.route, a.name.as_deref(), a.text.as_deref()) {
        (true, Some(t), None) => (None, t),
        (true, _, Some(t)) => (a.name.as_deref(), t),
        (false, Some(n), Some(t)) => (Some(n), t),
        (false, Some(_), None) => {
            bail!("give a text after the task name, or - to read texts from stdin")
        }
        _ => bail!("give a task name and a text (see duet tasks), or --route TEXT"),
    };
    let mut runner = load_runner(g)?;
    if let Some(n) = name {
        if !runner.library.tasks.contains_key(n) && !runner.library.pipelines.contains_key(n) {
            bail!("unknown task or pipeline {n:?} (see duet tasks)");
        }
    }
    if text != "-" {
        return one(g, a, &mut runner, name, text);
    }
    let failed = for_each_line(&mut |line| match line {
        Line::Text(n, t) => match one(g, a, &mut runner, name, &t) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("duet: error: line {n}: {e}");
                if a.json {
                    println!("{}", serde_json::json!({"line": n, "error": e.to_string()}));
                }
                false
            }
        },
        Line::Invalid(n, why) => {
            eprintln!("duet: error: line {n}: {why}");
            if a.json {
                println!("{}", serde_json::json!({"line": n, "error": why}));
            }
            false
        }
    })?;
    if failed > 0 {
        bail!("{failed} input line(s) failed (see above); all other lines were answered");
    }
    Ok(())
}

fn one(
    g: &Global,
    a: &Args,
    runner: &mut tasks::Runner,
    name: Option<&str>,
    text: &str,
) -> Result<()> {
    if text.trim().is_empty() {
        bail!("the text is empty");
    }
    let lang = lang_for(g, text);
    let target = match name {
        Some(n) => n.to_string(),
        None => {
            let r = runner.route(text, lang)?;
            eprintln!("(router: {} — {})", r.target, r.reason);
            r.target
        }
    };
    let opts = RunOptions {
        max_new_tokens: a.max_new_tokens.map(|n| n as usize),
        ..Default::default()
    };
    let mut out = std::io::stdout();
    crate::interrupt::reset();
    let res = runner.run(&target, text, lang, &opts, &mut |ev| {
        match ev {
            PipelineEvent::Trace(t) if g.trace => print_trace(&t),
            PipelineEvent::StepStart { task, .. } if !a.json => {
                stream(&mut out, format!("[{task}] ").as_bytes());
            }
            PipelineEvent::Text(p) if !a.json => stream(&mut out, p.as_bytes()),
            PipelineEvent::StepDone { output, .. } if !a.json => {
                let label = match output {
                    StepOutput::Label(c) => {
                        format!("{} {} ({:.2})", c.emoji, c.display, c.confidence)
                    }
                    _ => String::new(),
                };
                stream(&mut out, format!("{label}\n").as_bytes());
            }
            _ => {}
        }
        !crate::interrupt::requested()
    });
    crate::interrupt::idle();
    let res = res?;
    if a.json {
        let steps: Vec<_> = res
            .steps
            .iter()
            .map(|(task, o)| match o {
                StepOutput::Label(c) => {
                    serde_json::json!({"task": task, "label": c.label, "display": c.display,
                    "confidence": c.confidence, "scores": c.scores})
                }
                StepOutput::Text(t) => serde_json::json!({"task": task, "text": t.text}),
                StepOutput::List(items, t) => {
                    serde_json::json!({"task": task, "items": items, "text": t.text})
                }
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"text": text, "target": target, "steps": steps})
        );
    }
    Ok(())
}
