//! Fuzz entry points for the `qwen2` crate's untrusted inputs: model files (GGUF, safetensors), config.json,
//! a tokenizer built from GGUF metadata, chat templates, and the text ⇄ ids path streaming uses.
//!
//! Each function takes arbitrary bytes (and, where the input must be a file, a scratch directory to write it
//! into). It may get errors back — those are the point — but it must never panic, abort or hang. The fuzz
//! targets in `fuzz/fuzz_targets/` call these functions, and `crates/qwen2/tests/fuzz_replay.rs` includes
//! this very file to replay the committed seed corpora in the normal test suite, so both run the same code.

use qwen2::kv_cache::KvCache;
use qwen2::matrix::WeightForm;
use qwen2::weights::{gguf, safetensors};
use qwen2::{Logits, Message, Model, ModelConfig, TextStream, Tokenizer};
use std::path::Path;
use std::sync::OnceLock;

/// The tiny fixture model's config, tokenizer and tokenizer config (with Qwen2.5's chat template).
pub const TINY_CONFIG: &str =
    include_str!("../../tests/data/tiny/qwen25-gqa-untied-f32/config.json");
pub const TINY_TOKENIZER: &str =
    include_str!("../../tests/data/tiny/qwen25-gqa-untied-f32/tokenizer.json");
pub const TINY_TOKENIZER_CONFIG: &str =
    include_str!("../../tests/data/tiny/qwen25-gqa-untied-f32/tokenizer_config.json");

/// The tiny fixture's config.json shrunk further (hidden 8, one layer, vocabulary 16), so that a
/// safetensors file of a couple of KB can satisfy it and the fuzzer reaches `Model::from_store`'s success
/// path and a forward pass. The fixture's own config needs ~800 KB of weights.
pub const SMALL_CONFIG: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "bos_token_id": 12,
  "eos_token_id": 14,
  "hidden_act": "silu",
  "hidden_size": 8,
  "intermediate_size": 16,
  "max_position_embeddings": 64,
  "model_type": "qwen2",
  "num_attention_heads": 2,
  "num_hidden_layers": 1,
  "num_key_value_heads": 1,
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "vocab_size": 16
}"#;

/// Texts the tokenizer targets encode: ASCII, CJK, special-token text, control characters, combining
/// marks (NFC), emoji, a lone NUL.
pub const SAMPLE_TEXTS: &[&str] = &[
    "Hello, world! It's 2024.",
    "你好，世界。退款什么时候到账？",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><tool_call>",
    "  \t\r\n  trailing   ",
    "e\u{301} A\u{30a} \u{212b} 🙂👍🏽 \u{0}\u{7f}\u{feff}",
    "",
];

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).expect("fixture JSON parses")
}

/// The fixture tokenizer.json, parsed once.
pub fn tiny_tokenizer_json() -> &'static serde_json::Value {
    static V: OnceLock<serde_json::Value> = OnceLock::new();
    V.get_or_init(|| json(TINY_TOKENIZER))
}

/// The fixture tokenizer.json without its normalizer and pre-tokenizer: `Tokenizer::from_json` on it skips
/// compiling Qwen2's split regex (~100 ms per input under the fuzzer's instrumentation), so the
/// chat-template target can build one tokenizer per template quickly. Rendering never uses either.
pub fn render_only_tokenizer_json() -> &'static serde_json::Value {
    static V: OnceLock<serde_json::Value> = OnceLock::new();
    V.get_or_init(|| {
        let mut v = json(TINY_TOKENIZER);
        v["normalizer"] = serde_json::Value::Null;
        v["pre_tokenizer"] = serde_json::Value::Null;
        v
    })
}

/// The fixture's chat template (Qwen2.5's).
pub fn tiny_chat_template() -> String {
    json(TINY_TOKENIZER_CONFIG)["chat_template"]
        .as_str()
        .expect("fixture has a chat template")
        .to_string()
}

/// The fixture tokenizer with its chat template, built once.
pub fn tiny_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        Tokenizer::from_json(tiny_tokenizer_json(), Some(tiny_chat_template()))
            .expect("fixture tokenizer loads")
    })
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("cannot write the fuzz input to the scratch directory");
}

/// Runs a loaded model the way a request would: a two-token prefill (first and last vocabulary ids), then
/// one decode step. Errors are fine; panics are not.
fn exercise_model(model: &Model) {
    let c = &model.config;
    let Ok(mut cache) = KvCache::new(c, 4) else {
        return;
    };
    let last = u32::try_from(c.vocab_size - 1).unwrap_or(u32::MAX);
    let _ = model.forward(&[0, last], &mut cache, Logits::All);
    let _ = model.forward(&[last], &mut cache, Logits::Last);
    // An id past the vocabulary must be refused, not read out of bounds.
    let _ = model.forward(&[last.saturating_add(1)], &mut cache, Logits::Last);
}

/// Streams `ids` through a [`TextStream`] and returns the concatenated pieces (`None` on an error).
fn stream(tok: &Tokenizer, ids: &[u32]) -> Option<String> {
    let mut st = TextStream::new();
    let mut out = String::new();
    for &id in ids {
        out.push_str(&st.push(tok, id).ok()?);
    }
    out.push_str(&st.finish(tok).ok()?);
    Some(out)
}

/// (a) A GGUF file: `gguf::load` (header, metadata, tensor infos, config, tensor store, tokenizer.json),
/// then what loading does next — the tokenizer, the model in both weight forms, and a forward pass.
pub fn gguf_load(data: &[u8], scratch: &Path) {
    let path = scratch.join("model.gguf");
    write(&path, data);
    let Ok(g) = gguf::load(&path) else {
        return;
    };
    let _ = format!("{g:?}");
    for t in &g.file.tensors {
        let _ = g.file.tensor_bytes(t);
    }
    // Building a `Tokenizer` from the JSON is the `gguf_tokenizer` target's job: it compiles Qwen2's split
    // regex, which under the fuzzer's instrumentation costs more than everything else here together.
    for form in [WeightForm::Exact, WeightForm::Native] {
        if let Ok(model) = Model::from_store_with(g.config.clone(), &g.store, form) {
            let _ = model.weight_bytes_per_token();
            exercise_model(&model);
        }
    }
}

/// (b) A safetensors file as `model.safetensors` beside a valid config.json: `safetensors::load_dir`, then
/// `Model::from_store` against the small config (reachable by small inputs) and the tiny fixture's config.
pub fn safetensors_load(data: &[u8], scratch: &Path) {
    write(&scratch.join("config.json"), SMALL_CONFIG.as_bytes());
    write(&scratch.join("model.safetensors"), data);
    let Ok(store) = safetensors::load_dir(scratch) else {
        return;
    };
    for config in [SMALL_CONFIG, TINY_CONFIG] {
        let config =
            ModelConfig::from_hf_json(&json(config), None).expect("fixture config is valid");
        for form in [WeightForm::Exact, WeightForm::Native] {
            if let Ok(model) = Model::from_store_with(config.clone(), &store, form) {
                exercise_model(&model);
            }
        }
    }
}

/// (c) config.json: `ModelConfig::from_hf_json`, and the same bytes as a generation_config.json beside the
/// fixture's config.
pub fn config_json(data: &[u8]) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Ok(cfg) = ModelConfig::from_hf_json(&v, None) {
        let _ = (cfg.q_dim(), cfg.kv_dim());
        let _ = ModelConfig::from_hf_json(&cfg.to_hf_json(), None);
    }
    let _ = ModelConfig::from_hf_json(&json(TINY_CONFIG), Some(&v));
}

/// (d) A tokenizer from GGUF metadata as the loader builds it: `gguf::read`, `gguf::bpe_spec`,
/// `Tokenizer::from_bpe`, then encode, decode, stream and render the file's chat template. The same spec
/// read back through its `tokenizer.json` form (what `convert` writes) must build or fail alike and give
/// the same ids.
pub fn gguf_tokenizer(data: &[u8], scratch: &Path) {
    let path = scratch.join("tokenizer.gguf");
    write(&path, data);
    let Ok(file) = gguf::read(&path) else {
        return;
    };
    let _ = gguf::model_config(&file);
    let Ok(spec) = gguf::bpe_spec(&file) else {
        return;
    };
    let template = file
        .get("tokenizer.chat_template")
        .and_then(|v| v.as_str())
        .map(String::from);
    let via_json = Tokenizer::from_json(&spec.to_json(), None);
    let direct = Tokenizer::from_bpe(spec, template);
    assert_eq!(direct.is_ok(), via_json.is_ok(), "from_bpe vs from_json");
    let Ok(tok) = direct else {
        return;
    };
    let via_json = via_json.expect("checked above");
    for text in SAMPLE_TEXTS {
        let ids = tok.encode(text);
        assert_eq!(
            ids.as_ref().ok(),
            via_json.encode(text).as_ref().ok(),
            "from_bpe vs from_json on {text:?}"
        );
        if let Ok(ids) = ids {
            let _ = tok.decode(&ids, false);
            let _ = tok.decode(&ids, true);
            let _ = stream(&tok, &ids);
        }
    }
    let vocab = tok.vocab_size();
    for id in [
        0,
        1,
        vocab.saturating_sub(1),
        vocab,
        vocab + 1,
        u32::MAX as usize,
    ] {
        let _ = tok.piece(id as u32);
    }
    let _ = tok.id_of("<|im_end|>");
    let _ = tok.render_chat(&[Message::system("s"), Message::user("u")], true);
}

/// (h) A Hugging Face directory's `tokenizer.json`: `Tokenizer::from_hf_dir` reads BPE files with Duet's
/// own typed reader and anything else with `tokenizers`' reader. Differential: for any bytes it must accept
/// exactly what `tokenizers` alone accepts and give the same ids for every sample text.
pub fn tokenizer_json(data: &[u8], scratch: &Path) {
    write(&scratch.join("tokenizer.json"), data);
    let ours = Tokenizer::from_hf_dir(scratch);
    // `tokenizers`' reader panics on some syntax errors (inside a decoder): it only gets valid JSON.
    let theirs = std::str::from_utf8(data)
        .ok()
        .filter(|text| serde_json::from_str::<serde_json::Value>(text).is_ok())
        .and_then(|text| text.parse::<tokenizers::Tokenizer>().ok());
    // A vocabulary giving one id to two tokens: `tokenizers` takes it (decoding that id then depends on
    // its hash map's random order), Duet refuses it (unit-tested); nothing to compare.
    let ambiguous = std::str::from_utf8(data)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
        .and_then(|v| {
            let vocab = v.get("model")?.get("vocab")?.as_object()?.clone();
            let mut ids: Vec<&serde_json::Value> = vocab.values().collect();
            ids.sort_by_key(|v| v.to_string());
            Some(ids.windows(2).any(|w| w[0] == w[1]))
        })
        .unwrap_or(false);
    if ambiguous {
        return;
    }
    assert_eq!(ours.is_ok(), theirs.is_some(), "from_hf_dir vs tokenizers");
    let (Ok(ours), Some(theirs)) = (ours, theirs) else {
        return;
    };
    for text in SAMPLE_TEXTS {
        let ids = ours.encode(text).ok();
        let want = theirs
            .encode(*text, false)
            .ok()
            .map(|e| e.get_ids().to_vec());
        assert_eq!(ids, want, "from_hf_dir vs tokenizers on {text:?}");
        if let Some(ids) = ids {
            assert_eq!(
                ours.decode(&ids, false).ok(),
                theirs.decode(&ids, false).ok(),
                "decode of {text:?}"
            );
            let _ = stream(&ours, &ids);
        }
    }
}

/// (f) The chat-template renderer: the input as a template (over a fixed conversation), and the input as
/// message content under Qwen2.5's template, whose prompt is then tokenized as the engine does.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(tok) = Tokenizer::from_json(render_only_tokenizer_json(), Some(text.to_string())) {
        let msgs = [
            Message::system("You are a helpful assistant."),
            Message::user("Hi"),
            Message::assistant("Hello!"),
            Message::user("退款什么时候到账？"),
        ];
        let _ = tok.render_chat(&msgs, true);
        let _ = tok.render_chat(&msgs[1..], false);
        let _ = tok.render_chat(&[], true);
    }
    let tok = tiny_tokenizer();
    let msgs = [
        Message::system(&text),
        Message::user(&text),
        Message::assistant(&text),
        Message::user(&text),
    ];
    if let Ok(prompt) = tok.render_chat(&msgs, true) {
        let _ = tok.encode(&prompt);
    }
    let _ = tok.render_chat(&msgs[1..], false);
    let _ = qwen2::tokenizer::render_chatml(&msgs, true);
}

/// Most ids streamed per input: `TextStream::push` decodes all ids so far, so a stream is quadratic.
const MAX_STREAM_IDS: usize = 256;

/// (g) Arbitrary text (lossily UTF-8) through `Tokenizer::encode` and `TextStream`: the streamed pieces must
/// add up to the whole decode. Then the input's bytes as raw token ids (in and past the vocabulary), as a
/// model's sampler could produce them.
pub fn text_stream(data: &[u8]) {
    let tok = tiny_tokenizer();
    let text = String::from_utf8_lossy(data);
    if let Ok(ids) = tok.encode(&text) {
        let ids = &ids[..ids.len().min(MAX_STREAM_IDS)];
        if let (Some(streamed), Ok(whole)) = (stream(tok, ids), tok.decode(ids, true)) {
            assert_eq!(
                streamed, whole,
                "streamed pieces differ from the whole decode of {ids:?}"
            );
        }
    }
    let vocab = tok.vocab_size() as u32;
    let raw: Vec<u32> = data
        .chunks(2)
        .take(MAX_STREAM_IDS)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .map(|v| v % (vocab + 8))
        .collect();
    let _ = stream(tok, &raw);
    let _ = tok.decode(&raw, false);
}
