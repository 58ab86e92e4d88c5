//! GGUF → Hugging Face directory: config.json, generation_config.json, tokenizer.json, tokenizer_config.json
//! and one model.safetensors with every tensor dequantized to F32 or BF16, under its Hugging Face name and
//! shape. transformers (and Duet's safetensors path) load the result.
//!
//! Tensors are converted and written a block of rows at a time, straight into a temporary file that is renamed
//! into place when complete, so memory stays small whatever the model size and a failed run leaves no
//! half-written `model.safetensors` behind. Every other file is written the same way.

use crate::error::{Error, Result};
use crate::weights::{gguf, quant, RawTensor};
use serde_json::{json, Map, Value};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The element type of the written tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvertDType {
    F32,
    /// Rounded to nearest, ties to even.
    BF16,
}

impl ConvertDType {
    fn safetensors_name(self) -> &'static str {
        match self {
            ConvertDType::F32 => "F32",
            ConvertDType::BF16 => "BF16",
        }
    }
    fn torch_name(self) -> &'static str {
        match self {
            ConvertDType::F32 => "float32",
            ConvertDType::BF16 => "bfloat16",
        }
    }
    fn size(self) -> usize {
        match self {
            ConvertDType::F32 => 4,
            ConvertDType::BF16 => 2,
        }
    }
}

/// Values converted per step: bounds memory use to a few MB whatever the tensor size.
const CHUNK_VALUES: usize = 1 << 20;

/// Converts the GGUF model at `src` into a Hugging Face model directory `out_dir` (created if missing).
/// Refuses to overwrite an existing `model.safetensors`. `progress(done, total)` is called with the number of
/// tensors written so far.
pub fn convert_gguf(
    src: &Path,
    out_dir: &Path,
    dtype: ConvertDType,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let model = gguf::load(src)?;
    let target = out_dir.join("model.safetensors");
    if target.exists() {
        return Err(Error::Invalid(format!(
            "{} already exists; convert into an empty directory",
            target.display()
        )));
    }
    fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;

    let mut config = model.config.to_hf_json();
    config["torch_dtype"] = json!(dtype.torch_name());
    config["dtype"] = json!(dtype.torch_name());
    // Write the f32 values by their shortest decimal (1e-6, not 9.999999974752427e-7).
    for (key, v) in [
        ("rms_norm_eps", model.config.rms_norm_eps),
        ("rope_theta", model.config.rope_theta),
    ] {
        if let Ok(short) = v.to_string().parse::<f64>() {
            config[key] = json!(short);
        }
    }
    if model.config.head_dim * model.config.num_attention_heads != model.config.hidden_size {
        config["head_dim"] = json!(model.config.head_dim);
    }
    let mut generation = json!({"eos_token_id": model.config.eos_token_ids, "bos_token_id": model.config.bos_token_id});
    if let Some(pad) = model
        .file
        .get("tokenizer.ggml.padding_token_id")
        .and_then(gguf::MetaValue::as_u64)
    {
        generation["pad_token_id"] = json!(pad);
    }
    let tokenizer_config = tokenizer_config(&model)?;

    // The big file first: if it fails, no small file claims a model is there.
    let mut names: Vec<&String> = model.store.tensors.keys().collect();
    names.sort();
    let tensors: Vec<(&str, &RawTensor)> = names
        .iter()
        .map(|n| (n.as_str(), &model.store.tensors[*n]))
        .collect();
    write_atomically(&target, |w| write_safetensors(w, &tensors, dtype, progress))?;

    write_json(&out_dir.join("config.json"), &config)?;
    write_json(&out_dir.join("generation_config.json"), &generation)?;
    let tokenizer_json = model.tokenizer.to_json();
    write_json(&out_dir.join("tokenizer.json"), &tokenizer_json)?;
    write_json(&out_dir.join("tokenizer_config.json"), &tokenizer_config)?;
    Ok(())
}

/// tokenizer_config.json as Qwen2 ships it: the special tokens, the added tokens by id, the chat template.
fn tokenizer_config(model: &gguf::GgufModel) -> Result<Value> {
    let tokens = model
        .file
        .string_array("tokenizer.ggml.tokens")?
        .unwrap_or_default();
    let token = |key: &str, fallback: &str| -> Value {
        model
            .file
            .get(key)
            .and_then(gguf::MetaValue::as_u64)
            .and_then(|id| tokens.get(usize::try_from(id).ok()?))
            .map_or_else(|| json!(fallback), |s| json!(s))
    };
    let mut decoder = Map::new();
    let mut additional = Vec::new();
    for t in &model.tokenizer.added {
        if t.special {
            additional.push(json!(t.content));
        }
        decoder.insert(t.id.to_string(), t.to_json());
    }
    let mut cfg = json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": false,
        "add_bos_token": false,
        "bos_token": null,
        "eos_token": token("tokenizer.ggml.eos_token_id", "<|im_end|>"),
        "pad_token": token("tokenizer.ggml.padding_token_id", "<|endoftext|>"),
        "unk_token": null,
        "errors": "replace",
        "clean_up_tokenization_spaces": false,
        "split_special_tokens": false,
        "model_max_length": model.config.max_position_embeddings,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
    });
    if let Some(t) = &model.chat_template {
        cfg["chat_template"] = json!(t);
    }
    Ok(cfg)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    write_atomically(path, |w| {
        serde_json::to_writer_pretty(&mut *w, value).map_err(std::io::Error::other)?;
        w.write_all(b"\n")?;
        Ok(())
    })
}

/// Writes `path` through a temporary file beside it, synced and renamed into place only on success, and
/// dropped from the page cache so that a model read back is mapped in huge pages.
fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        crate::weights::drop_cached_pages(w.get_ref());
        drop(w);
        fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// A safetensors file: u64 header length, JSON header (padded with spaces to a multiple of 8), then each
/// tensor's data in name order, contiguous.
fn write_safetensors(
    w: &mut impl Write,
    tensors: &[(&str, &RawTensor)],
    dtype: ConvertDType,
    progress: &mut dyn FnMut(usize, usize),
) -> std::io::Result<()> {
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut header = Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        let bytes = t
            .elements()
            .checked_mul(dtype.size())
            .ok_or_else(|| invalid(format!("tensor {name} is too large")))?;
        let end = offset
            .checked_add(bytes)
            .ok_or_else(|| invalid("model too large".into()))?;
        header.insert(
            name.to_string(),
            json!({"dtype": dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut header = serde_json::to_vec(&Value::Object(header)).map_err(std::io::Error::other)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(&header)?;

    let total = tensors.len();
    progress(0, total);
    let mut values = Vec::new();
    let mut out = Vec::new();
    for (done, (name, t)) in tensors.iter().enumerate() {
        write_tensor(w, name, t, dtype, &mut values, &mut out)
            .map_err(|e| invalid(e.to_string()))?;
        progress(done + 1, total);
    }
    Ok(())
}

/// Converts one tensor a block of whole rows at a time.
fn write_tensor(
    w: &mut impl Write,
    name: &str,
    t: &RawTensor,
    dtype: ConvertDType,
    values: &mut Vec<f32>,
    out: &mut Vec<u8>,
) -> Result<()> {
    let n = t.elements();
    let bytes = t.bytes.as_slice();
    if t.dtype.bytes_for(n) != Some(bytes.len()) {
        return Err(Error::tensor(
            name,
            format!(
                "{} bytes do not hold {n} {} values",
                bytes.len(),
                t.dtype.name()
            ),
        ));
    }
    let row = t.shape.last().copied().unwrap_or(1).max(1);
    let row_bytes = t.dtype.bytes_for(row).ok_or_else(|| {
        Error::tensor(
            name,
            format!(
                "row length {row} is not a whole number of {} blocks",
                t.dtype.name()
            ),
        )
    })?;
    let rows_per_chunk = (CHUNK_VALUES / row).max(1);
    let rows = n / row;
    let mut r = 0;
    while r < rows {
        let take = rows_per_chunk.min(rows - r);
        values.clear();
        values.resize(take * row, 0.0);
        quant::dequantize_into(
            t.dtype,
            &bytes[r * row_bytes..(r + take) * row_bytes],
            values,
        )
        .map_err(|m| Error::tensor(name, m))?;
        out.clear();
        match dtype {
            ConvertDType::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            ConvertDType::BF16 => values.iter().for_each(|v| {
                out.extend_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes())
            }),
        }
        w.write_all(out)
            .map_err(|e| Error::tensor(name, e.to_string()))?;
        r += take;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even gives 1.0.
        assert_eq!(half::bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1.0078125 (odd) and 1.015625 (even).
        assert_eq!(half::bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.015625);
    }
}
