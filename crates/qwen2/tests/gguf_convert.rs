//! GGUF → Hugging Face directory: the written safetensors loads back through Duet's own safetensors reader with
//! the dequantized values, names and shapes; the JSON files describe the same model and tokenizer; the
//! exact form of the GGUF gives the logits of its conversion.

mod gguf_common;

use gguf_common::*;
use qwen2::convert::{convert_gguf, ConvertDType};
use qwen2::weights::{gguf, safetensors, to_f32_vec, DType};
use qwen2::ModelConfig;

fn convert(dtype: ConvertDType) -> (tempfile::TempDir, std::path::PathBuf, gguf::GgufModel) {
    let dir = tempfile::tempdir().unwrap();
    let src = tiny_qwen2(&TinyOptions {
        untied: true,
        quantized: true,
    })
    .write(dir.path(), "tiny.gguf");
    let out = dir.path().join("hf");
    let mut calls = Vec::new();
    convert_gguf(&src, &out, dtype, &mut |done, total| {
        calls.push((done, total))
    })
    .unwrap();
    let model = gguf::load(&src).unwrap();
    let n = model.store.tensors.len();
    assert_eq!(calls.first(), Some(&(0, n)));
    assert_eq!(calls.last(), Some(&(n, n)));
    (dir, out, model)
}

#[test]
fn f32_conversion_round_trips_exactly() {
    let (_dir, out, model) = convert(ConvertDType::F32);
    let store = safetensors::load_dir(&out).unwrap();
    assert_eq!(store.tensors.len(), model.store.tensors.len());
    let mut quantized = 0;
    for (name, src) in &model.store.tensors {
        let t = store.get(name).unwrap();
        assert_eq!(t.dtype, DType::F32, "{name}");
        assert_eq!(t.shape, src.shape, "{name}");
        let want = to_f32_vec(name, src).unwrap();
        let got = to_f32_vec(name, t).unwrap();
        assert!(
            want.iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}"
        );
        quantized += (src.dtype != DType::F32) as usize;
    }
    assert!(
        quantized >= 10,
        "the test model should exercise Q8_0 and Q5_0"
    );

    // The JSON files describe the same model.
    let cfg = ModelConfig::from_hf_dir(&out).unwrap();
    assert_eq!(cfg, model.config);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(
        tok.encode("<|im_start|>hi", false).unwrap().get_ids(),
        [ID_IM_START, 257]
    );
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert_eq!(tc["pad_token"], "<|endoftext|>");
    assert_eq!(tc["tokenizer_class"], "Qwen2Tokenizer");
    assert_eq!(tc["chat_template"], model.chat_template.as_deref().unwrap());
    assert_eq!(
        tc["added_tokens_decoder"][ID_IM_END.to_string()]["content"],
        "<|im_end|>"
    );
    assert_eq!(
        tc["added_tokens_decoder"][ID_TOOL_CALL.to_string()]["special"],
        false
    );
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        gen["eos_token_id"],
        serde_json::json!([ID_IM_END, ID_ENDOFTEXT])
    );

    // Only the five files, no temporaries left behind.
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    // The header length is a multiple of 8 and the tensors tile the rest exactly (the safetensors crate
    // checked the tiling when loading).
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert!(header_len.is_multiple_of(8));
}

#[test]
fn bf16_conversion_rounds_to_nearest_even() {
    let (_dir, out, model) = convert(ConvertDType::BF16);
    let store = safetensors::load_dir(&out).unwrap();
    for (name, src) in &model.store.tensors {
        let t = store.get(name).unwrap();
        assert_eq!(t.dtype, DType::BF16, "{name}");
        assert_eq!(t.shape, src.shape, "{name}");
        let want: Vec<u16> = to_f32_vec(name, src)
            .unwrap()
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let got: Vec<u16> = t
            .bytes
            .as_slice()
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(want, got, "{name}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}

#[test]
fn refuses_to_overwrite_a_model() {
    let (dir, out, _) = convert(ConvertDType::F32);
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let e = convert_gguf(
        &dir.path().join("tiny.gguf"),
        &out,
        ConvertDType::BF16,
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn a_bad_source_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = tiny_qwen2(&TinyOptions {
        untied: false,
        quantized: false,
    })
    .bytes();
    bytes.truncate(bytes.len() - 1);
    let src = write_bytes(dir.path(), "bad.gguf", &bytes);
    let out = dir.path().join("hf");
    assert!(convert_gguf(&src, &out, ConvertDType::F32, &mut |_, _| {}).is_err());
    assert!(!out.join("model.safetensors").exists());
}

/// The exact form of a quantized GGUF (its Q8_0 output matrix kept as stored and widened in registers,
/// the other blocks dequantized at load) gives, bit for bit, the logits of its f32 conversion, whose
/// every matrix is plain f32: in a prefill's every position, in the last one alone, and in decode steps
/// after it; tied (the output matrix is the Q8_0 embedding table) and untied.
#[test]
fn exact_gguf_logits_are_its_f32_conversions() {
    use qwen2::matrix::WeightForm;
    use qwen2::{KvCache, Logits};
    for untied in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let src = tiny_qwen2(&TinyOptions {
            untied,
            quantized: true,
        })
        .write(dir.path(), "tiny.gguf");
        let out = dir.path().join("hf");
        convert_gguf(&src, &out, ConvertDType::F32, &mut |_, _| {}).unwrap();
        let gguf = qwen2::load::load_with(&src, WeightForm::Exact).unwrap();
        let f32s = qwen2::load::load_with(&out, WeightForm::Exact).unwrap();
        assert_eq!(
            gguf.model.output_matrix().form(),
            "q8_0 (mapped, f32 math)",
            "untied: {untied}"
        );
        assert_eq!(f32s.model.output_matrix().form(), "f32 (mapped)");
        let ids: Vec<u32> = (0..20).map(|i| (i * 37 + 5) % 256).collect();
        let run = |m: &qwen2::Model| {
            let mut logits = Vec::new();
            let mut cache = KvCache::new(&m.config, 32).unwrap();
            logits.extend(m.forward(&ids, &mut cache, Logits::All).unwrap());
            cache.truncate(0);
            logits.extend(m.forward(&ids, &mut cache, Logits::Last).unwrap());
            for &t in &ids[..5] {
                logits.extend(m.forward(&[t], &mut cache, Logits::Last).unwrap());
            }
            logits
        };
        let (a, b) = (run(&gguf.model), run(&f32s.model));
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "untied: {untied}"
        );
    }
}
