//! `duet`: the command-line face of the engine. Parsing and presentation only — every decision about
//! models, prompts and tasks lives in the `qwen2` and `tasks` crates.

mod common;
mod generate;
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
    /// Generate text from a prompt or a chat message, streamed as it is produced.
    Generate(generate::Args),
    /// Print the token ids of a text.
    Tokenize(tokenize::Args),
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
    qwen2::kernels::pool::init(cli.global.threads());
    let result = match &cli.command {
        Command::Generate(a) => generate::run(&cli.global, a),
        Command::Tokenize(a) => tokenize::run(&cli.global, a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            common::print_error(&e);
            ExitCode::from(1)
        }
    }
}
