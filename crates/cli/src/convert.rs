//! `duet convert MODEL.gguf OUT_DIR`: a Hugging Face dir (config, tokenizer, safetensors) that
//! transformers loads and Duet maps directly.

use crate::common::{Counter, Global};
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF file to read.
    pub gguf: PathBuf,
    /// The directory to write into (created if missing; it must not hold a model.safetensors yet).
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
    let counter = Counter::new();
    qwen2::convert::convert_gguf(&a.gguf, &a.out_dir, dtype, &mut |done, total| {
        counter.show(
            done,
            total,
            format_args!("converting: {done}/{total} tensors"),
        )
    })?;
    counter.finish();
    println!("{}", a.out_dir.display());
    Ok(())
}
