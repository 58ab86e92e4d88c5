//! The shipped sentiment set (crates/tasks/data/sentiment_eval.tsv, 262 sentences written for this project)
//! on the default model, in the default weight form (`native`): label scoring is at least as accurate as
//! the article's generation mode, never answers outside the labels, and stays above 90 %; and the exact
//! form labels (nearly) every sentence the same way, so the approximate default costs no accuracy.

use duet_e2e::default_model_path;
use qwen2::matrix::WeightForm;
use tasks::eval::{evaluate, read_tsv, Example, ModeReport};
use tasks::{ClassifyMode, Library, Runner};

fn runner(form: WeightForm) -> Runner {
    let m = qwen2::load::load_with(&default_model_path(), form).expect("load the default model");
    let (lib, errors) = Library::load(&[tasks::library::shipped_dir()]).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    Runner::new(m.model, m.tokenizer, lib)
}

fn run(r: &mut Runner, examples: &[Example], mode: ClassifyMode) -> ModeReport {
    evaluate(r, "sentiment", examples, mode, None, &mut |_, _| {}).unwrap()
}

#[test]
fn shipped_set_label_scoring_vs_generation_mode_and_forms() {
    let mut native = runner(WeightForm::Native);
    let path = tasks::library::shipped_dir().join("../data/sentiment_eval.tsv");
    let task = native.library.task("sentiment").unwrap().clone();
    let examples = read_tsv(&std::fs::read_to_string(path).unwrap(), &task).unwrap();
    assert!(examples.len() >= 200);

    let scoring = run(&mut native, &examples, ClassifyMode::Scoring);
    let generation = run(&mut native, &examples, ClassifyMode::Generation);
    drop(native);
    let exact = run(
        &mut runner(WeightForm::Exact),
        &examples,
        ClassifyMode::Scoring,
    );
    let same = scoring
        .predictions
        .iter()
        .zip(&exact.predictions)
        .filter(|(a, b)| a == b)
        .count();
    let agreement = same as f64 / examples.len() as f64;
    eprintln!(
        "native: label scoring {:.3} ({:.0} ms mean), generation mode {:.3} ({:.0} ms mean, {} unparsed); \
         exact: label scoring {:.3} ({:.0} ms mean); native vs exact labels agree on {same}/{}",
        scoring.accuracy,
        scoring.mean_ms,
        generation.accuracy,
        generation.mean_ms,
        generation.unparsed,
        exact.accuracy,
        exact.mean_ms,
        examples.len()
    );
    assert_eq!(scoring.unparsed, 0);
    assert!(
        scoring.accuracy >= generation.accuracy,
        "{} < {}",
        scoring.accuracy,
        generation.accuracy
    );
    assert!(scoring.accuracy >= 0.90, "{}", scoring.accuracy);
    assert!(exact.accuracy >= 0.90, "{}", exact.accuracy);
    assert!(agreement >= 0.97, "native vs exact: {agreement}");
}
