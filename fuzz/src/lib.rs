//! Shared code of Duet's fuzz targets. The entry points are in two files the normal test suite also
//! includes (with `#[path]`), so the seed corpora replay through exactly the code the fuzzer runs.

pub mod qwen2_targets;
pub mod tasks_targets;

/// A fresh scratch directory for one input, in RAM (`/dev/shm`) when the machine has it.
pub fn scratch() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("duet-fuzz-")
            .tempdir_in(shm)
    } else {
        tempfile::Builder::new().prefix("duet-fuzz-").tempdir()
    };
    dir.expect("cannot create a scratch directory")
}
