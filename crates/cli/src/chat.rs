//! `duet chat`: an interactive conversation. Each turn shows the sentiment tag, then streams the reply.
//! Commands: /reset, /system TEXT, /task NAME, /trace on|off, /quit. Works with a pipe (one turn per line).

use crate::common::{lang_for, load_runner, print_trace, sentiment_tag, stream, Global};
use crate::input::{for_each_line, Line};
use anyhow::Result;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use tasks::conversation::Conversation;
use tasks::ClassifyMode;

#[derive(clap::Args)]
pub struct Args {
    /// Bound each reply's length.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_new_tokens: Option<u32>,
}

struct State {
    conversation: Conversation,
    system: Option<String>,
    task: String,
    trace: bool,
}

pub fn run(g: &Global, a: &Args) -> Result<()> {
    let mut runner = load_runner(g)?;
    let interactive = std::io::stdin().is_terminal();
    let mut st = State {
        conversation: Conversation::new(),
        system: None,
        task: "reply".into(),
        trace: g.trace,
    };
    if interactive {
        eprintln!("duet chat — /reset, /system TEXT, /task NAME, /trace on|off, /quit. Ctrl-C stops a reply.");
        prompt();
    }
    let mut quit = false;
    for_each_line(&mut |line| {
        if quit {
            return true;
        }
        let ok = match line {
            Line::Invalid(n, why) => {
                eprintln!("duet: error: line {n}: {why}");
                false
            }
            Line::Text(_, text) => match turn(g, a, &mut runner, &mut st, text.trim()) {
                Ok(Flow::Quit) => {
                    quit = true;
                    true
                }
                Ok(Flow::Continue) => true,
                Err(e) => {
                    eprintln!("duet: error: {e}");
                    false
                }
            },
        };
        if interactive && !quit {
            prompt();
        }
        ok
    })?;
    Ok(())
}

fn prompt() {
    eprint!("> ");
    let _ = std::io::stderr().flush();
}

enum Flow {
    Continue,
    Quit,
}

fn turn(
    g: &Global,
    a: &Args,
    runner: &mut tasks::Runner,
    st: &mut State,
    text: &str,
) -> Result<Flow> {
    if text.is_empty() {
        return Ok(Flow::Continue);
    }
    // Task files may have been edited since the last turn.
    for e in runner.library.refresh() {
        eprintln!("duet: warning: {e}");
    }
    if let Some(cmd) = text.strip_prefix('/') {
        let (name, arg) = cmd
            .split_once(' ')
            .map_or((cmd, ""), |(n, a)| (n, a.trim()));
        match name {
            "quit" | "exit" => return Ok(Flow::Quit),
            "reset" => {
                st.conversation.reset();
                eprintln!("(conversation cleared)");
            }
            "system" => {
                st.system = (!arg.is_empty()).then(|| arg.to_string());
                st.conversation.reset();
                eprintln!("(system prompt {})", if arg.is_empty() { "back to the task's own" } else { "set" });
            }
            "task" => {
                if runner.library.tasks.get(arg).is_some_and(|t| t.kind != tasks::OutputKind::Labels) {
                    st.task = arg.to_string();
                    st.conversation.reset();
                    eprintln!("(task: {arg})");
                } else {
                    eprintln!("duet: error: {arg:?} is not a text task (see duet tasks)");
                }
            }
            "trace" => match arg {
                "on" | "off" => {
                    st.trace = arg == "on";
                    eprintln!("(trace {arg})");
                }
                _ => eprintln!("duet: error: /trace takes on or off, not {arg:?}"),
            },
            _ => eprintln!("duet: error: unknown command /{name} (/reset, /system TEXT, /task NAME, /trace on|off, /quit)"),
        }
        return Ok(Flow::Continue);
    }
    let lang = lang_for(g, text);
    let trace = st.trace;
    let mut on_trace = |e: tasks::TraceEvent| {
        if trace {
            print_trace(&e)
        }
    };
    let c = runner.classify(
        "sentiment",
        text,
        lang,
        &BTreeMap::new(),
        ClassifyMode::Scoring,
        &mut on_trace,
    )?;
    let mut out = std::io::stdout();
    stream(
        &mut out,
        format!("{} → ", sentiment_tag(&c, lang)).as_bytes(),
    );
    let mut vars = BTreeMap::new();
    vars.insert("sentiment".to_string(), c.display.clone());
    // Keep the conversation inside the context: drop the oldest turns first.
    let task = runner.library.task(&st.task)?.clone();
    let budget = runner
        .model
        .config
        .max_position_embeddings
        .saturating_sub(task.max_tokens + 64);
    let tok = runner.tokenizer.clone();
    let dropped = st.conversation.trim_to_fit(&tok, budget, &|h| {
        tasks::prompt::build(&tok, &task, lang, &vars, h, text)
            .map(|p| p.text)
            .unwrap_or_default()
    });
    if dropped > 0 {
        eprintln!("(dropped the {dropped} oldest turn(s) to stay within the context)");
    }
    let mut history = st.conversation.history();
    if let Some(s) = &st.system {
        history.insert(0, qwen2::Message::system(s));
    }
    crate::interrupt::reset();
    let reply = runner.generate(
        &st.task,
        text,
        lang,
        &vars,
        &history,
        a.max_new_tokens.map(|n| n as usize),
        &mut on_trace,
        &mut |piece| {
            stream(&mut out, piece.as_bytes());
            !crate::interrupt::requested()
        },
    );
    crate::interrupt::idle();
    let reply = reply?;
    stream(&mut out, b"\n");
    if reply.stop_reason == qwen2::StopReason::Cancelled {
        eprintln!("(reply stopped)");
    }
    st.conversation.push(text, &reply.text);
    Ok(Flow::Continue)
}
