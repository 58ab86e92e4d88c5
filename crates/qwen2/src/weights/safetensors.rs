//! Hugging Face checkpoints: `model.safetensors`, or shards listed in `model.safetensors.index.json`.
//! The `safetensors` crate validates each header (offsets tile the data exactly, sizes checked for overflow);
//! we only record where each tensor's bytes are inside the memory map.

use super::{Bytes, DType, MappedFile, RawTensor, TensorStore};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The safetensors files of a model directory, in a stable order.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = crate::config::read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Json {
                path: index.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let mut paths = Vec::new();
        for f in files {
            // A shard name is a plain file name beside the index; anything else is refused.
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(Error::Json {
                    path: index.clone(),
                    message: format!("bad shard file name {f:?}"),
                });
            }
            paths.push(dir.join(f));
        }
        return Ok(paths);
    }
    Err(Error::Invalid(format!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )))
}

/// Maps every shard and collects its tensors.
pub fn load_dir(dir: &Path) -> Result<TensorStore> {
    let mut store = TensorStore::default();
    for path in shard_paths(dir)? {
        load_file(&path, &mut store)?;
    }
    Ok(store)
}

pub fn load_file(path: &Path, store: &mut TensorStore) -> Result<()> {
    let file = MappedFile::open(path)?;
    let bad = |message: String| Error::Safetensors {
        path: path.to_path_buf(),
        message,
    };
    let base = file.bytes().as_ptr() as usize;
    let st = safetensors::SafeTensors::deserialize(file.bytes()).map_err(|e| bad(e.to_string()))?;
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            other => {
                return Err(Error::tensor(
                    &name,
                    format!("unsupported dtype {other:?} (F32, BF16 and F16 are supported)"),
                ))
            }
        };
        let data = view.data();
        let offset = data.as_ptr() as usize - base;
        let bytes = Bytes::new(file.clone(), offset, data.len())
            .ok_or_else(|| bad(format!("tensor {name} out of range")))?;
        if store
            .tensors
            .insert(
                name.clone(),
                RawTensor {
                    dtype,
                    shape: view.shape().to_vec(),
                    bytes,
                },
            )
            .is_some()
        {
            return Err(bad(format!("tensor {name} appears in more than one shard")));
        }
    }
    Ok(())
}
