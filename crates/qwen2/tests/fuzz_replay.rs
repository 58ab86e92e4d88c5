//! Replays every committed fuzz seed (`fuzz/corpus/<target>/*`) through the same entry points the fuzz
//! targets call — this file includes `fuzz/src/qwen2_targets.rs` itself — so the normal test suite checks
//! that none of them panics. Errors are fine: most seeds are valid, mutated ones need not be.
//!
//! The binary seeds (GGUF, safetensors) are made by `write_seed_corpus` below, from the GGUF writer the
//! malformed-file tests use; regenerate them with
//! `cargo test -p qwen2 --test fuzz_replay -- --ignored write_seed_corpus`.

mod gguf_common;
#[path = "../../../fuzz/src/qwen2_targets.rs"]
mod targets;

use gguf_common::*;
use qwen2::{Model, ModelConfig};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The seed files of one target, sorted; a target without seeds is an error.
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

/// Runs `entry` on every seed of `target` with a fresh scratch directory; fails naming every seed that
/// panicked.
fn replay(target: &str, entry: impl Fn(&[u8], &Path)) {
    let mut panicked = Vec::new();
    for file in corpus(target) {
        let data = std::fs::read(&file).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        if catch_unwind(AssertUnwindSafe(|| entry(&data, scratch.path()))).is_err() {
            panicked.push(file.display().to_string());
        }
    }
    assert!(
        panicked.is_empty(),
        "{target}: seeds that panic: {panicked:?}"
    );
}

#[test]
fn gguf_load_seeds() {
    replay("gguf_load", targets::gguf_load);
}

#[test]
fn safetensors_load_seeds() {
    replay("safetensors_load", targets::safetensors_load);
}

#[test]
fn config_json_seeds() {
    replay("config_json", |d, _| targets::config_json(d));
}

#[test]
fn tokenizer_json_seeds() {
    replay("tokenizer_json", targets::tokenizer_json);
}

#[test]
fn gguf_tokenizer_seeds() {
    replay("gguf_tokenizer", targets::gguf_tokenizer);
}

#[test]
fn chat_template_seeds() {
    replay("chat_template", |d, _| targets::chat_template(d));
}

#[test]
fn text_stream_seeds() {
    replay("text_stream", |d, _| targets::text_stream(d));
}

/// The valid seeds do load: the replay would pass trivially if the entry points rejected everything.
#[test]
fn valid_seeds_load() {
    let dir = fuzz_dir().join("corpus");
    for name in ["tiny-f32-f16-bf16.gguf", "tiny-q8_0-q5_0.gguf"] {
        let g = qwen2::weights::gguf::load(&dir.join("gguf_load").join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        Model::from_store(g.config, &g.store).unwrap_or_else(|e| panic!("{name}: {e}"));
        qwen2::Tokenizer::from_bpe(g.tokenizer, g.chat_template).unwrap();
    }
    let scratch = tempfile::tempdir().unwrap();
    for name in ["tiny-bf16.safetensors", "tiny-f32-f16.safetensors"] {
        std::fs::copy(
            dir.join("safetensors_load").join(name),
            scratch.path().join("model.safetensors"),
        )
        .unwrap();
        let store = qwen2::weights::safetensors::load_dir(scratch.path()).unwrap();
        let config =
            ModelConfig::from_hf_json(&serde_json::from_str(targets::SMALL_CONFIG).unwrap(), None)
                .unwrap();
        Model::from_store(config, &store).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let tok = qwen2::weights::gguf::read(&dir.join("gguf_tokenizer").join("tokenizer-only.gguf"))
        .and_then(|f| qwen2::weights::gguf::bpe_spec(&f))
        .map(|spec| spec.to_json())
        .and_then(|j| qwen2::Tokenizer::from_json(&j, None))
        .unwrap();
    let text = "hi there <|im_end|>";
    assert_eq!(tok.decode(&tok.encode(text).unwrap(), false).unwrap(), text);
}

// ---- Seed generation --------------------------------------------------------------------------------

/// 11 byte tokens, one merge, three control tokens and one user-defined token: 16 tokens, matching
/// `targets::SMALL_CONFIG`'s vocabulary.
fn small_vocab() -> (Vec<String>, Vec<V>, Vec<String>) {
    let alphabet = byte_alphabet();
    let mut tokens: Vec<String> = "abcdefghij "
        .bytes()
        .map(|b| alphabet[b as usize].to_string())
        .collect();
    tokens.push("ab".into());
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>"] {
        tokens.push(s.into());
    }
    let mut types = vec![V::I32(1); 12];
    types.extend([V::I32(3), V::I32(3), V::I32(3), V::I32(4)]);
    (tokens, types, vec!["a b".into()])
}

fn tokenizer_kvs(tokens: &[String], types: Vec<V>, merges: &[String]) -> Vec<(String, V)> {
    let id = |s: &str| tokens.iter().position(|t| t == s).unwrap() as u32;
    vec![
        ("tokenizer.ggml.model".into(), V::str("gpt2")),
        ("tokenizer.ggml.pre".into(), V::str("qwen2")),
        ("tokenizer.ggml.tokens".into(), V::strs(tokens)),
        ("tokenizer.ggml.token_type".into(), V::Arr(T_I32, types)),
        ("tokenizer.ggml.merges".into(), V::strs(merges)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(id("<|im_end|>"))),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(id("<|endoftext|>"))),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            V::str("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        ),
    ]
}

/// ggml type ids the writer has no constant for.
const F16: u32 = 1;
const BF16: u32 = 30;

/// Values as `ggml_type` bytes, for the float types.
fn float_tensor(name: &str, dims: &[u64], ggml_type: u32, rng: &mut Lcg) -> Tensor {
    let n: u64 = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    let data: Vec<u8> = match ggml_type {
        F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        Q8_0 | Q5_0 => random_blocks(ggml_type, n, rng),
        t => panic!("type {t}"),
    };
    Tensor::raw(name, dims, ggml_type, data)
}

/// A complete one-layer qwen2 GGUF. `types` gives the ggml type of the matrices in the order
/// embed, output, q, k, v, o, gate, up, down (`None` for output: tied embeddings); vectors are F32.
fn small_gguf(hidden: u64, heads: u64, kv_heads: u64, ffn: u64, types: [Option<u32>; 9]) -> Gguf {
    let (tokens, ttypes, merges) = small_vocab();
    let vocab = tokens.len() as u64;
    let head_dim = hidden / heads;
    let kv = kv_heads * head_dim;
    let mut kvs: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::str("qwen2")),
        ("general.name".into(), V::str("fuzz seed")),
        ("qwen2.block_count".into(), V::U32(1)),
        ("qwen2.context_length".into(), V::U32(64)),
        ("qwen2.embedding_length".into(), V::U32(hidden as u32)),
        ("qwen2.feed_forward_length".into(), V::U32(ffn as u32)),
        ("qwen2.attention.head_count".into(), V::U32(heads as u32)),
        (
            "qwen2.attention.head_count_kv".into(),
            V::U32(kv_heads as u32),
        ),
        ("qwen2.rope.freq_base".into(), V::F32(10000.0)),
        (
            "qwen2.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-6),
        ),
    ];
    kvs.extend(tokenizer_kvs(&tokens, ttypes, &merges));
    let mut rng = Lcg(11);
    let mut t = |name: &str, dims: &[u64], ty: u32| float_tensor(name, dims, ty, &mut rng);
    let [embed, output, q, k, v, o, gate, up, down] = types;
    let mut tensors = vec![t("token_embd.weight", &[hidden, vocab], embed.unwrap())];
    if let Some(ty) = output {
        tensors.push(t("output.weight", &[hidden, vocab], ty));
    }
    tensors.push(t("output_norm.weight", &[hidden], F32));
    tensors.extend([
        t("blk.0.attn_norm.weight", &[hidden], F32),
        t("blk.0.attn_q.weight", &[hidden, hidden], q.unwrap()),
        t("blk.0.attn_q.bias", &[hidden], F32),
        t("blk.0.attn_k.weight", &[hidden, kv], k.unwrap()),
        t("blk.0.attn_k.bias", &[kv], F32),
        t("blk.0.attn_v.weight", &[hidden, kv], v.unwrap()),
        t("blk.0.attn_v.bias", &[kv], F32),
        t("blk.0.attn_output.weight", &[hidden, hidden], o.unwrap()),
        t("blk.0.ffn_norm.weight", &[hidden], F32),
        t("blk.0.ffn_gate.weight", &[hidden, ffn], gate.unwrap()),
        t("blk.0.ffn_up.weight", &[hidden, ffn], up.unwrap()),
        t("blk.0.ffn_down.weight", &[ffn, hidden], down.unwrap()),
    ]);
    Gguf::new(kvs, tensors)
}

/// A safetensors file: 8-byte header length, JSON header, data. `dtype` picks each tensor's type.
fn safetensors_bytes(tensors: &[(String, Vec<usize>, &str)], rng: &mut Lcg) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, shape, dtype) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            let x = rng.f32();
            match *dtype {
                "F32" => data.extend(x.to_le_bytes()),
                "F16" => data.extend(half::f16::from_f32(x).to_le_bytes()),
                "BF16" => data.extend(half::bf16::from_f32(x).to_le_bytes()),
                d => panic!("dtype {d}"),
            }
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    // Pad the header with spaces so the data starts 8-byte aligned, as the safetensors writer does.
    while !(8 + h.len()).is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// The tensors `targets::SMALL_CONFIG` needs (hidden 8, ffn 16, heads 2 / kv 1, vocab 16, untied), with
/// matrices in `matrix` and vectors in `vector`.
fn small_safetensors(matrix: &str, vector: &str, rng: &mut Lcg) -> Vec<u8> {
    let (h, f, kv, vocab) = (8, 16, 4, 16);
    let mut t: Vec<(String, Vec<usize>, &str)> = vec![
        ("model.embed_tokens.weight".into(), vec![vocab, h], matrix),
        ("lm_head.weight".into(), vec![vocab, h], matrix),
        ("model.norm.weight".into(), vec![h], vector),
    ];
    let p = "model.layers.0";
    for (name, shape, m) in [
        ("input_layernorm.weight", vec![h], false),
        ("post_attention_layernorm.weight", vec![h], false),
        ("self_attn.q_proj.weight", vec![h, h], true),
        ("self_attn.q_proj.bias", vec![h], false),
        ("self_attn.k_proj.weight", vec![kv, h], true),
        ("self_attn.k_proj.bias", vec![kv], false),
        ("self_attn.v_proj.weight", vec![kv, h], true),
        ("self_attn.v_proj.bias", vec![kv], false),
        ("self_attn.o_proj.weight", vec![h, h], true),
        ("mlp.gate_proj.weight", vec![f, h], true),
        ("mlp.up_proj.weight", vec![f, h], true),
        ("mlp.down_proj.weight", vec![h, f], true),
    ] {
        t.push((
            format!("{p}.{name}"),
            shape,
            if m { matrix } else { vector },
        ));
    }
    safetensors_bytes(&t, rng)
}

/// Writes the binary and generated seeds of the qwen2 targets into `fuzz/corpus/`. The text seeds
/// (configs, templates, texts, task files) are copies of fixtures, listed in `fuzz/README.md`.
#[test]
#[ignore = "writes fuzz/corpus; run by hand to regenerate the seeds"]
fn write_seed_corpus() {
    let corpus = fuzz_dir().join("corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let mixed = small_gguf(
        8,
        2,
        1,
        16,
        [
            Some(F16),
            Some(BF16),
            Some(F32),
            Some(F16),
            Some(BF16),
            Some(F32),
            Some(F16),
            Some(BF16),
            Some(F32),
        ],
    );
    put("gguf_load", "tiny-f32-f16-bf16.gguf", &mixed.bytes());
    let quant = small_gguf(
        32,
        2,
        1,
        32,
        [
            Some(Q8_0),
            None,
            Some(Q8_0),
            Some(Q5_0),
            Some(Q8_0),
            Some(Q5_0),
            Some(Q5_0),
            Some(Q5_0),
            Some(Q8_0),
        ],
    );
    put("gguf_load", "tiny-q8_0-q5_0.gguf", &quant.bytes());

    // The tokenizer of the malformed-file tests' tiny model (all 256 bytes, 2 merges, 4 special tokens),
    // as metadata only; and the small model above, whose tokenizer has 16 tokens.
    let full = tiny_qwen2(&TinyOptions {
        untied: false,
        quantized: true,
    });
    let tok_only = Gguf::new(
        full.kvs
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.") || k == "general.architecture")
            .cloned()
            .collect(),
        vec![],
    );
    put("gguf_tokenizer", "tokenizer-only.gguf", &tok_only.bytes());
    put("gguf_tokenizer", "tiny-f32-f16-bf16.gguf", &mixed.bytes());

    let mut rng = Lcg(5);
    put(
        "safetensors_load",
        "tiny-bf16.safetensors",
        &small_safetensors("BF16", "F32", &mut rng),
    );
    put(
        "safetensors_load",
        "tiny-f32-f16.safetensors",
        &small_safetensors("F16", "F32", &mut rng),
    );

    put(
        "config_json",
        "small.json",
        targets::SMALL_CONFIG.as_bytes(),
    );
    let tiny = fuzz_dir().join("../tests/data/tiny");
    for (model, file) in [
        ("qwen25-gqa-untied-f32", "config.json"),
        ("qwen25-gqa-untied-f32", "generation_config.json"),
        ("qwen15-mha-tied-bf16", "config.json"),
    ] {
        let bytes = std::fs::read(tiny.join(model).join(file)).unwrap();
        put("config_json", &format!("{model}-{file}"), &bytes);
    }

    put(
        "chat_template",
        "qwen25.jinja",
        targets::tiny_chat_template().as_bytes(),
    );
    put(
        "chat_template",
        "chatml.jinja",
        b"{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    );
    put(
        "chat_template",
        "pycompat.jinja",
        b"{%- macro say(m) -%}{{ m.role | upper }}: {{ m.content.strip().split(' ') | join('-') }}{%- endmacro -%}\n{%- for m in messages if m.role != 'tool' -%}{% if loop.first and m.role != 'system' %}{{ raise_exception('no system') }}{% endif %}{{ say(m) }}{{ '\\n' if not loop.last }}{%- endfor -%}{{ messages | length }}{{ messages[-1]['content'][:3] }}{{ eos_token }}",
    );
    for (i, text) in targets::SAMPLE_TEXTS.iter().enumerate() {
        if !text.is_empty() {
            put("text_stream", &format!("sample-{i}.txt"), text.as_bytes());
        }
    }
}
