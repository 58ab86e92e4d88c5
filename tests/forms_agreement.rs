//! The approximate weight forms against transformers' exact greedy paths (tests/data/golden): at every
//! step of each golden continuation, fed transformers' own tokens, does the form pick the same next token?
//! Steps where transformers' top-2 margin is below 0.1 are counted apart: there any rounding may flip
//! the choice. The sentiment labels of the forms are compared on the shipped set in `eval_real.rs`; the
//! default form also answers the two long prompts of `long_context.json`.

use duet_e2e::{data_dir, default_model_path, ids, read_json};
use qwen2::matrix::WeightForm;
use qwen2::sampler::argmax;
use qwen2::{KvCache, Logits};

/// (agreeing steps, steps) over clear steps, and the same over near-tie steps.
fn top1_agreement(form: WeightForm) -> ((usize, usize), (usize, usize)) {
    let m = qwen2::load::load_with(&default_model_path(), form).unwrap();
    let golden = read_json(&data_dir().join("golden/chat_cases.json"));
    let (mut clear, mut ties) = ((0, 0), (0, 0));
    for case in golden["cases"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        let margins: Vec<f64> = case["margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(margins.len(), want.len());
        // The prompt, then transformers' tokens: the logits before each of them.
        let mut seq = prompt.clone();
        seq.extend_from_slice(&want[..want.len() - 1]);
        let mut cache = KvCache::new(&m.model.config, seq.len()).unwrap();
        let hidden_rows = m.model.forward(&seq, &mut cache, Logits::All).unwrap();
        let vocab = m.model.config.vocab_size;
        for (step, (&w, &margin)) in want.iter().zip(&margins).enumerate() {
            let pos = prompt.len() - 1 + step;
            let got = argmax(&hidden_rows[pos * vocab..(pos + 1) * vocab]);
            let bucket = if margin >= 0.1 { &mut clear } else { &mut ties };
            bucket.1 += 1;
            if got == w as usize {
                bucket.0 += 1;
            }
        }
    }
    (clear, ties)
}

fn check(form: WeightForm, min_clear: f64) {
    let ((ca, cn), (ta, tn)) = top1_agreement(form);
    let rate = ca as f64 / cn as f64;
    eprintln!(
        "{}: top-1 agreement with transformers {ca}/{cn} = {:.1} % (margin ≥ 0.1), {ta}/{tn} at near-ties",
        form.name(),
        rate * 100.0
    );
    assert!(cn >= 100, "too few golden steps: {cn}");
    assert!(rate >= min_clear, "{}: {rate}", form.name());
}

#[test]
fn native_form_top1_agreement() {
    check(WeightForm::Native, 0.95);
}

#[test]
fn q8_0_form_top1_agreement() {
    check(WeightForm::Q8_0, 0.95);
}

#[test]
fn exact_form_top1_agreement_is_total() {
    // The same measure on the exact path: every clear step agrees (the golden tests check far more).
    check(WeightForm::Exact, 1.0);
}

#[test]
fn native_form_answers_the_long_prompts_as_transformers_does() {
    // The default form on prompts of 2000-3000 tokens (tests/data/golden/long_context.json): its next
    // token after the prompt and after each of transformers' greedy tokens. transformers' top-2 margin
    // is above 0.85 at every step there, so every step must agree.
    let m = qwen2::load::load_with(&default_model_path(), WeightForm::Native).unwrap();
    let golden = read_json(&data_dir().join("golden/long_context.json"));
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        assert!(case["min_margin"].as_f64().unwrap() >= 0.5, "{name}");
        let mut cache = KvCache::new(&m.model.config, prompt.len() + want.len()).unwrap();
        let mut logits = m.model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let mut got = Vec::new();
        for (step, &w) in want.iter().enumerate() {
            got.push(argmax(&logits) as u32);
            if step + 1 < want.len() {
                logits = m.model.forward(&[w], &mut cache, Logits::Last).unwrap();
            }
        }
        assert_eq!(
            got, want,
            "{name}: native form's next tokens vs transformers' greedy path"
        );
    }
}
