//! What every command shares: global flags, model loading with progress, one-line errors.

use anyhow::Result;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Clone)]
pub struct Global {
    /// A .gguf file or a Hugging Face model directory (default: $DUET_MODEL, else the default model,
    /// fetched on first use).
    #[arg(long, global = true, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Compute threads (default: the number of physical cores).
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    /// Show the path of the request through the engine: prompt, tokens, cache use, candidates, timings.
    #[arg(long, global = true)]
    pub trace: bool,
    /// Language of prompts and labels (default: detected from each text).
    #[arg(long, global = true, value_parser = ["zh", "en"])]
    pub lang: Option<String>,
    /// The form weights are held and multiplied in (default: native): `native` keeps the file's own
    /// quantized blocks and multiplies them with 8-bit activations (fastest; approximate), `f32` is f32
    /// math on the stored values (exact), `bf16` and `q8_0` convert every matrix at load. For `convert`:
    /// the dtype written, f32 (default) or bf16.
    #[arg(long, global = true, value_name = "FORM",
          value_parser = ["native", "f32", "bf16", "q8_0"])]
    pub dtype: Option<String>,
    /// The exact path: f32 math on the stored weight values (same as --dtype f32).
    #[arg(long, global = true)]
    pub exact: bool,
    /// A directory of task files that add to or override the shipped ones.
    #[arg(long, global = true, value_name = "DIR")]
    pub tasks_dir: Option<PathBuf>,
}

impl Global {
    pub fn threads(&self) -> Option<usize> {
        self.threads.map(usize::from)
    }

    pub fn form(&self) -> qwen2::matrix::WeightForm {
        use qwen2::matrix::WeightForm;
        if self.exact {
            return WeightForm::Exact;
        }
        self.dtype
            .as_deref()
            .and_then(WeightForm::parse)
            .unwrap_or(WeightForm::Native)
    }
}

/// Finds (fetching if needed) and loads the model, saying what it does on stderr.
pub fn load_model(g: &Global) -> Result<qwen2::LoadedModel> {
    let path = qwen2::fetch::resolve_model(g.model.as_deref())?;
    eprint!(
        "loading {} ({} weights) … ",
        path.display(),
        g.form().name()
    );
    let _ = std::io::stderr().flush();
    let loaded = qwen2::load::load_with(&path, g.form()).inspect_err(|_| eprintln!())?;
    eprintln!("done in {} ms", loaded.load_time.as_millis());
    if g.trace {
        eprintln!(
            "[trace] quantized::Backend::best → {} (the kernels of block-quantized products)",
            qwen2::kernels::quantized::Backend::best().name()
        );
        eprintln!(
            "[trace] float prefill GEMM in {}-bit vectors (f32/bf16/f16 weights, 12 or more tokens)",
            qwen2::kernels::matmul::float_gemm_lanes() * 32
        );
        let m = &loaded.model;
        eprintln!(
            "[trace] Model::output_matrix → {}, {} MB (of the {} MB of weights a decode step reads)",
            m.output_matrix().form(),
            m.output_matrix().bytes() / 1_000_000,
            m.weight_bytes_per_token() / 1_000_000
        );
    }
    Ok(loaded)
}

/// The model plus the task library: what the task commands work with.
pub fn load_runner(g: &Global) -> Result<tasks::Runner> {
    let library = load_library(g)?;
    runner_with(g, library)
}

/// The shipped task library with `--tasks-dir` over it; files that fail to load are reported and left
/// out. Reading it needs no model, so a command can check its input against it before the model loads.
pub fn load_library(g: &Global) -> Result<tasks::Library> {
    let user_dirs: Vec<_> = g.tasks_dir.iter().cloned().collect();
    let (library, errors) = tasks::Library::load_with_shipped(&user_dirs)?;
    for e in errors {
        eprintln!("duet: warning: {e}");
    }
    Ok(library)
}

/// The model loaded, and a runner over it with `library`.
pub fn runner_with(g: &Global, library: tasks::Library) -> Result<tasks::Runner> {
    let m = load_model(g)?;
    let mut runner = tasks::Runner::new(m.model, m.tokenizer, library);
    if let Some((dir, key)) = prefix_cache_dir(&m.path, g.form().name()) {
        runner.cache.use_disk(dir, key);
    }
    runner.prefill_progress = prefill_progress();
    Ok(runner)
}

/// Progress of a long count on stderr: rewritten in place on a terminal; into a log or a pipe, a line
/// per tenth of the way (hundreds of updates joined by carriage returns would be one unreadable line).
pub struct Counter {
    tty: bool,
}

impl Counter {
    pub fn new() -> Self {
        use std::io::IsTerminal;
        Counter {
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// Reports `done` of `total` as `line`.
    pub fn show(&self, done: usize, total: usize, line: std::fmt::Arguments) {
        if self.tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if done == total || done.is_multiple_of(total.div_ceil(10).max(1)) {
            eprintln!("{line}");
        }
    }

    /// Ends the counter's line on a terminal.
    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// How far a long prompt has got (one of 3000 tokens takes ~20 s on two cores), written on the terminal
/// where the answer will start and erased when it is done: the cursor is saved before and restored
/// after each report, so text already on the line (`analyze`'s label) stays. Only for a terminal: a log
/// or a pipe gets no control sequences.
pub fn prefill_progress() -> Option<qwen2::PrefillProgress> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(qwen2::PrefillProgress(std::sync::Arc::new(
        |done, total| {
            // ESC 7 / ESC 8 save and restore the cursor, ESC [K erases to the end of the line.
            if done < total {
                eprint!("\x1b7\x1b[K(reading the prompt: {done} / {total} tokens)\x1b8");
            } else {
                eprint!("\x1b7\x1b[K\x1b8");
            }
            let _ = std::io::stderr().flush();
        },
    )))
}

/// Where prompt prefixes are kept across runs, and the key naming what their values depend on: the model
/// file (path, size, modification time; each file's for a directory), the weight form and this binary
/// (its size and modification time: any rebuild may change the numbers) and the kernels it runs (AMX
/// tiles and VNNI add in different orders). `$DUET_CACHE_DIR` (empty:
/// off), else `$XDG_CACHE_HOME/duet`, else `~/.cache/duet`.
fn prefix_cache_dir(model: &std::path::Path, form: &str) -> Option<(PathBuf, String)> {
    let base = match std::env::var_os("DUET_CACHE_DIR") {
        Some(d) if d.is_empty() => return None,
        Some(d) => PathBuf::from(d),
        None => qwen2::fetch::user_dir("XDG_CACHE_HOME", ".cache")?,
    };
    let stamp = |p: &std::path::Path| -> Option<String> {
        let m = std::fs::metadata(p).ok()?;
        let t = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        Some(format!("{}:{}:{}", p.display(), m.len(), t.as_nanos()))
    };
    let mut key = vec![
        env!("CARGO_PKG_VERSION").to_string(),
        form.to_string(),
        qwen2::kernels::quantized::Backend::best()
            .name()
            .to_string(),
    ];
    key.push(stamp(&std::env::current_exe().ok()?)?);
    let model = std::fs::canonicalize(model).ok()?;
    if model.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&model)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        for f in files {
            key.push(stamp(&f)?);
        }
    } else {
        key.push(stamp(&model)?);
    }
    Some((base.join("prefixes"), key.join("\n")))
}

/// The language for a text: --lang if given, else detected.
pub fn lang_for(g: &Global, text: &str) -> tasks::Lang {
    g.lang
        .as_deref()
        .and_then(tasks::Lang::parse)
        .unwrap_or_else(|| tasks::Lang::detect(text))
}

/// Prints one trace event on stderr, named by the function that produced it.
pub fn print_trace(e: &tasks::TraceEvent) {
    use tasks::TraceEvent as T;
    match e {
        T::Prompt { task, text, prefix_chars } => {
            eprintln!("[trace] prompt::build ({task}) → chat prompt, fixed prefix = first {prefix_chars} chars:");
            for line in text.lines() {
                eprintln!("[trace]   | {line}");
            }
        }
        T::Cache { hit, from_disk, extended_from, prefix_tokens, cache_bytes, entries } => eprintln!(
            "[trace] PromptCache::prepare → {} ({prefix_tokens} prefix tokens; cache holds {entries} prefixes, {:.1} MiB)",
            match (hit, from_disk, extended_from) {
                (true, true, _) => "hit: read from the disk cache".to_string(),
                (true, false, _) => "hit".to_string(),
                (false, _, 0) => "miss: prefix computed now".to_string(),
                (false, false, n) => format!("miss: prefix computed now, after a cached {n}-token prefix of it"),
                (false, true, n) => format!("miss: prefix computed now, after its first {n} tokens read from the disk cache"),
            },
            *cache_bytes as f64 / (1 << 20) as f64
        ),
        T::Tokens { ids, cached } => {
            eprintln!("[trace] Tokenizer::encode → {} tokens ({cached} from the prefix cache, {} run now):", ids.len(), ids.len() - cached);
            let shown: Vec<String> = ids[*cached..].iter().map(|(i, p)| format!("{i}:{p:?}")).collect();
            eprintln!("[trace]   new: {}", shown.join(" "));
        }
        T::Labels { scores } => {
            for s in scores {
                let bias = if s.bias == 0.0 { String::new() } else { format!(" {:+.2} (bias)", s.bias) };
                eprintln!("[trace] Runner::classify → {:<10} score = {:>8.4}{bias}  p = {:.4}", s.display, s.logprob, s.prob);
            }
        }
        T::Token { id, piece, candidates } => {
            let c: Vec<String> = candidates.iter().map(|(p, l)| format!("{p:?}={l:.2}")).collect();
            eprintln!("[trace] Sampler::sample → {id:>7} {piece:?}   top: {}", c.join(" "));
        }
        T::Avoided { phrase, token, piece } => eprintln!(
            "[trace] PhraseGuard → {phrase:?} avoided: back to new token {token}, {piece:?} ruled out there"
        ),
        T::Timing { stage, ms } => eprintln!("[trace] {stage}: {ms:.1} ms"),
    }
}

pub fn print_error(e: &anyhow::Error) {
    // One line: the chain of causes joined, newlines flattened; a cause the message already quotes (an
    // I/O error shown beside its path) is not repeated.
    let mut msg = String::new();
    for cause in e.chain().map(|c| c.to_string()) {
        if msg.ends_with(&cause) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&cause);
    }
    eprintln!("duet: error: {}", msg.replace('\n', " "));
}

/// Clap's own errors, reduced to one line (help and version pass through untouched).
pub fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            // The first paragraph: the message, and for some kinds the names it refers to on the lines
            // below it ("the following required arguments were not provided:" then "  <TEXT>").
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.trim_start_matches("error: ");
            let first = if first.is_empty() {
                "invalid arguments"
            } else {
                first
            };
            eprintln!("duet: error: {first} (see duet --help)");
            ExitCode::from(2)
        }
    }
}

/// The sentiment tag shown before a reply: `😄 情感: 正面 (1.00)` or `😞 Sentiment: negative (0.85)`.
pub fn sentiment_tag(c: &tasks::Classification, lang: tasks::Lang) -> String {
    let word = if lang == tasks::Lang::Zh {
        "情感"
    } else {
        "Sentiment"
    };
    format!("{} {word}: {} ({:.2})", c.emoji, c.display, c.confidence)
}

/// Writes streamed output (a label, a reply's pieces) and shows it at once. A reader that has gone ends
/// the program quietly ([`reader_gone`]); any other failure to write (a full disk) ends it with one error
/// line, as what cannot be written is lost.
pub fn stream(out: &mut impl Write, bytes: &[u8]) {
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            reader_gone();
        }
        eprintln!("duet: error: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// The reader of our output has gone (`duet … | head`): that is how a pipeline ends, not an error, so
/// the program ends quietly and generates nothing more for no one. A C program would be ended by SIGPIPE;
/// Rust ignores that signal, so writes fail with EPIPE instead. The status is success, as ripgrep's.
pub fn reader_gone() -> ! {
    std::process::exit(0)
}

/// A bug should still end as one line, not a backtrace.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        // `print!` and `eprint!` panic when their write fails ("failed printing to stdout: Broken pipe
        // (os error 32)"); for a reader that has gone, that is no bug. (Writing the line below to a
        // stderr that has gone would panic inside this hook and abort.)
        let os_error = msg
            .rsplit_once("(os error ")
            .and_then(|(_, n)| n.trim_end_matches(')').parse().ok())
            .map(std::io::Error::from_raw_os_error);
        if msg.starts_with("failed printing to std")
            && os_error.is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        {
            reader_gone();
        }
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "duet: internal error (a bug, please report it): {}{place}",
            msg.replace('\n', " ")
        );
    }));
}

pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}
