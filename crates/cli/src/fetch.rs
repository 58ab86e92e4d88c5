//! `duet fetch`: download and verify the default model; the last stdout line is its path.

use anyhow::Result;

pub fn run() -> Result<()> {
    let path = qwen2::fetch::ensure_default_model_with_stderr_progress()?;
    println!("{}", path.display());
    Ok(())
}
