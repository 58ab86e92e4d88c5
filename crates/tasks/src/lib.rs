//! Prompts as data: one loaded model playing several roles.
//!
//! Read in this order: `library` (task and pipeline files) → `prompt` (a task + a text → chat prompt,
//! split into a fixed prefix and the request's own part) → `prefix_cache` (the prefix's KV state, computed
//! once) → `runner` (classify by label scoring, or generate text) → `pipeline` (steps feeding later steps)
//! → `router`, `conversation`, `eval`.

pub mod conversation;
pub mod error;
pub mod eval;
pub mod lang;
pub mod library;
pub mod pipeline;
pub mod prefix_cache;
pub mod prompt;
pub mod router;
pub mod runner;
pub mod trace;

pub use error::{Error, Result};
pub use lang::Lang;
pub use library::{Library, OutputKind, Pipeline, Task};
pub use pipeline::{PipelineEvent, PipelineResult, StepOutput};
pub use prefix_cache::PromptCache;
pub use runner::{Classification, ClassifyMode, LabelScore, Runner, TextOutput};
pub use trace::TraceEvent;
