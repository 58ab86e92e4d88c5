//! What every test of the `duet` binary starts from.

use std::process::{Command, Stdio};

/// `duet ARGS` with `$DUET_MODEL` unset (so only `--model` chooses), `$DUET_CACHE_DIR` set (empty: no
/// prefix cache on disk, so tests neither read nor leave one) and every stream piped.
pub fn duet_command(args: &[&str], cache_dir: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_duet"));
    cmd.args(args)
        .env_remove("DUET_MODEL")
        .env_remove("DUET_BACKEND")
        .env("DUET_CACHE_DIR", cache_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}
