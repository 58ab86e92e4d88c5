//! `duet convert MODEL.gguf OUT_DIR`: a Hugging Face dir (config, tokenizer, safetensors) that
//! transformers loads and Duet maps directly.

use crate::common::Global;
use anyhow::{bail, Result};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    pub gguf: PathBuf,
    pub out_dir: PathBuf,
}

/// `--dtype` (a global flag) says what to write: f32 (the default) or bf16.
pub fn run(g: &Global, a: &Args) -> Result<()> {
    let dtype = match g.dtype.as_deref() {
        None | Some("f32") => qwen2::convert::ConvertDType::F32,
        Some("bf16") => qwen2::convert::ConvertDType::BF16,
        Some(other) => bail!("convert writes --dtype f32 or bf16, not {other}"),
    };
    if !qwen2::weights::is_gguf(&a.gguf) {
        bail!("{}: not a GGUF file", a.gguf.display());
    }
    // A counter rewritten in place on a terminal; into a log or a pipe, a line per tenth of the way
    // (291 updates joined by carriage returns would be one unreadable line there).
    let tty = std::io::stderr().is_terminal();
    qwen2::convert::convert_gguf(&a.gguf, &a.out_dir, dtype, &mut |done, total| {
        if tty {
            eprint!("\rconverting: {done}/{total} tensors");
            let _ = std::io::stderr().flush();
        } else if done == total || done % total.div_ceil(10).max(1) == 0 {
            eprintln!("converting: {done}/{total} tensors");
        }
    })?;
    if tty {
        eprintln!();
    }
    println!("{}", a.out_dir.display());
    Ok(())
}
