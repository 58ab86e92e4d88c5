//! `duet`: the command-line face of the engine. Parsing and presentation only — every decision about
//! models, prompts and tasks lives in the `qwen2` and `tasks` crates.

mod analyze;
mod bench;
mod chat;
mod common;
mod convert;
mod eval;
mod fetch;
mod generate;
mod input;
mod interrupt;
mod task;
mod tokenize;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "duet",
    version,
    about = "One small Qwen2 model, many roles, on a plain CPU"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: common::Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The dual task: sentiment, then an empathetic reply (TEXT, or - for one text per stdin line).
    Analyze(analyze::Args),
    /// An interactive multi-turn chat with a sentiment tag on every turn.
    Chat(chat::Args),
    /// Run a task or pipeline by name (or let the router choose with --route).
    Task(task::Args),
    /// List the tasks and pipelines.
    Tasks(task::ListArgs),
    /// Accuracy and latency of a labels task over a labeled TSV file.
    Eval(eval::Args),
    /// Generate text from a prompt or a chat message, streamed as it is produced.
    Generate(generate::Args),
    /// Print the token ids of a text.
    Tokenize(tokenize::Args),
    /// Convert a GGUF file to a Hugging Face directory (safetensors).
    Convert(convert::Args),
    /// Download and verify the default model; prints its path.
    Fetch,
    /// Measure this machine and the engine: bandwidth, FMA peak, prefill, decode, dual-task latency.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    common::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return common::clap_error(e),
    };
    if let Err(msg) = qwen2::cpu::check_features() {
        eprintln!("duet: error: {msg}");
        return ExitCode::from(1);
    }
    if let Some(threads) = cli.global.threads() {
        // Honoured as asked, but the compute threads wait for one another by spinning: more of them than
        // cores share the cores and slow every step. (Without --threads the pool takes the cores.)
        let cores = qwen2::kernels::pool::physical_cores();
        if threads > cores {
            eprintln!(
                "duet: warning: --threads {threads} is more than this machine's {cores} physical \
                 cores; the extra threads only share them"
            );
        }
    }
    qwen2::kernels::pool::init(cli.global.threads());
    interrupt::install();
    let g = &cli.global;
    let result = match &cli.command {
        Command::Analyze(a) => analyze::run(g, a),
        Command::Chat(a) => chat::run(g, a),
        Command::Task(a) => task::run(g, a),
        Command::Tasks(a) => task::list(g, a),
        Command::Eval(a) => eval::run(g, a),
        Command::Generate(a) => generate::run(g, a),
        Command::Tokenize(a) => tokenize::run(g, a),
        Command::Convert(a) => convert::run(g, a),
        Command::Fetch => fetch::run(),
        Command::Bench(a) => bench::run(g, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            common::print_error(&e);
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// `duet CMD --help` is the manual a user reads first: a flag listed there without a line saying
    /// what it does leaves them guessing (or reading the source).
    #[test]
    fn every_flag_and_argument_says_what_it_does() {
        let cli = Cli::command();
        let mut silent = Vec::new();
        let commands = std::iter::once(&cli).chain(cli.get_subcommands());
        for cmd in commands {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    silent.push(format!("duet {} --{id}", cmd.get_name()));
                }
            }
        }
        assert!(silent.is_empty(), "without a help line: {silent:?}");
    }
}
