//! `duet eval FILE`: accuracy, confusion and latency of a labels task over a labeled TSV file, label
//! scoring and generation mode side by side.

use crate::common::{load_library, runner_with, Counter, Global};
use anyhow::{Context, Result};
use tasks::eval::{evaluate, read_tsv, ModeReport};
use tasks::ClassifyMode;

#[derive(clap::Args)]
pub struct Args {
    /// One example a line: `label<TAB>text`, or `text<TAB>label`; a header line naming a `label`
    /// column is skipped.
    pub file: std::path::PathBuf,
    /// The labels task to evaluate.
    #[arg(long, default_value = "sentiment")]
    pub task: String,
    /// Only label scoring (skip generation mode).
    #[arg(long)]
    pub scoring_only: bool,
    /// The report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &Global, a: &Args) -> Result<()> {
    let content = std::fs::read(&a.file).with_context(|| a.file.display().to_string())?;
    let content = String::from_utf8(content)
        .map_err(|_| anyhow::anyhow!("{}: not valid UTF-8", a.file.display()))?;
    // The file is checked before the model loads: a typo costs no wait.
    let library = load_library(g)?;
    let examples =
        read_tsv(&content, library.task(&a.task)?).with_context(|| a.file.display().to_string())?;
    let mut runner = runner_with(g, library)?;
    let lang = g.lang.as_deref().and_then(tasks::Lang::parse);
    let mut modes = vec![ClassifyMode::Scoring];
    if !a.scoring_only {
        modes.push(ClassifyMode::Generation);
    }
    let mut reports = Vec::new();
    for mode in modes {
        let name = if mode == ClassifyMode::Scoring {
            "label scoring"
        } else {
            "generation mode"
        };
        let counter = Counter::new();
        let r = evaluate(&mut runner, &a.task, &examples, mode, lang, &mut |i, n| {
            counter.show(i, n, format_args!("{name}: {i}/{n}"))
        })?;
        counter.finish();
        reports.push(r);
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"file": a.file.display().to_string(), "task": a.task, "modes": reports})
        );
        return Ok(());
    }
    println!("{} examples from {}", examples.len(), a.file.display());
    for r in &reports {
        print_report(r);
    }
    Ok(())
}

fn print_report(r: &ModeReport) {
    println!(
        "\n{:<11} accuracy {:.1}% ({}/{}), unparsed {}, latency mean {:.0} ms, p95 {:.0} ms",
        r.mode,
        r.accuracy * 100.0,
        r.correct,
        r.total,
        r.unparsed,
        r.mean_ms,
        r.p95_ms
    );
    println!("  confusion (rows: gold, columns: predicted):");
    for (gold, row) in &r.confusion {
        let cells: Vec<String> = row.iter().map(|(p, n)| format!("{p}={n}")).collect();
        println!("    {gold:<10} {}", cells.join("  "));
    }
}
