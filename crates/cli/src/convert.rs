//! `duet convert MODEL.gguf OUT_DIR`: a Hugging Face dir (config, tokenizer, safetensors) that
//! transformers loads and Duet maps directly.

use anyhow::{bail, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    pub gguf: PathBuf,
    pub out_dir: PathBuf,
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
}

pub fn run(a: &Args) -> Result<()> {
    if !qwen2::weights::is_gguf(&a.gguf) {
        bail!("{}: not a GGUF file", a.gguf.display());
    }
    let dtype = match a.dtype.as_str() {
        "bf16" => qwen2::convert::ConvertDType::BF16,
        _ => qwen2::convert::ConvertDType::F32,
    };
    qwen2::convert::convert_gguf(&a.gguf, &a.out_dir, dtype, &mut |done, total| {
        eprint!("\rconverting: {done}/{total} tensors");
        let _ = std::io::stderr().flush();
    })?;
    eprintln!();
    println!("{}", a.out_dir.display());
    Ok(())
}
