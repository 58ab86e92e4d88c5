//! The shipped sentiment set (crates/tasks/data/sentiment_eval.tsv, 262 sentences written for this project)
//! on the default model, in the default weight form (`native`): label scoring is at least as accurate as
//! the article's generation mode, never answers outside the labels, and stays above 90 %; and the exact
//! form labels (nearly) every sentence the same way, so the approximate default costs no accuracy. The
//! held-out set (sentiment_heldout.tsv) checks the negative label's bias against the model's own scores.

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

/// The held-out set (crates/tasks/data/sentiment_heldout.tsv, written before the negative label's bias
/// in sentiment.toml was chosen) stays above 90 %, and the bias earns its place: with it, label
/// scoring is at least as accurate as with the model's own scores (bias 0) on each of the two sets.
/// Both accuracies come from one pass: each classification reports every label's log-probability and
/// bias, and the labels are compared again without the bias.
#[test]
fn held_out_set_and_the_negative_labels_bias() {
    let mut native = runner(WeightForm::Native);
    let task = native.library.task("sentiment").unwrap().clone();
    let bias = task.label("negative").unwrap().bias;
    assert!(
        bias > 0.0,
        "the shipped task file sets a bias; this test checks it"
    );
    for file in ["sentiment_eval.tsv", "sentiment_heldout.tsv"] {
        let path = tasks::library::shipped_dir().join("../data").join(file);
        let examples = read_tsv(&std::fs::read_to_string(path).unwrap(), &task).unwrap();
        let (mut with_bias, mut without) = (0, 0);
        for ex in &examples {
            let lang = tasks::Lang::detect(&ex.text);
            let c = native
                .classify(
                    "sentiment",
                    &ex.text,
                    lang,
                    &Default::default(),
                    ClassifyMode::Scoring,
                    &mut |_| {},
                )
                .unwrap();
            let best = |biased: bool| {
                let s =
                    |l: &tasks::runner::LabelScore| l.logprob + if biased { l.bias } else { 0.0 };
                c.scores
                    .iter()
                    .max_by(|a, b| s(a).total_cmp(&s(b)))
                    .unwrap()
                    .label
                    .clone()
            };
            assert_eq!(c.label.as_deref(), Some(best(true).as_str()));
            with_bias += usize::from(best(true) == ex.label);
            without += usize::from(best(false) == ex.label);
        }
        let n = examples.len();
        eprintln!("{file}: {with_bias}/{n} with the bias {bias}, {without}/{n} without");
        assert!(with_bias >= without, "{file}: {with_bias} < {without}");
        assert!(
            with_bias as f64 / n as f64 >= 0.90,
            "{file}: {with_bias}/{n}"
        );
    }
}
