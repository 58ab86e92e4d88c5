//! Shared support for the end-to-end tests and benchmarks: where the reference data is, and the real
//! default model (fetched on first use, exactly as the CLI does — a test that needs it never skips).

use serde_json::Value;
use std::path::{Path, PathBuf};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn data_dir() -> PathBuf {
    repo_root().join("tests/data")
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The default model's path, fetching it (with progress on stderr) if it is not there yet.
pub fn default_model_path() -> PathBuf {
    qwen2::fetch::resolve_model(None)
        .unwrap_or_else(|e| panic!("cannot get the default model: {e}"))
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}
