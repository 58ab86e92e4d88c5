//! `duet tokenize`: text → ids.

use crate::common::{load_model, Global};
use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The text to tokenize.
    pub text: String,
    /// Print `{"ids": [...]}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, a: &Args) -> Result<()> {
    let m = load_model(g)?;
    let ids = m.tokenizer.encode(&a.text)?;
    if a.json {
        println!("{}", serde_json::json!({ "ids": ids }));
    } else if g.trace {
        for id in &ids {
            println!("{id:>7}  {:?}", m.tokenizer.piece(*id));
        }
    } else {
        println!(
            "{}",
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        );
    }
    Ok(())
}
