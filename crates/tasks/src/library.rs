//! The prompt library: task and pipeline files (TOML) loaded from directories, re-read when they change.
//! A file that fails to parse keeps its last good version and its error is reported once.

use crate::error::{Error, Result};
use crate::lang::Lang;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A text in both languages.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Localized {
    pub zh: String,
    pub en: String,
}

impl Localized {
    pub fn get(&self, lang: Lang) -> &str {
        match lang {
            Lang::Zh => &self.zh,
            Lang::En => &self.en,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    Labels,
    Text,
    List,
}

impl OutputKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Labels => "labels",
            OutputKind::Text => "text",
            OutputKind::List => "list",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Label {
    pub id: String,
    pub zh: String,
    pub en: String,
    #[serde(default)]
    pub emoji: String,
    /// Added to this label's log-probability before the labels are compared (0 by default): corrects a
    /// model's measured lean towards another label (see sentiment.toml).
    #[serde(default)]
    pub bias: f32,
}

impl Label {
    pub fn display(&self, lang: Lang) -> &str {
        match lang {
            Lang::Zh => &self.zh,
            Lang::En => &self.en,
        }
    }
}

/// A worked example placed in the prompt prefix (few-shot).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Example {
    #[serde(default)]
    pub lang: Option<String>,
    pub text: String,
    /// For label tasks: the label id the answer is.
    #[serde(default)]
    pub label: Option<String>,
    /// For text tasks: the answer.
    #[serde(default)]
    pub output: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub kind: OutputKind,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[serde(default)]
    pub temperature: f32,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default = "one")]
    pub repetition_penalty: f32,
    pub system: Localized,
    #[serde(default)]
    pub labels: Vec<Label>,
    #[serde(default)]
    pub examples: Vec<Example>,
    /// Values for `{placeholders}` in the system prompt when nothing else provides them.
    #[serde(default)]
    pub defaults: BTreeMap<String, Localized>,
    /// Phrases a text task's output must not contain, in any language (ASCII case ignored): where one
    /// appears, generation goes back to the token it began in and takes the best other token there
    /// (`qwen2::phrase_guard`). Write each from the point where the text should turn.
    #[serde(default)]
    pub avoid: Vec<String>,
}

fn default_max_tokens() -> usize {
    128
}
fn one() -> f32 {
    1.0
}

impl Task {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!("bad task name {:?}", self.name));
        }
        if self.kind == OutputKind::Labels && self.labels.len() < 2 {
            return Err("a labels task needs at least two labels".into());
        }
        if let Some(l) = self.labels.iter().find(|l| !l.bias.is_finite()) {
            return Err(format!("label {:?}: bias must be a finite number", l.id));
        }
        if self.avoid.iter().any(|p| p.is_empty()) {
            return Err("avoid: a phrase is empty".into());
        }
        if self.max_tokens == 0 || self.max_tokens > 8192 {
            return Err("max_tokens must be between 1 and 8192".into());
        }
        for e in &self.examples {
            if let Some(l) = &e.label {
                if !self.labels.iter().any(|x| &x.id == l) {
                    return Err(format!(
                        "example label {l:?} is not one of the task's labels"
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn label(&self, id: &str) -> Option<&Label> {
        self.labels.iter().find(|l| l.id == id)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub steps: Vec<String>,
    /// Per step: extra placeholder values, which may refer to earlier steps' outputs (`{keywords}`),
    /// the original text (`{input}`).
    #[serde(default)]
    pub bind: BTreeMap<String, BTreeMap<String, Localized>>,
    /// Per step: take this earlier step's output as the text instead of the original input.
    #[serde(default)]
    pub input_from: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct RouterRules {
    #[serde(default)]
    pub default: String,
    #[serde(default)]
    pub use_model: bool,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
    #[serde(default)]
    pub intent_targets: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RouteRule {
    pub keywords: Vec<String>,
    pub target: String,
}

enum Item {
    Task(Task),
    Pipeline(Pipeline),
    Router(RouterRules),
}

struct FileState {
    modified: Option<SystemTime>,
    len: u64,
    /// The last good content, if any.
    item: Option<Item>,
    error_reported: bool,
}

/// All tasks, pipelines and router rules: the shipped library (compiled in) and/or directories, later
/// sources overriding earlier ones' tasks and pipelines of the same name.
pub struct Library {
    /// Built-in files (`SHIPPED`, or none), read before `dirs`.
    built_in: &'static [(&'static str, &'static str)],
    dirs: Vec<PathBuf>,
    files: HashMap<PathBuf, FileState>,
    pub tasks: BTreeMap<String, Task>,
    pub pipelines: BTreeMap<String, Pipeline>,
    pub router: RouterRules,
}

/// The task files shipped with Duet, in the source tree the binary was built from. While that tree exists
/// they are read from here (so edits apply without a rebuild); a binary moved or installed elsewhere uses
/// its compiled-in copy, [`SHIPPED`].
pub fn shipped_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("library")
}

/// Where a built-in file appears to be, in messages: it has no path of its own.
const BUILT_IN: &str = "(built in)";

/// The shipped library, compiled in: (path relative to [`shipped_dir`], contents). A unit test checks that
/// it lists exactly the files in that directory.
pub const SHIPPED: &[(&str, &str)] = &[
    ("grammar.toml", include_str!("../library/grammar.toml")),
    ("intent.toml", include_str!("../library/intent.toml")),
    ("keywords.toml", include_str!("../library/keywords.toml")),
    ("polish.toml", include_str!("../library/polish.toml")),
    ("qa.toml", include_str!("../library/qa.toml")),
    ("reply.toml", include_str!("../library/reply.toml")),
    ("router.toml", include_str!("../library/router.toml")),
    ("sentiment.toml", include_str!("../library/sentiment.toml")),
    ("style.toml", include_str!("../library/style.toml")),
    ("summary.toml", include_str!("../library/summary.toml")),
    (
        "pipelines/analyze.toml",
        include_str!("../library/pipelines/analyze.toml"),
    ),
    (
        "pipelines/grammar-style.toml",
        include_str!("../library/pipelines/grammar-style.toml"),
    ),
    (
        "pipelines/intent-reply.toml",
        include_str!("../library/pipelines/intent-reply.toml"),
    ),
    (
        "pipelines/keywords-polish.toml",
        include_str!("../library/pipelines/keywords-polish.toml"),
    ),
    (
        "pipelines/summary-qa.toml",
        include_str!("../library/pipelines/summary-qa.toml"),
    ),
];

impl Library {
    /// Loads every `*.toml` in `dirs` (and their `pipelines/` subdirectories). Problems in individual
    /// files are returned as messages; the library holds whatever loaded.
    pub fn load(dirs: &[PathBuf]) -> Result<(Library, Vec<String>)> {
        Library::load_from(&[], dirs)
    }

    /// The shipped library ([`shipped_dir`] while it exists, else the compiled-in [`SHIPPED`]), then
    /// `user_dirs` as [`Library::load`] reads them: what the CLI uses.
    pub fn load_with_shipped(user_dirs: &[PathBuf]) -> Result<(Library, Vec<String>)> {
        let tree = shipped_dir();
        if tree.is_dir() {
            let dirs: Vec<PathBuf> = std::iter::once(tree)
                .chain(user_dirs.iter().cloned())
                .collect();
            return Library::load(&dirs);
        }
        Library::load_from(SHIPPED, user_dirs)
    }

    fn load_from(
        built_in: &'static [(&'static str, &'static str)],
        dirs: &[PathBuf],
    ) -> Result<(Library, Vec<String>)> {
        for d in dirs {
            if !d.is_dir() {
                return Err(Error::File {
                    path: d.display().to_string(),
                    message: "not a directory".into(),
                });
            }
        }
        let mut lib = Library {
            built_in,
            dirs: dirs.to_vec(),
            files: HashMap::new(),
            tasks: BTreeMap::new(),
            pipelines: BTreeMap::new(),
            router: RouterRules::default(),
        };
        let errors = lib.refresh();
        Ok((lib, errors))
    }

    /// Re-reads files whose size or modification time changed. Returns errors not reported before.
    pub fn refresh(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut seen = Vec::new();
        for &(name, text) in self.built_in {
            // Built-in files never change: parsed once.
            let path = Path::new(BUILT_IN).join(name);
            if !self.files.contains_key(&path) {
                let parsed = parse_text(&path, text, name.starts_with("pipelines/"));
                if let Err(msg) = &parsed {
                    errors.push(format!("{}: {msg}", path.display()));
                }
                self.files.insert(
                    path.clone(),
                    FileState {
                        modified: None,
                        len: text.len() as u64,
                        item: parsed.ok(),
                        error_reported: true,
                    },
                );
            }
            seen.push(path);
        }
        for dir in self.dirs.clone() {
            for sub in [dir.clone(), dir.join("pipelines")] {
                let Ok(rd) = std::fs::read_dir(&sub) else {
                    continue;
                };
                let mut paths: Vec<PathBuf> = rd
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
                    .collect();
                paths.sort();
                for p in paths {
                    let is_pipeline = sub.ends_with("pipelines");
                    self.refresh_file(&p, is_pipeline, &mut errors);
                    seen.push(p);
                }
            }
        }
        self.files.retain(|p, _| seen.contains(p));
        // Rebuild the indexes in directory order, so a user directory overrides the shipped one.
        self.tasks.clear();
        self.pipelines.clear();
        self.router = RouterRules::default();
        for p in &seen {
            match self.files.get(p).and_then(|f| f.item.as_ref()) {
                Some(Item::Task(t)) => {
                    self.tasks.insert(t.name.clone(), t.clone());
                }
                Some(Item::Pipeline(pl)) => {
                    self.pipelines.insert(pl.name.clone(), pl.clone());
                }
                Some(Item::Router(r)) => self.router = r.clone(),
                None => {}
            }
        }
        for pl in self.pipelines.values() {
            for s in &pl.steps {
                if !self.tasks.contains_key(s) {
                    errors.push(format!(
                        "pipeline {}: step {s:?} is not a known task",
                        pl.name
                    ));
                }
            }
        }
        errors
    }

    fn refresh_file(&mut self, path: &Path, is_pipeline: bool, errors: &mut Vec<String>) {
        let meta = std::fs::metadata(path).ok();
        let modified = meta.as_ref().and_then(|m| m.modified().ok());
        let len = meta.as_ref().map_or(0, |m| m.len());
        if let Some(st) = self.files.get(path) {
            if st.modified == modified && st.len == len {
                return;
            }
        }
        let parsed = parse_file(path, is_pipeline);
        let st = self.files.entry(path.to_path_buf()).or_insert(FileState {
            modified,
            len,
            item: None,
            error_reported: false,
        });
        st.modified = modified;
        st.len = len;
        match parsed {
            Ok(item) => {
                st.item = Some(item);
                st.error_reported = false;
            }
            Err(msg) => {
                // Keep the last good version; say so once per broken edit.
                if !st.error_reported {
                    let kept = if st.item.is_some() {
                        " (keeping the previous version)"
                    } else {
                        ""
                    };
                    errors.push(format!("{}: {msg}{kept}", path.display()));
                    st.error_reported = true;
                }
            }
        }
    }

    /// Whether `s` is text of the library itself (a label's name or a placeholder's default), as opposed
    /// to something a user wrote.
    pub fn is_library_text(&self, s: &str) -> bool {
        self.tasks.values().any(|t| {
            t.labels.iter().any(|l| l.zh == s || l.en == s)
                || t.defaults.values().any(|d| d.zh == s || d.en == s)
        })
    }

    pub fn task(&self, name: &str) -> Result<&Task> {
        self.tasks
            .get(name)
            .ok_or_else(|| Error::Unknown(name.to_string()))
    }
}

fn parse_file(path: &Path, is_pipeline: bool) -> std::result::Result<Item, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    parse_text(path, &text, is_pipeline)
}

fn parse_text(path: &Path, text: &str, is_pipeline: bool) -> std::result::Result<Item, String> {
    let one_line = |e: toml::de::Error| {
        e.to_string()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    };
    if path.file_name().is_some_and(|n| n == "router.toml") {
        return toml::from_str::<RouterRules>(text)
            .map(Item::Router)
            .map_err(one_line);
    }
    if is_pipeline {
        let p: Pipeline = toml::from_str(text).map_err(one_line)?;
        if p.steps.is_empty() {
            return Err("a pipeline needs at least one step".into());
        }
        return Ok(Item::Pipeline(p));
    }
    let t: Task = toml::from_str(text).map_err(one_line)?;
    t.validate()?;
    Ok(Item::Task(t))
}

/// A template's pieces in order: literal text, and `{name}` placeholders (a name of ASCII letters, digits,
/// `_` and `.`; any other brace is literal text).
enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

fn pieces(template: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push(Piece::Text(&rest[..open]));
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close)
                if close > 0
                    && after[..close]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') =>
            {
                out.push(Piece::Placeholder(&after[..close]));
                rest = &after[close + 1..];
            }
            _ => {
                out.push(Piece::Text("{"));
                rest = after;
            }
        }
    }
    out.push(Piece::Text(rest));
    out
}

/// Fills `{name}` placeholders from `vars`; unknown names become empty. Other braces are left alone.
pub fn fill(template: &str, vars: &BTreeMap<String, String>) -> String {
    pieces(template)
        .into_iter()
        .map(|p| match p {
            Piece::Text(t) => t,
            Piece::Placeholder(name) => vars.get(name).map_or("", String::as_str),
        })
        .collect()
}

/// The names of the placeholders a template fills, as [`fill`] reads them.
pub fn placeholders(template: &str) -> Vec<&str> {
    pieces(template)
        .into_iter()
        .filter_map(|p| match p {
            Piece::Placeholder(name) => Some(name),
            Piece::Text(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped library's files, relative to `shipped_dir()`, sorted.
    fn files_in_shipped_dir() -> Vec<String> {
        let mut names = Vec::new();
        for sub in ["", "pipelines/"] {
            for e in std::fs::read_dir(shipped_dir().join(sub)).unwrap() {
                let name = e.unwrap().file_name().into_string().unwrap();
                if name.ends_with(".toml") {
                    names.push(format!("{sub}{name}"));
                }
            }
        }
        names.sort();
        names
    }

    #[test]
    fn compiled_in_library_lists_every_shipped_file() {
        let mut listed: Vec<String> = SHIPPED.iter().map(|(n, _)| n.to_string()).collect();
        listed.sort();
        assert_eq!(listed, files_in_shipped_dir(), "update SHIPPED");
        assert_eq!(files_in_shipped_dir().len(), 15);
    }

    #[test]
    fn compiled_in_library_matches_the_shipped_directory() {
        let (from_dir, errors) = Library::load(&[shipped_dir()]).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let (built_in, errors) = Library::load_from(SHIPPED, &[]).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(built_in.tasks, from_dir.tasks);
        assert_eq!(built_in.pipelines, from_dir.pipelines);
        assert_eq!(built_in.router, from_dir.router);
        assert_eq!(built_in.tasks.len(), 9);
    }

    #[test]
    fn user_directory_overrides_a_built_in_task() {
        let dir = tempfile::tempdir().unwrap();
        let mine = "name='reply'\nkind='text'\n[system]\nzh='我的'\nen='Mine'\n";
        std::fs::write(dir.path().join("my-reply.toml"), mine).unwrap();
        let user = [dir.path().to_path_buf()];
        for (lib, errors) in [
            Library::load_from(SHIPPED, &user).unwrap(),
            Library::load_with_shipped(&user).unwrap(),
        ] {
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(lib.tasks["reply"].system.en, "Mine");
            assert_eq!(lib.tasks.len(), 9);
            assert!(lib.tasks["sentiment"].system.en.contains("sentiment"));
        }
    }

    #[test]
    fn shipped_library_loads_cleanly() {
        let (lib, errors) = Library::load_with_shipped(&[]).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        for t in [
            "sentiment",
            "reply",
            "intent",
            "keywords",
            "polish",
            "grammar",
            "style",
            "summary",
            "qa",
        ] {
            assert!(lib.tasks.contains_key(t), "missing task {t}");
        }
        for p in [
            "analyze",
            "intent-reply",
            "keywords-polish",
            "grammar-style",
            "summary-qa",
        ] {
            assert!(lib.pipelines.contains_key(p), "missing pipeline {p}");
        }
        assert_eq!(lib.router.default, "analyze");
        let intents: Vec<_> = lib.tasks["intent"]
            .labels
            .iter()
            .map(|l| l.id.as_str())
            .collect();
        assert_eq!(
            intents,
            [
                "complaint",
                "question",
                "praise",
                "refund",
                "chitchat",
                "other"
            ]
        );
    }

    #[test]
    fn phrases_to_avoid_are_read_and_an_empty_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let task = |avoid: &str| {
            format!("name='t'\nkind='text'\navoid={avoid}\n[system]\nzh='A'\nen='A'\n")
        };
        std::fs::write(
            dir.path().join("t.toml"),
            task(r#"['but I', '我无法', "\n\n"]"#),
        )
        .unwrap();
        let (lib, errors) = Library::load(&[dir.path().to_path_buf()]).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(lib.tasks["t"].avoid, ["but I", "我无法", "\n\n"]);
        std::fs::write(dir.path().join("t.toml"), task("['x', '']")).unwrap();
        let (lib, errors) = Library::load(&[dir.path().to_path_buf()]).unwrap();
        assert!(!lib.tasks.contains_key("t"));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("avoid: a phrase is empty"), "{errors:?}");
        let (shipped, _) = Library::load_with_shipped(&[]).unwrap();
        let reply = &shipped.tasks["reply"].avoid;
        assert!(
            reply.iter().any(|p| p == ", but I can't") && reply.iter().any(|p| p == "，我无法")
        );
    }

    #[test]
    fn a_label_bias_is_read_and_must_be_finite() {
        let dir = tempfile::tempdir().unwrap();
        let task = |bias: &str| {
            format!(
                "name='t'\nkind='labels'\n[system]\nzh='A'\nen='A'\n\
                 [[labels]]\nid='a'\nzh='甲'\nen='a'\n\
                 [[labels]]\nid='b'\nzh='乙'\nen='b'\nbias={bias}\n"
            )
        };
        std::fs::write(dir.path().join("t.toml"), task("-0.25")).unwrap();
        let (lib, errors) = Library::load(&[dir.path().to_path_buf()]).unwrap();
        assert!(errors.is_empty(), "{errors:?}");
        let biases: Vec<f32> = lib.tasks["t"].labels.iter().map(|l| l.bias).collect();
        assert_eq!(biases, [0.0, -0.25]);
        for bad in ["nan", "inf"] {
            std::fs::write(dir.path().join("t.toml"), task(bad)).unwrap();
            let (lib, errors) = Library::load(&[dir.path().to_path_buf()]).unwrap();
            assert!(!lib.tasks.contains_key("t"));
            assert!(
                errors[0].contains("bias must be a finite number"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn fill_placeholders() {
        let mut v = BTreeMap::new();
        v.insert("a".to_string(), "X".to_string());
        assert_eq!(fill("{a}-{b}-{ not }-{}", &v), "X--{ not }-{}");
        assert_eq!(placeholders("{a}-{b}-{ not }-{}{c.d}"), ["a", "b", "c.d"]);
    }

    #[test]
    fn broken_edit_keeps_last_good_version_and_reports_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        let good = "name='t'\nkind='text'\n[system]\nzh='A'\nen='A'\n";
        std::fs::write(&f, good).unwrap();
        let (mut lib, e) = Library::load(&[dir.path().to_path_buf()]).unwrap();
        assert!(e.is_empty());
        std::fs::write(&f, "name='t'\nkind=").unwrap();
        let e = lib.refresh();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("keeping the previous version"));
        assert_eq!(lib.tasks["t"].system.zh, "A");
        assert!(lib.refresh().is_empty(), "reported once");
        std::fs::write(&f, good.replace("'A'", "'BB'")).unwrap();
        assert!(lib.refresh().is_empty());
        assert_eq!(lib.tasks["t"].system.zh, "BB");
    }
}
