//! Fuzz entry point for the `tasks` crate: task, pipeline and router files.
//!
//! Shared, like `qwen2_targets.rs`, by the fuzz target (`fuzz/fuzz_targets/task_file.rs`) and the replay
//! test (`crates/tasks/tests/fuzz_replay.rs` includes this file). Errors are expected; panics are bugs.

use qwen2::{Message, Tokenizer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tasks::{Lang, Library};

const TINY_TOKENIZER: &str =
    include_str!("../../tests/data/tiny/qwen25-gqa-untied-f32/tokenizer.json");
const TINY_TOKENIZER_CONFIG: &str =
    include_str!("../../tests/data/tiny/qwen25-gqa-untied-f32/tokenizer_config.json");

/// The fixture tokenizer with Qwen2.5's chat template, built once.
fn tiny_tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let json: serde_json::Value = serde_json::from_str(TINY_TOKENIZER).expect("fixture JSON");
        let cfg: serde_json::Value =
            serde_json::from_str(TINY_TOKENIZER_CONFIG).expect("fixture JSON");
        let template = cfg["chat_template"].as_str().map(String::from);
        Tokenizer::from_json(&json, template).expect("fixture tokenizer loads")
    })
}

/// (e) The input as a task file, as `router.toml` and as a pipeline file in one library directory, then
/// `Library::load`; every task that loads is rendered into prompts in both languages, as requests do.
pub fn task_file(data: &[u8], scratch: &Path) {
    let pipelines = scratch.join("pipelines");
    std::fs::create_dir_all(&pipelines).expect("cannot create the scratch directory");
    for path in [
        scratch.join("task.toml"),
        scratch.join("router.toml"),
        pipelines.join("pipeline.toml"),
    ] {
        std::fs::write(path, data).expect("cannot write the fuzz input to the scratch directory");
    }
    let Ok((lib, _errors)) = Library::load(&[PathBuf::from(scratch)]) else {
        return;
    };
    let tok = tiny_tokenizer();
    let mut vars = BTreeMap::new();
    vars.insert("input".to_string(), "x".to_string());
    let history = [Message::user("earlier"), Message::assistant("reply")];
    for task in lib.tasks.values() {
        let _ = lib.task(&task.name);
        for lang in [Lang::Zh, Lang::En] {
            for label in &task.labels {
                let _ = label.display(lang);
            }
            let _ = tasks::prompt::variables(task, lang, &vars);
            let _ = tasks::prompt::build(tok, task, lang, &vars, &[], "退款 refund");
            let _ = tasks::prompt::build(tok, task, lang, &vars, &history, "");
        }
    }
    for pipeline in lib.pipelines.values() {
        for step in &pipeline.steps {
            let _ = lib.task(step);
        }
    }
}
