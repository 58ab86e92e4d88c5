//! The GGUF path on the real default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M): config, tensor names and
//! shapes, dequantization, and the tokenizer built from metadata against the ids transformers gives
//! (tests/data/gguf_tokenizer_reference.json, made by tests/data/make_gguf_tokenizer_reference.py).
//!
//! The model is `$DUET_MODEL` if set, else the default model under `<workspace>/models/`, fetched first if
//! missing (`qwen2::fetch::resolve_model`). These tests never skip silently: without a model they fail.

use qwen2::weights::{gguf, to_f32_vec, DType};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::OnceLock;

fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        qwen2::fetch::resolve_model(None).unwrap_or_else(|e| {
            panic!(
                "the real-model GGUF tests need the default model; set DUET_MODEL=/path/to/the.gguf \
                 or let `duet fetch` place it under models/ ({e})"
            )
        })
    })
    .clone()
}

#[test]
fn real_model_config_and_tensors() {
    let m = gguf::load(&model_path()).unwrap();
    let c = &m.config;
    assert_eq!(
        (
            c.num_hidden_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_attention_heads,
            c.num_key_value_heads
        ),
        (24, 896, 4864, 14, 2)
    );
    assert_eq!(
        (c.head_dim, c.vocab_size, c.max_position_embeddings),
        (64, 151936, 32768)
    );
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.rms_norm_eps, 1e-6);
    assert!(
        !c.tie_word_embeddings,
        "this file stores output.weight separately"
    );
    assert_eq!(c.eos_token_ids, [151645, 151643]);
    assert_eq!(c.bos_token_id, Some(151643));
    assert!(m.chat_template.as_deref().unwrap().contains("<|im_start|>"));

    assert_eq!(m.file.tensors.len(), 291);
    assert_eq!(m.store.tensors.len(), 291);
    let s = &m.store;
    let embed = s
        .get_shaped("model.embed_tokens.weight", &[151936, 896])
        .unwrap();
    assert_eq!(embed.dtype, DType::Q5_0);
    assert_eq!(
        s.get_shaped("lm_head.weight", &[151936, 896])
            .unwrap()
            .dtype,
        DType::Q8_0
    );
    s.get_shaped("model.norm.weight", &[896]).unwrap();
    for l in 0..24 {
        let n = |x: &str| format!("model.layers.{l}.{x}");
        s.get_shaped(&n("self_attn.q_proj.weight"), &[896, 896])
            .unwrap();
        s.get_shaped(&n("self_attn.q_proj.bias"), &[896]).unwrap();
        s.get_shaped(&n("self_attn.k_proj.weight"), &[128, 896])
            .unwrap();
        s.get_shaped(&n("self_attn.v_proj.weight"), &[128, 896])
            .unwrap();
        s.get_shaped(&n("self_attn.v_proj.bias"), &[128]).unwrap();
        s.get_shaped(&n("self_attn.o_proj.weight"), &[896, 896])
            .unwrap();
        s.get_shaped(&n("mlp.gate_proj.weight"), &[4864, 896])
            .unwrap();
        s.get_shaped(&n("mlp.up_proj.weight"), &[4864, 896])
            .unwrap();
        let down = s
            .get_shaped(&n("mlp.down_proj.weight"), &[896, 4864])
            .unwrap();
        assert!(matches!(down.dtype, DType::Q4K | DType::Q6K));
        s.get_shaped(&n("input_layernorm.weight"), &[896]).unwrap();
        s.get_shaped(&n("post_attention_layernorm.weight"), &[896])
            .unwrap();
    }
    let mut types: Vec<&str> = s.tensors.values().map(|t| t.dtype.name()).collect();
    types.sort();
    types.dedup();
    assert_eq!(types, ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
}

#[test]
fn real_model_tensors_of_every_type_dequantize() {
    let m = gguf::load(&model_path()).unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.23.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
    ] {
        let t = m.store.get(name).unwrap();
        let v = to_f32_vec(name, t).unwrap();
        assert_eq!(v.len(), t.elements());
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        let mean_abs = v.iter().map(|x| x.abs() as f64).sum::<f64>() / v.len() as f64;
        assert!(
            mean_abs > 1e-4 && mean_abs < 10.0,
            "{name}: mean |w| = {mean_abs}"
        );
    }
}

#[test]
fn real_model_tokenizer_matches_transformers() {
    let m = gguf::load(&model_path()).unwrap();
    let tok = tokenizers::Tokenizer::from_str(&m.tokenizer.to_json().to_string()).unwrap();
    assert_eq!(tok.get_vocab_size(true), 151936);
    let direct = qwen2::Tokenizer::from_bpe(m.tokenizer.clone(), None).unwrap();
    assert_eq!(direct.vocab_size(), 151936);
    let cases: serde_json::Value =
        serde_json::from_str(include_str!("data/gguf_tokenizer_reference.json")).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got.get_ids(), &expected[..], "text {text:?}");
        // The builder the loader uses (no JSON) must give the same ids.
        assert_eq!(
            direct.encode(text).unwrap(),
            expected,
            "from_bpe, text {text:?}"
        );
    }
    // Decoding gives the text back (special tokens included when asked).
    let ids = tok
        .encode("<|im_start|>user\nhé 你好<|im_end|>", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(
        tok.decode(&ids, false).unwrap(),
        "<|im_start|>user\nhé 你好<|im_end|>"
    );
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhé 你好");
    assert_eq!(
        direct.decode(&ids, false).unwrap(),
        "<|im_start|>user\nhé 你好<|im_end|>"
    );
    assert_eq!(direct.decode(&ids, true).unwrap(), "user\nhé 你好");
}
