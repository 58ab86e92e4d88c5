//! Duet's engine: a from-scratch CPU inference engine for the Qwen2 model family (Qwen1.5, Qwen2, Qwen2.5).
//!
//! Read in this order: `config` (the model's shape) → `weights` (bytes from safetensors or GGUF) →
//! `matrix` and `kernels` (the math over slices) → `model` (the forward pass) → `kv_cache` →
//! `tokenizer` (text, ids, chat template) → `sampler` → `generate` (the decode loop, with
//! `phrase_guard`) → `load`.

pub mod bench;
pub mod config;
pub mod convert;
pub mod cpu;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod kernels;
pub mod kv_cache;
pub mod load;
pub mod matrix;
pub mod model;
pub mod phrase_guard;
pub mod sampler;
pub mod tokenizer;
mod tokenizer_json;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
pub use generate::{
    generate, Avoided, GenerateOptions, Generation, PrefillProgress, StopReason, TokenEvent,
};
pub use kv_cache::KvCache;
pub use load::{load, LoadedModel};
pub use model::{Logits, Model, PREFILL_CHUNK};
pub use sampler::{Sampler, SamplingParams};
pub use tokenizer::{Message, TextStream, Tokenizer};
