//! What every command shares: global flags, model loading with progress, one-line errors.

use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Clone)]
pub struct Global {
    /// A .gguf file or a Hugging Face model directory (default: $DUET_MODEL, else the default model,
    /// fetched on first use).
    #[arg(long, global = true, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Compute threads (default: the number of physical cores).
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Show the path of the request through the engine: prompt, tokens, cache use, candidates, timings.
    #[arg(long, global = true)]
    pub trace: bool,
}

impl Global {
    pub fn threads(&self) -> Option<usize> {
        self.threads.map(usize::from)
    }
}

/// Finds (fetching if needed) and loads the model, saying what it does on stderr.
pub fn load_model(g: &Global) -> Result<qwen2::LoadedModel> {
    let path = qwen2::fetch::resolve_model(g.model.as_deref())?;
    eprint!("loading {} … ", path.display());
    let _ = std::io::stderr().flush();
    let loaded = qwen2::load(&path).inspect_err(|_| eprintln!())?;
    eprintln!("done in {} ms", loaded.load_time.as_millis());
    Ok(loaded)
}

pub fn print_error(e: &anyhow::Error) {
    // One line: the chain of causes joined, newlines flattened.
    let msg = e
        .chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ");
    eprintln!("duet: error: {}", msg.replace('\n', " "));
}

/// Clap's own errors, reduced to one line (help and version pass through untouched).
pub fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let text = e.render().to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("duet: error: {first} (see duet --help)");
            ExitCode::from(2)
        }
    }
}

/// A bug should still end as one line, not a backtrace.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "duet: internal error (a bug, please report it): {}{place}",
            msg.replace('\n', " ")
        );
    }));
}

pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}
