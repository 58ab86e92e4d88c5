//! One error type for the engine. Every message is meant to be shown to a user as one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("config: {0}")]
    Config(String),
    #[error("unsupported architecture {found:?}: Duet runs Qwen2ForCausalLM models (Qwen1.5, Qwen2, Qwen2.5)")]
    Architecture { found: String },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("safetensors {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("GGUF {path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("context length exceeded: {needed} tokens needed, the context holds {max}")]
    ContextOverflow { needed: usize, max: usize },
    #[error("{0}")]
    Invalid(String),
    /// What the model computed is NaN or infinite: a sane checkpoint never gives that, so its weights
    /// are damaged (a NaN in any weight reaches every later value).
    #[error("{0} is not a finite number (NaN or infinity): the model's weights may be damaged")]
    NotFinite(String),
    #[error("fetch: {0}")]
    Fetch(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn tensor(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            message: message.into(),
        }
    }
}
