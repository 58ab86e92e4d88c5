//! The real default model against transformers (tests/data/golden, made by tests/reference/make_golden.py
//! from the same GGUF): tokenizer ids, chat template rendering, top-10 last-position logits within 1e-3,
//! and greedy continuations identical up to the first near-tie — on the GGUF path and on the F32
//! safetensors dir `duet convert` writes; the BF16 dir against transformers on bf16-rounded weights;
//! and two prompts of 2000-3000 tokens on the exact path.

use duet_e2e::{data_dir, default_model_path, ids, read_json};
use qwen2::{GenerateOptions, KvCache, Logits, Message};
use serde_json::Value;
use std::sync::OnceLock;

/// The end-of-sequence ids transformers generated with when the golden data were made (`<|im_end|>`,
/// `<|endoftext|>`; tests/reference/make_golden.py).
const EOS_IDS: [u32; 2] = [151645, 151643];

fn gguf_model() -> &'static qwen2::LoadedModel {
    static M: OnceLock<qwen2::LoadedModel> = OnceLock::new();
    M.get_or_init(|| qwen2::load(&default_model_path()).expect("load the default model"))
}

fn messages(case: &Value) -> Vec<Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

/// The golden top-10 logits at the last prompt position that `logits` misses by more than 1e-3.
fn top10_failures(name: &str, logits: &[f32], case: &Value) -> Vec<String> {
    let mut failures = Vec::new();
    for t in case["top10"].as_array().unwrap() {
        let (id, want) = (
            t["id"].as_u64().unwrap() as usize,
            t["logit"].as_f64().unwrap() as f32,
        );
        let d = (logits[id] - want).abs();
        if d > 1e-3 {
            failures.push(format!(
                "{name}: logit of token {id} is {} vs {want} (Δ {d})",
                logits[id]
            ));
        }
    }
    failures
}

/// Runs every chat case of a golden file against a loaded model; returns a list of failures.
fn check_chat_cases(m: &qwen2::LoadedModel, golden: &Value, label: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for case in golden["cases"].as_array().unwrap() {
        let name = format!("{label}/{}", case["name"].as_str().unwrap());
        let rendered = m.tokenizer.render_chat(&messages(case), true).unwrap();
        // (The bf16 file omits the rendered text; its prompt ids are checked below all the same.)
        if case["rendered"].as_str().is_some_and(|r| r != rendered) {
            failures.push(format!(
                "{name}: chat template renders differently:\n{rendered:?}\nvs\n{:?}",
                case["rendered"]
            ));
            continue;
        }
        let prompt = m.tokenizer.encode(&rendered).unwrap();
        if prompt != ids(&case["prompt_ids"]) {
            failures.push(format!("{name}: prompt ids differ"));
            continue;
        }
        let mut cache = KvCache::new(&m.model.config, prompt.len() + 40).unwrap();
        let logits = m.model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        failures.extend(top10_failures(&name, &logits, case));
        let want = ids(&case["greedy_ids"]);
        let mut cache = KvCache::new(&m.model.config, prompt.len() + 40).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: want.len().max(1),
            eos_ids: EOS_IDS.to_vec(),
            ..Default::default()
        };
        let g = qwen2::generate(
            &m.model,
            &m.tokenizer,
            &mut cache,
            &prompt,
            &opts,
            &mut |_| true,
        )
        .unwrap();
        // Greedy paths may legitimately split where transformers' own top-2 margin is below 0.02.
        // transformers lists the eos token it stopped on; we report it as the stop reason instead.
        let mut got = g.ids.clone();
        if g.stop_reason == qwen2::StopReason::Eos {
            got.push(
                *want
                    .last()
                    .filter(|id| EOS_IDS.contains(id))
                    .unwrap_or(&EOS_IDS[0]),
            );
        }
        let upto = case["first_near_tie_step"]
            .as_u64()
            .map_or(want.len(), |s| s as usize);
        let n = upto.min(want.len());
        if got.len() < n || got[..n] != want[..n] {
            failures.push(format!(
                "{name}: greedy ids differ before step {n}: {got:?} vs {want:?}"
            ));
        }
    }
    failures
}

#[test]
fn tokenizer_matches_transformers() {
    let m = gguf_model();
    let golden = read_json(&data_dir().join("golden/tokenizer_cases.json"));
    let cases = golden["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = m.tokenizer.encode(text).unwrap();
        if got != ids(&c["input_ids"]) {
            failures.push(format!(
                "{}: {:?} → {got:?}, transformers {:?}",
                c["name"], text, c["input_ids"]
            ));
        }
        let decoded = m.tokenizer.decode(&got, false).unwrap();
        if decoded != c["decoded"].as_str().unwrap() {
            failures.push(format!(
                "{}: decodes to {decoded:?}, transformers {:?}",
                c["name"], c["decoded"]
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gguf_path_matches_transformers() {
    let golden = read_json(&data_dir().join("golden/chat_cases.json"));
    assert!(golden["cases"].as_array().unwrap().len() >= 8);
    let failures = check_chat_cases(gguf_model(), &golden, "gguf");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Phrases to avoid on the exact path: where the text comes to contain one, generation goes back to the
/// token it began in and takes the next choice there, which must be transformers' second choice at that
/// step of the greedy path (a case where it says "It's great to hear that you're feeling lonely!"); the
/// tokens before it stay, and the streamed text is the final text (nothing shown is taken back).
#[test]
fn an_avoided_phrase_takes_transformers_second_choice() {
    let m = gguf_model();
    let golden = read_json(&data_dir().join("golden/chat_cases.json"));
    let case = golden["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "empathy_en_no_system")
        .unwrap();
    let prompt = ids(&case["prompt_ids"]);
    let greedy = ids(&case["greedy_ids"]);
    let text = |ids: &[u32]| m.tokenizer.decode(ids, true).unwrap();
    assert!(text(&greedy).starts_with("It's great to hear"));
    // The phrase, the step where it begins (first token of "It's", then of " great").
    for (phrase, step) in [("it's great", 0), ("great to hear", 2)] {
        let top = case["steps"][step]["top5"].as_array().unwrap();
        let logit = |i: usize| top[i]["logit"].as_f64().unwrap();
        assert!(
            logit(1) - logit(2) > 0.1,
            "{phrase}: no near-tie for second place"
        );
        let second = top[1]["id"].as_u64().unwrap() as u32;
        let opts = GenerateOptions {
            max_new_tokens: 12,
            eos_ids: EOS_IDS.to_vec(),
            avoid: vec![phrase.to_string()],
            ..Default::default()
        };
        let mut cache = KvCache::new(&m.model.config, prompt.len() + 40).unwrap();
        let (mut shown, mut back) = (String::new(), Vec::new());
        let g = qwen2::generate(
            &m.model,
            &m.tokenizer,
            &mut cache,
            &prompt,
            &opts,
            &mut |ev| {
                shown.push_str(ev.text);
                back.extend(ev.avoided.map(|a| (a.token, a.id)));
                true
            },
        )
        .unwrap();
        assert_eq!(back.first(), Some(&(step, greedy[step])), "{phrase}");
        assert_eq!(g.ids[..step], greedy[..step], "{phrase}");
        assert_eq!(g.ids[step], second, "{phrase}: {:?}", g.text);
        assert!(
            !g.text.to_ascii_lowercase().contains(phrase),
            "{:?}",
            g.text
        );
        assert_eq!(shown, g.text, "{phrase}");
    }
}

#[test]
fn converted_dirs_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let src = default_model_path();
    for (dtype, golden_file) in [
        (qwen2::convert::ConvertDType::F32, "golden/chat_cases.json"),
        (
            qwen2::convert::ConvertDType::BF16,
            "golden/chat_cases_bf16.json",
        ),
    ] {
        let out = dir.path().join(format!("{dtype:?}"));
        qwen2::convert::convert_gguf(&src, &out, dtype, &mut |_, _| {}).unwrap();
        let m = qwen2::load(&out).unwrap();
        assert_eq!(m.format, "safetensors");
        let golden = read_json(&data_dir().join(golden_file));
        let failures = check_chat_cases(&m, &golden, &format!("{dtype:?}"));
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}

#[test]
fn bf16_form_of_the_gguf_matches_transformers_on_bf16_weights() {
    // `--dtype bf16` rounds every dequantized weight to bf16 at load, as transformers' `.to(bfloat16)`
    // does: the same golden data as the converted BF16 dir applies.
    let m = qwen2::load::load_with(&default_model_path(), qwen2::matrix::WeightForm::Bf16).unwrap();
    assert!(m.model.output_matrix().form().starts_with("bf16"));
    let golden = read_json(&data_dir().join("golden/chat_cases_bf16.json"));
    let failures = check_chat_cases(&m, &golden, "bf16 form");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn long_prompts_match_transformers() {
    // Prompts of thousands of tokens (tests/reference/make_long_context.py): the tokenizer on a long
    // mixed text, attention over a long cache and RoPE far past the short cases' positions, against
    // transformers. Each asks for one record near the start of the log, so long-range attention also
    // decides the greedy answer. Unlike `check_chat_cases`, the greedy steps continue from the prompt's
    // cache (one prefill per case instead of two; `generate` itself is covered by the short cases).
    let m = gguf_model();
    let golden = read_json(&data_dir().join("golden/long_context.json"));
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let rendered = m.tokenizer.render_chat(&messages(case), true).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{name}");
        let prompt = m.tokenizer.encode(&rendered).unwrap();
        assert_eq!(prompt, ids(&case["prompt_ids"]), "{name}: prompt ids");
        assert!(prompt.len() >= 2000, "{name}: {} tokens", prompt.len());
        let want = ids(&case["greedy_ids"]);
        let mut cache = KvCache::new(&m.model.config, prompt.len() + want.len()).unwrap();
        let mut logits = m.model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        failures.extend(top10_failures(name, &logits, case));
        // transformers' margins are all above 0.02 here (checked below), so the paths must not split.
        assert_eq!(case["first_near_tie_step"], Value::Null, "{name}");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let next = qwen2::sampler::argmax(&logits) as u32;
            got.push(next);
            if EOS_IDS.contains(&next) {
                break;
            }
            logits = m.model.forward(&[next], &mut cache, Logits::Last).unwrap();
        }
        if got != want {
            failures.push(format!("{name}: greedy ids {got:?} vs {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
