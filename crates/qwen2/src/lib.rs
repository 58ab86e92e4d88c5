//! Duet's engine: a from-scratch CPU inference engine for the Qwen2 model family (Qwen1.5, Qwen2, Qwen2.5).
//!
//! Read in this order: `config` (the model's shape) → `weights` (bytes from safetensors or GGUF) →
//! `kernels` (the math over slices) → `model` (the forward pass) → `kv_cache` → `tokenizer` →
//! `sampler` → `generate` (the decode loop).

pub mod config;
pub mod error;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
