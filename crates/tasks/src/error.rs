#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] qwen2::Error),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("unknown task or pipeline {0:?} (see `duet tasks`)")]
    Unknown(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;
