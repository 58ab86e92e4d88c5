//! Replays every committed seed of the `task_file` fuzz target (`fuzz/corpus/task_file/*`) through the
//! entry point the fuzzer calls — this file includes `fuzz/src/tasks_targets.rs` itself — so the normal
//! test suite checks that none of them panics. Errors in the files are fine.

#[path = "../../../fuzz/src/tasks_targets.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

#[test]
fn task_file_seeds() {
    let mut panicked = Vec::new();
    for file in corpus("task_file") {
        let data = std::fs::read(&file).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        if catch_unwind(AssertUnwindSafe(|| {
            targets::task_file(&data, scratch.path())
        }))
        .is_err()
        {
            panicked.push(file.display().to_string());
        }
    }
    assert!(panicked.is_empty(), "seeds that panic: {panicked:?}");
}

/// The shipped task files are valid seeds: each loads as a task (or as the router), so the replay above
/// reaches prompt building rather than stopping at parse errors.
#[test]
fn task_seeds_load() {
    for file in corpus("task_file") {
        let scratch = tempfile::tempdir().unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let target = if name.starts_with("pipeline-") {
            std::fs::create_dir(scratch.path().join("pipelines")).unwrap();
            scratch.path().join("pipelines").join(&name)
        } else {
            scratch.path().join(&name)
        };
        std::fs::copy(&file, &target).unwrap();
        let (_, errors) = tasks::Library::load(&[scratch.path().to_path_buf()]).unwrap();
        let errors: Vec<_> = errors
            .into_iter()
            .filter(|e| !e.contains("is not a known task"))
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
}
