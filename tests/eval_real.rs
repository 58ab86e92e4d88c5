//! The shipped sentiment set (crates/tasks/data/sentiment_eval.tsv, 262 sentences written for this project)
//! on the default model: label scoring is at least as accurate as the article's generation mode, never
//! answers outside the labels, and stays above 90 %.

use duet_e2e::default_model_path;
use tasks::eval::{evaluate, read_tsv};
use tasks::{ClassifyMode, Library, Runner};

#[test]
fn shipped_set_label_scoring_vs_generation_mode() {
    let m = qwen2::load(&default_model_path()).expect("load the default model");
    let (lib, errors) = Library::load(&[tasks::library::shipped_dir()]).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let mut runner = Runner::new(m.model, m.tokenizer, lib);
    let path = tasks::library::shipped_dir().join("../data/sentiment_eval.tsv");
    let task = runner.library.task("sentiment").unwrap().clone();
    let examples = read_tsv(&std::fs::read_to_string(path).unwrap(), &task).unwrap();
    assert!(examples.len() >= 200);
    let scoring = evaluate(
        &mut runner,
        "sentiment",
        &examples,
        ClassifyMode::Scoring,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    let generation = evaluate(
        &mut runner,
        "sentiment",
        &examples,
        ClassifyMode::Generation,
        None,
        &mut |_, _| {},
    )
    .unwrap();
    eprintln!(
        "label scoring {:.3} ({} ms mean), generation mode {:.3} ({} ms mean, {} unparsed)",
        scoring.accuracy,
        scoring.mean_ms as u64,
        generation.accuracy,
        generation.mean_ms as u64,
        generation.unparsed
    );
    assert_eq!(scoring.unparsed, 0);
    assert!(
        scoring.accuracy >= generation.accuracy,
        "{} < {}",
        scoring.accuracy,
        generation.accuracy
    );
    assert!(scoring.accuracy >= 0.90, "{}", scoring.accuracy);
}
