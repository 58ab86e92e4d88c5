//! `duet analyze`: the dual task — sentiment, then a reply that knows it — for one text or for every
//! line of stdin.

use crate::common::{lang_for, load_runner, ms, print_trace, sentiment_tag, stream, Global};
use crate::input::{for_each_line, Line};
use anyhow::{bail, Result};
use std::sync::atomic::Ordering;
use std::time::Instant;
use tasks::pipeline::RunOptions;
use tasks::{ClassifyMode, PipelineEvent, StepOutput};

#[derive(clap::Args)]
pub struct Args {
    /// The text, or `-` to read one text per line from stdin.
    pub text: Option<String>,
    /// One JSON object per input.
    #[arg(long)]
    pub json: bool,
    /// Bound the reply's length.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_new_tokens: Option<u32>,
    /// Only the sentiment label, no reply.
    #[arg(long)]
    pub no_reply: bool,
    /// Classify the article's way (generate ≤ 5 tokens, search for a label) instead of label scoring.
    #[arg(long)]
    pub generation_mode: bool,
    /// The pipeline to run.
    #[arg(long, default_value = "analyze", hide = true)]
    pub pipeline: String,
}

pub fn run(g: &Global, a: &Args) -> Result<()> {
    let Some(text) = a.text.as_deref() else {
        bail!("give a text, or - to read texts from stdin")
    };
    if text != "-" && text.trim().is_empty() {
        bail!("the text is empty");
    }
    let mut runner = load_runner(g)?;
    let opts = RunOptions {
        classify_mode: if a.generation_mode {
            ClassifyMode::Generation
        } else {
            ClassifyMode::Scoring
        },
        max_new_tokens: a.max_new_tokens.map(|n| n as usize),
        skip: if a.no_reply {
            vec!["reply".into()]
        } else {
            vec![]
        },
        ..Default::default()
    };
    if text != "-" {
        return analyze_one(g, a, &mut runner, text, &opts);
    }
    let failed = for_each_line(&mut |line| match line {
        Line::Text(n, t) => {
            if let Err(e) = analyze_one(g, a, &mut runner, &t, &opts) {
                report_line_error(a.json, n, &e.to_string());
                return false;
            }
            true
        }
        Line::Invalid(n, why) => {
            report_line_error(a.json, n, &why);
            false
        }
    })?;
    if failed > 0 {
        bail!("{failed} input line(s) failed (see above); all other lines were answered");
    }
    Ok(())
}

fn report_line_error(json: bool, line: usize, msg: &str) {
    eprintln!("duet: error: line {line}: {msg}");
    if json {
        println!("{}", serde_json::json!({ "line": line, "error": msg }));
    }
}

pub fn analyze_one(
    g: &Global,
    a: &Args,
    runner: &mut tasks::Runner,
    text: &str,
    opts: &RunOptions,
) -> Result<()> {
    if text.trim().is_empty() {
        bail!("the text is empty");
    }
    let lang = lang_for(g, text);
    let start = Instant::now();
    let mut sentiment_ms = 0.0;
    let mut first_token_ms = None;
    let mut out = std::io::stdout();
    crate::interrupt::reset();
    let result = runner.run(&a.pipeline, text, lang, opts, &mut |ev| {
        match ev {
            PipelineEvent::Trace(t) if g.trace => print_trace(&t),
            PipelineEvent::StepDone {
                output: StepOutput::Label(c),
                ..
            } => {
                sentiment_ms = ms(start.elapsed());
                if !a.json {
                    let arrow = if a.no_reply { "" } else { " → " };
                    let label = format!("{}{arrow}", sentiment_tag(c, lang));
                    stream(&mut out, label.as_bytes());
                }
            }
            PipelineEvent::Text(piece) => {
                first_token_ms.get_or_insert_with(|| ms(start.elapsed()));
                if !a.json {
                    stream(&mut out, piece.as_bytes());
                }
            }
            _ => {}
        }
        !crate::interrupt::requested()
    });
    crate::interrupt::idle();
    let result = result?;
    let total_ms = ms(start.elapsed());
    let sentiment = result.steps.iter().find_map(|(_, o)| match o {
        StepOutput::Label(c) => Some(c.clone()),
        _ => None,
    });
    let reply = result.steps.iter().find_map(|(_, o)| match o {
        StepOutput::Text(t) => Some(t.text.clone()),
        _ => None,
    });
    if a.json {
        let s = sentiment.as_ref();
        let v = serde_json::json!({
            "text": text,
            "sentiment": {
                "label": s.and_then(|c| c.label.clone()),
                "display": s.map(|c| c.display.clone()),
                "confidence": s.map(|c| c.confidence),
            },
            "reply": reply,
            "timings_ms": { "sentiment": sentiment_ms, "first_token": first_token_ms, "total": total_ms },
        });
        println!("{v}");
    } else {
        println!();
        if crate::interrupt::INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("(reply stopped)");
        }
    }
    Ok(())
}
