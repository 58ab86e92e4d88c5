//! The real `duet` binary, driven as a user would: every command, `--json` shapes, and every error case
//! giving one line on stderr and a non-zero exit. Most cases use the tiny fixture model (fast); the
//! dual task is also checked on the real default model (fetched if missing).

use serde_json::Value;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

mod common;
use common::duet_command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tiny() -> PathBuf {
    root().join("tests/data/tiny/qwen25-gqa-untied-f32")
}

/// A new directory `dir` holding copies of the tiny model's `files`, for a test to damage one.
fn tiny_copy(dir: &std::path::Path, files: &[&str]) -> PathBuf {
    std::fs::create_dir(dir).unwrap();
    for f in files {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    dir.to_path_buf()
}

/// The tiny model's files besides its weights.
const TINY_NOT_WEIGHTS: [&str; 4] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

fn duet(args: &[&str], stdin: Option<&[u8]>) -> Output {
    duet_with(args, stdin, "")
}

/// `duet` run to its end, with `stdin` written to it (see [`duet_command`]).
fn duet_with(args: &[&str], stdin: Option<&[u8]>, cache_dir: &str) -> Output {
    let mut child = duet_command(args, cache_dir).spawn().expect("run duet");
    {
        let mut sin = child.stdin.take().unwrap();
        if let Some(data) = stdin {
            sin.write_all(data).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A failing run: non-zero exit, its last stderr line is one `duet: error:` line, nothing panicked.
fn assert_clean_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, stderr: {err}");
    assert!(o.status.code().is_some(), "killed by a signal");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.starts_with("duet: error: "),
        "last stderr line: {last:?}"
    );
    assert!(
        last.to_lowercase().contains(&needle.to_lowercase()),
        "{last:?} should mention {needle:?}"
    );
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(tiny().join("reference.json")).unwrap()).unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// `generate --avoid`: the tiny model's fourth greedy token is "The"; avoiding "the" goes back once and
/// takes another token there (the choice itself is checked against transformers in qwen2's tests). An
/// empty phrase is a clear error.
#[test]
fn generate_avoid_goes_back_where_the_phrase_began() {
    let r = reference();
    let m = tiny();
    let run = |avoid: &str| {
        duet(
            &[
                "--model",
                m.to_str().unwrap(),
                "generate",
                "--prompt",
                r["prompt_text"].as_str().unwrap(),
                "--max-new-tokens",
                "8",
                "--ignore-eos",
                "--json",
                "--avoid",
                avoid,
            ],
            None,
        )
    };
    let o = run("the");
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let (got, greedy) = (u32s(&v["ids"]), u32s(&r["greedy_ids"]));
    assert_eq!(v["rewinds"], 1);
    assert_eq!(got[..3], greedy[..3]);
    assert_ne!(got[3], greedy[3]);
    assert!(!v["text"]
        .as_str()
        .unwrap()
        .to_ascii_lowercase()
        .contains("the"));
    assert_clean_error(&run(""), "--avoid needs a phrase");
}

#[test]
fn generate_json_matches_transformers_on_tiny_model() {
    let r = reference();
    let m = tiny();
    let o = duet(
        &[
            "--model",
            m.to_str().unwrap(),
            "generate",
            "--prompt",
            r["prompt_text"].as_str().unwrap(),
            "--max-new-tokens",
            "16",
            "--ignore-eos",
            "--top-logits",
            "3",
            "--json",
            "--exact",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(u32s(&v["prompt_ids"]), u32s(&r["prompt_ids"]));
    assert_eq!(u32s(&v["ids"]), u32s(&r["greedy_ids"]));
    assert_eq!(v["stop_reason"], "length");
    assert_eq!(v["top_logits"].as_array().unwrap().len(), 3);
    assert_eq!(
        v["top_logits"][0]["id"].as_u64().unwrap(),
        r["prefill_argmax"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .as_u64()
            .unwrap()
    );
    for k in [
        "load_ms",
        "prefill_ms",
        "decode_ms",
        "prefill_tok_s",
        "decode_tok_s",
    ] {
        assert!(v["timings"][k].is_number(), "timings.{k}");
    }
}

/// `--prompt -` reads the prompt from stdin to the last byte (the reference prompt ends with a line
/// break, token 198): the same prompt tokens as transformers'. `--user -` drops the line break `echo`
/// adds, so it renders the same chat prompt as the message given in place.
#[test]
fn generate_reads_a_prompt_from_stdin() {
    let r = reference();
    let m = tiny();
    let prompt_ids = |args: &[&str], stdin: &str| {
        let mut all = vec!["--model", m.to_str().unwrap(), "generate"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--max-new-tokens", "1", "--json"]);
        let o = duet(&all, Some(stdin.as_bytes()));
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        u32s(&v["prompt_ids"])
    };
    let text = r["prompt_text"].as_str().unwrap();
    assert_eq!(text.chars().last(), Some('\n'));
    assert_eq!(prompt_ids(&["--prompt", "-"], text), u32s(&r["prompt_ids"]));
    assert_eq!(
        prompt_ids(&["--user", "-"], "How are you?\n"),
        prompt_ids(&["--user", "How are you?"], "")
    );
    let bad = duet(
        &["--model", m.to_str().unwrap(), "generate", "--user", "-"],
        Some(b"\xff\xfe"),
    );
    assert_clean_error(&bad, "not valid UTF-8");
}

#[test]
fn tokenize_json() {
    let r = reference();
    let o = duet(
        &[
            "--model",
            tiny().to_str().unwrap(),
            "tokenize",
            "--json",
            r["prompt_text"].as_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(u32s(&v["ids"]), u32s(&r["prompt_ids"]));
}

/// More compute threads than physical cores are honoured, with a warning; as many as the cores, none.
#[test]
fn threads_beyond_the_cores_are_warned_of() {
    let cores = qwen2::kernels::pool::physical_cores();
    let m = tiny();
    for (n, warned) in [(cores + 1, true), (cores, false)] {
        let n = n.to_string();
        let o = duet(
            &[
                "--threads",
                &n,
                "--model",
                m.to_str().unwrap(),
                "tokenize",
                "hi",
            ],
            None,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let warning = format!("duet: warning: --threads {n} is more than this machine's {cores}");
        assert_eq!(stderr(&o).contains(&warning), warned, "{}", stderr(&o));
    }
}

#[test]
fn tasks_lists_tasks_and_pipelines() {
    let o = duet(&["tasks", "--json"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for n in [
        "sentiment",
        "reply",
        "intent",
        "keywords",
        "polish",
        "grammar",
        "style",
        "summary",
        "qa",
        "analyze",
        "summary-qa",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    for t in v.as_array().unwrap() {
        assert!(t["description"].is_string() && t["output"].is_string());
    }
    let o = duet(&["tasks"], None);
    assert!(stdout(&o).contains("Pipelines:"));
}

/// `duet … | head`: the reader goes away before duet writes. Like other Unix tools, duet then ends
/// quietly with success (Rust ignores SIGPIPE, so the writes fail with EPIPE, and `print!` panics). A
/// streamed reply and `println!` output are both covered, with stderr gone as well (`2>&1 | head`) or
/// kept to show that nothing was reported.
#[test]
fn a_reader_that_goes_away_ends_duet_quietly() {
    let m = tiny();
    let m = m.to_str().unwrap();
    let cases: [&[&str]; 3] = [
        // Streamed piece by piece.
        &[
            "--model",
            m,
            "generate",
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "400",
            "--ignore-eos",
        ],
        &["tasks"],
        &["--model", m, "tokenize", "Hello world"],
    ];
    for args in cases {
        for stderr_gone in [false, true] {
            let mut child = duet_command(args, "")
                .stdin(Stdio::null())
                .spawn()
                .expect("run duet");
            // Closed before duet can write: its writes find no reader.
            drop(child.stdout.take());
            if stderr_gone {
                drop(child.stderr.take());
            }
            let o = child.wait_with_output().unwrap();
            let err = stderr(&o);
            assert!(
                o.status.success(),
                "{args:?}, stderr gone: {stderr_gone}: {:?} {err}",
                o.status
            );
            // Nothing reported but the load line.
            assert!(
                err.lines().all(|l| l.starts_with("loading ")),
                "{args:?}: {err}"
            );
        }
    }
}

#[test]
fn analyze_batch_keeps_every_line_and_reports_bad_ones() {
    // The tiny model's answers are random, but their shape is not: one JSON line per input line.
    let m = tiny();
    let input = b"good day\n\xff\xfe broken\n\nlast one\n";
    let o = duet(
        &[
            "--model",
            m.to_str().unwrap(),
            "analyze",
            "-",
            "--json",
            "--max-new-tokens",
            "4",
        ],
        Some(input),
    );
    assert_clean_error(&o, "failed");
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{}", stdout(&o));
    assert_eq!(lines[0]["text"], "good day");
    assert!(["positive", "negative"].contains(&lines[0]["sentiment"]["label"].as_str().unwrap()));
    assert!(lines[0]["sentiment"]["confidence"].as_f64().unwrap() >= 0.5);
    assert!(lines[0]["reply"].is_string());
    for k in ["sentiment", "first_token", "total"] {
        assert!(lines[0]["timings_ms"][k].is_number(), "{k}");
    }
    assert_eq!(lines[1]["line"], 2);
    assert!(lines[1]["error"].as_str().unwrap().contains("UTF-8"));
    assert_eq!(lines[2]["line"], 3);
    assert_eq!(lines[3]["text"], "last one");
    let err = stderr(&o);
    assert!(
        err.contains("line 2: invalid UTF-8") && err.contains("line 3: the text is empty"),
        "{err}"
    );
}

#[test]
fn chat_through_a_pipe() {
    let m = tiny();
    let o = duet(
        &[
            "--model",
            m.to_str().unwrap(),
            "chat",
            "--max-new-tokens",
            "3",
        ],
        Some(b"hello there\n/trace maybe\n/trace on\nsecond turn\n/reset\n/bogus\n/quit\nnever read\n"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(
        out.lines().filter(|l| l.contains("Sentiment:")).count(),
        2,
        "{out}"
    );
    let err = stderr(&o);
    assert!(
        err.contains("[trace] prompt::build")
            && err.contains("(conversation cleared)")
            && err.contains("unknown command /bogus")
            && err.contains("/trace takes on or off, not \"maybe\""),
        "{err}"
    );
}

#[test]
fn task_runs_pipeline_and_router() {
    let m = tiny();
    let o = duet(
        &[
            "--model",
            m.to_str().unwrap(),
            "task",
            "keywords-polish",
            "some text here",
            "--json",
            "--max-new-tokens",
            "3",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["steps"][0]["task"], "keywords");
    assert!(v["steps"][0]["items"].is_array());
    assert_eq!(v["steps"][1]["task"], "polish");
    let o = duet(
        &[
            "--model",
            m.to_str().unwrap(),
            "task",
            "--route",
            "I want a refund please",
            "--json",
            "--max-new-tokens",
            "2",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["target"], "intent-reply", "keyword rule routes refunds");
}

#[test]
fn errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // A missing model path.
    assert_clean_error(
        &duet(
            &["--model", "/nonexistent/model.gguf", "analyze", "hi"],
            None,
        ),
        "no such file",
    );
    // A directory without config.json.
    assert_clean_error(
        &duet(&["--model", t.to_str().unwrap(), "analyze", "hi"], None),
        "config.json",
    );
    // Bad JSON in config.json.
    let bad = t.join("badjson");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("config.json"), "{ not json").unwrap();
    assert_clean_error(
        &duet(
            &[
                "--model",
                bad.to_str().unwrap(),
                "generate",
                "--prompt",
                "hi",
            ],
            None,
        ),
        "invalid JSON",
    );
    // A truncated safetensors file.
    let trunc = tiny_copy(&t.join("trunc"), &TINY_NOT_WEIGHTS);
    let st = std::fs::read(tiny().join("model.safetensors")).unwrap();
    std::fs::write(trunc.join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    assert_clean_error(
        &duet(
            &[
                "--model",
                trunc.to_str().unwrap(),
                "generate",
                "--prompt",
                "hi",
            ],
            None,
        ),
        "safetensors",
    );
    // A missing, then a broken tokenizer.json (the weights are fine): the path once, the cause once.
    let notok = tiny_copy(&t.join("notok"), &["config.json", "model.safetensors"]);
    let o = duet(
        &["--model", notok.to_str().unwrap(), "tokenize", "hi"],
        None,
    );
    assert_clean_error(&o, "tokenizer.json: No such file or directory");
    assert_eq!(
        stderr(&o).matches("No such file").count(),
        1,
        "{}",
        stderr(&o)
    );
    std::fs::write(notok.join("tokenizer.json"), "{\"version\": ").unwrap();
    assert_clean_error(
        &duet(
            &["--model", notok.to_str().unwrap(), "tokenize", "hi"],
            None,
        ),
        "tokenizer.json: cannot build tokenizer",
    );
    // Found by fuzzing: a syntax error inside the decoder (tokenizers' reader panicked on it), and a
    // vocabulary giving one id to two tokens (tokenizers takes it; its decoding is then random).
    let good = std::fs::read_to_string(tiny().join("tokenizer.json")).unwrap();
    let at = good.find("\"decoder\":").unwrap();
    let bad_decoder = format!("{}\"decoder\":{{1:2}},{}", &good[..at], &good[at..]);
    let mut dup: serde_json::Value = serde_json::from_str(&good).unwrap();
    let vocab = dup["model"]["vocab"].as_object_mut().unwrap();
    let second = vocab.iter().find(|e| e.1 == 1).unwrap().0.clone();
    vocab.insert(second, serde_json::json!(0));
    for (text, want) in [
        (bad_decoder, "key must be a string"),
        (dup.to_string(), "gives id 0 to more than one token"),
    ] {
        std::fs::write(notok.join("tokenizer.json"), text).unwrap();
        assert_clean_error(
            &duet(
                &["--model", notok.to_str().unwrap(), "tokenize", "hi"],
                None,
            ),
            want,
        );
    }
    // A shape that disagrees with the config.
    let shape = tiny_copy(
        &t.join("shape"),
        &[
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
            "model.safetensors",
        ],
    );
    let cfg = std::fs::read_to_string(tiny().join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 176", "\"intermediate_size\": 177");
    assert!(cfg.contains("177"));
    std::fs::write(shape.join("config.json"), cfg).unwrap();
    assert_clean_error(
        &duet(
            &[
                "--model",
                shape.to_str().unwrap(),
                "generate",
                "--prompt",
                "hi",
            ],
            None,
        ),
        "shape",
    );
    // A damaged checkpoint: its final norm's weights NaN, so every logit is NaN. Generation and label
    // scoring say so rather than answer with noise (the vocabulary's first token, or either label).
    let nan = tiny_copy(&t.join("nan"), &TINY_NOT_WEIGHTS);
    let mut st = std::fs::read(tiny().join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&st[8..8 + header_len]).unwrap();
    let norm = &header["model.norm.weight"];
    assert_eq!(norm["dtype"], "F32");
    let offsets = u32s(&norm["data_offsets"]);
    let data = 8 + header_len;
    st[data + offsets[0] as usize..data + offsets[1] as usize]
        .chunks_exact_mut(4)
        .for_each(|v| v.copy_from_slice(&f32::NAN.to_le_bytes()));
    std::fs::write(nan.join("model.safetensors"), &st).unwrap();
    let nan_model = nan.to_str().unwrap();
    assert_clean_error(
        &duet(&["--model", nan_model, "generate", "--prompt", "hi"], None),
        "the score of new token 1 is not a finite number",
    );
    assert_clean_error(
        &duet(&["--model", nan_model, "analyze", "hi", "--no-reply"], None),
        "is not a finite number (NaN or infinity): the model's weights may be damaged",
    );
    // Sampling options out of range, a negative one included (not taken for a flag).
    for bad in [
        ["--temperature", "-1"],
        ["--top-p", "2"],
        ["--repetition-penalty", "-0.5"],
    ] {
        let model = tiny();
        let mut args = vec![
            "--model",
            model.to_str().unwrap(),
            "generate",
            "--prompt",
            "hi",
        ];
        args.extend(bad);
        assert_clean_error(&duet(&args, None), "sampling options out of range");
    }
    // A file that is neither GGUF nor a directory.
    let junk = t.join("junk.bin");
    std::fs::write(&junk, b"hello").unwrap();
    assert_clean_error(
        &duet(&["--model", junk.to_str().unwrap(), "analyze", "hi"], None),
        "neither",
    );
    // Bad flags, empty text, unknown task.
    assert_clean_error(&duet(&["analyze", "--bogus"], None), "--bogus");
    // A missing argument is named: clap gives it on the line below its message.
    assert_clean_error(&duet(&["tokenize", "--json"], None), "<TEXT>");
    assert_clean_error(
        &duet(
            &["--model", tiny().to_str().unwrap(), "analyze", "   "],
            None,
        ),
        "empty",
    );
    assert_clean_error(
        &duet(
            &["--model", tiny().to_str().unwrap(), "task", "nope", "hi"],
            None,
        ),
        "unknown task",
    );
    // Text longer than the context (the tiny model holds 512 positions): said, not truncated.
    let long = "word ".repeat(2000);
    assert_clean_error(
        &duet(
            &["--model", tiny().to_str().unwrap(), "analyze", &long],
            None,
        ),
        "too long",
    );
    assert_clean_error(
        &duet(
            &[
                "--model",
                tiny().to_str().unwrap(),
                "generate",
                "--prompt",
                &long,
            ],
            None,
        ),
        "context",
    );
}

/// The prompt prefixes a run computed are read back from `$DUET_CACHE_DIR` by the next run, with the same
/// answer; an empty `$DUET_CACHE_DIR` turns that off.
#[test]
fn prefixes_are_kept_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let t = tiny();
    let args = [
        "--model",
        t.to_str().unwrap(),
        "--trace",
        "analyze",
        "hello there",
        "--json",
        "--max-new-tokens",
        "6",
    ];
    let answer = |o: &Output| {
        assert!(o.status.success(), "{}", stderr(o));
        let v: Value = serde_json::from_str(stdout(o).trim()).unwrap();
        (v["sentiment"].clone(), v["reply"].clone())
    };
    let first = duet_with(&args, None, d);
    assert_eq!(
        stderr(&first).matches("miss: prefix computed now").count(),
        2,
        "{}",
        stderr(&first)
    );
    let second = duet_with(&args, None, d);
    assert_eq!(
        stderr(&second).matches("read from the disk cache").count(),
        2,
        "{}",
        stderr(&second)
    );
    assert_eq!(answer(&first), answer(&second));
    let off = duet_with(&args, None, "");
    assert_eq!(
        stderr(&off).matches("miss: prefix computed now").count(),
        2,
        "{}",
        stderr(&off)
    );
    assert_eq!(answer(&off), answer(&first));
}

#[test]
fn real_model_dual_task() {
    let model = qwen2::fetch::resolve_model(None).unwrap();
    let m = model.to_str().unwrap();
    let o = duet(
        &[
            "--model",
            m,
            "analyze",
            "今天的实验终于成功了，太棒了！",
            "--json",
            "--max-new-tokens",
            "24",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["sentiment"]["label"], "positive");
    assert_eq!(v["sentiment"]["display"], "正面");
    assert!(!v["reply"].as_str().unwrap().is_empty());
    let o = duet(
        &[
            "--model",
            m,
            "analyze",
            "The package arrived broken and support never replied.",
            "--no-reply",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Sentiment: negative"), "{}", stdout(&o));
    // `duet fetch` prints the model's absolute path as its last stdout line.
    let o = duet(&["fetch"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).lines().last().unwrap(),
        qwen2::fetch::default_model_path().to_str().unwrap()
    );
}

#[test]
fn ctrl_c_stops_the_reply_not_the_chat() {
    use std::io::Read;
    let model = qwen2::fetch::resolve_model(None).unwrap();
    let args = [
        "--model",
        model.to_str().unwrap(),
        "chat",
        "--max-new-tokens",
        "400",
    ];
    let mut child = duet_command(&args, "").spawn().unwrap();
    let mut sin = child.stdin.take().unwrap();
    // A request this model answers at length (it declines "write a long story" in a dozen tokens, which
    // could end before the signal arrives and make Ctrl-C exit an idle chat, as it should).
    sin.write_all(
        "Explain in great detail how a hash map works, with code examples in three languages.\n"
            .as_bytes(),
    )
    .unwrap();
    sin.flush().unwrap();
    // Wait until the reply is streaming: the sentiment tag, its arrow, then some reply text.
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = out.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "chat ended before replying: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
        let s = String::from_utf8_lossy(&seen);
        if let Some(i) = s.find("→ ") {
            if s[i + "→ ".len()..].chars().count() >= 5 {
                break;
            }
        }
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(std::time::Duration::from_millis(500));
    sin.write_all(b"/quit\n").unwrap();
    drop(sin);
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "exit {:?}, stderr: {err}", o.status);
    assert!(err.contains("(reply stopped)"), "{err}");
}

#[test]
fn eval_reports_both_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("set.tsv");
    std::fs::write(
        &f,
        "# comment\nlabel\ttext\npositive\tgreat job\nnegative\t太差了\n正面\t很好\nawful\tnegative\n",
    )
    .unwrap();
    let o = duet(
        &[
            "--model",
            tiny().to_str().unwrap(),
            "eval",
            f.to_str().unwrap(),
            "--json",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // Into a pipe, each mode's progress comes as whole lines ending with the full count.
    let err = stderr(&o);
    assert!(!err.contains('\r'), "{err:?}");
    for line in ["label scoring: 4/4", "generation mode: 4/4"] {
        assert!(err.lines().any(|l| l == line), "{err}");
    }
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let modes = v["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);
    assert_eq!(modes[0]["mode"], "scoring");
    assert_eq!(modes[1]["mode"], "generation");
    for m in modes {
        assert_eq!(m["total"], 4);
        let acc = m["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(m["mean_ms"].as_f64().unwrap() > 0.0 && m["p95_ms"].as_f64().unwrap() > 0.0);
        let counted: u64 = m["confusion"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|r| r.as_object().unwrap().values())
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(counted, 4);
    }
    assert_eq!(
        modes[0]["unparsed"], 0,
        "label scoring always answers with a label"
    );
    // The file is read before the model loads: its error comes first, even with no model there.
    std::fs::write(&f, "positive\tok\nmaybe\tunsure\n").unwrap();
    assert_clean_error(
        &duet(
            &["--model", "/nonexistent.gguf", "eval", f.to_str().unwrap()],
            None,
        ),
        "line 2: no label in the first or the last column",
    );
    assert_clean_error(
        &duet(
            &[
                "--model",
                tiny().to_str().unwrap(),
                "eval",
                "/nonexistent.tsv",
            ],
            None,
        ),
        "nonexistent",
    );
}

/// `DUET_BACKEND` picks the kernels of quantized products where this CPU runs them (the trace names
/// them); a name it cannot run gets a warning, and the fastest serve.
#[test]
fn duet_backend_chooses_the_quantized_kernels() {
    let m = tiny();
    let run = |backend: &str| {
        let args = [
            "--model",
            m.to_str().unwrap(),
            "--trace",
            "generate",
            "--prompt",
            "hi",
            "--max-new-tokens",
            "1",
        ];
        let o = duet_command(&args, "")
            .env("DUET_BACKEND", backend)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    let chosen = |err: &str| -> String {
        let line = err
            .lines()
            .find(|l| l.contains("Backend::best"))
            .unwrap_or_else(|| panic!("no backend in the trace: {err}"));
        line.split("→ ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    // Plain Rust runs everywhere.
    let err = run("portable");
    assert_eq!(chosen(&err), "portable", "{err}");
    assert!(!err.contains("warning"), "{err}");
    let err = run("no-such-kernels");
    assert!(
        err.contains("duet: warning: DUET_BACKEND=\"no-such-kernels\""),
        "{err}"
    );
    assert!(err.contains("portable"), "{err}");
    assert!(["portable", "avx2", "avx512-vnni", "amx"].contains(&chosen(&err).as_str()));
}

#[test]
fn bench_json_has_every_figure() {
    // A short reply task over the shipped one (see the file): the tiny model's context cannot hold both
    // shipped prompts.
    let tasks = root().join("tests/data/tiny-tasks");
    let o = duet(
        &[
            "--model",
            tiny().to_str().unwrap(),
            "--tasks-dir",
            tasks.to_str().unwrap(),
            "bench",
            "--json",
            "--reps",
            "1",
            "--context",
            "200",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // Each machine figure is the best of its probes before and after the engine's measurements.
    for key in ["read_bandwidth_gbs", "fma_peak_gflops"] {
        let best = v["machine"][key].as_f64().unwrap();
        let probes: Vec<f64> = v["machine"]["probes_before_and_after"][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(probes.len(), 2, "{key}");
        assert!(probes.iter().all(|&p| p > 0.0 && p <= best), "{key}");
        assert!(probes.contains(&best), "{key}");
    }
    // Whether the run held still is said, with the reason when it did not (the shares depend on it).
    let steady = v["machine"]["steady"].as_bool().unwrap();
    let because = &v["machine"]["unsteady_because"];
    assert_eq!(steady, because.is_null(), "{because}");
    let kernels = v["machine"]["quantized_kernels"].as_str().unwrap();
    assert!(["portable", "avx2", "avx512-vnni", "amx"].contains(&kernels));
    // The FMA probe is as wide as the float GEMM, which is 512-bit with the AVX-512 kernels.
    let wide = ["avx512-vnni", "amx"].contains(&kernels);
    assert_eq!(
        v["machine"]["fma_probe_bits"].as_u64(),
        Some(if wide { 512 } else { 256 })
    );
    assert!(v["load_s"].as_f64().unwrap() >= 0.0);
    assert!(v["first_forward_64_tokens_s"].as_f64().unwrap() > 0.0);
    let p = v["prefill"].as_array().unwrap();
    assert_eq!(
        p.iter()
            .map(|x| x["tokens"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [64, 128]
    );
    for x in p {
        assert!(
            x["tok_s"].as_f64().unwrap() > 0.0 && x["fraction_of_peak"].as_f64().unwrap() > 0.0
        );
    }
    assert!(
        v["decode"]["tok_s"].as_f64().unwrap() > 0.0
            && v["decode"]["fraction_of_bandwidth"].as_f64().unwrap() > 0.0
    );
    // The weight stream: the decode's bytes per token, read at its rate, in the units the decode uses.
    let d = &v["decode"];
    let f = |k: &str| d[k].as_f64().unwrap();
    let per_token = v["model"]["weight_bytes_per_token"].as_f64().unwrap();
    assert!(f("weight_stream_gbs") > 0.0);
    assert!(
        (f("weight_stream_tok_s") * per_token / 1e9 / f("weight_stream_gbs") - 1.0).abs() < 1e-9
    );
    assert!(
        (f("fraction_of_weight_stream") * f("weight_stream_gbs") / f("effective_gbs") - 1.0).abs()
            < 1e-9
    );
    // The products alone, against the weight stream in the same units.
    assert!(f("products_gbs") > 0.0);
    assert!(
        (f("products_fraction_of_weight_stream") * f("weight_stream_gbs") / f("products_gbs")
            - 1.0)
            .abs()
            < 1e-9
    );
    // Three inputs: 15, 46 and 99 characters. The tiny model's 512-token context cannot hold the longest
    // one's prompt with the sentiment task's few-shot prefix: reported after the measured ones, not fatal.
    let dual = v["dual_task"].as_array().unwrap();
    assert_eq!(dual.len(), 3);
    for (measured, name) in dual[..2].iter().zip(["15 chars", "46 chars"]) {
        assert_eq!(measured["input"].as_str(), Some(name));
        let sentiment = measured["sentiment_ms"].as_f64().unwrap();
        assert!(sentiment > 0.0);
        assert!(measured["total_ms"].as_f64().unwrap() >= sentiment);
    }
    assert_eq!(dual[2]["input"].as_str(), Some("99 chars"));
    assert!(dual[2]["error"].as_str().unwrap().contains("too long"));
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);
    // Linux reports what it maps in huge pages, file-backed and anonymous, in bytes.
    for key in ["file_bytes", "anonymous_bytes"] {
        assert!(v["huge_pages"][key].as_u64().is_some(), "{key}");
    }
    let after = &v["decode_after_context"];
    assert_eq!(after["context"].as_u64(), Some(200));
    assert_eq!(after["tokens"].as_u64(), Some(128));
    assert!(
        after["tok_s"].as_f64().unwrap() > 0.0 && after["prefill_tok_s"].as_f64().unwrap() > 0.0
    );

    // A context the model cannot hold with the decoded tokens after it: a clear error, no panic.
    let o = duet(
        &[
            "--model",
            tiny().to_str().unwrap(),
            "bench",
            "--reps",
            "1",
            "--context",
            "400",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--context 400"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn convert_writes_a_directory_duet_loads_with_the_same_tokens() {
    let model = qwen2::fetch::resolve_model(None).unwrap();
    let m = model.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let o = duet(
        &["convert", m, out.to_str().unwrap(), "--dtype", "bf16"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).lines().last().unwrap(), out.to_str().unwrap());
    // Into a pipe, progress comes as whole lines (at most a dozen), never carriage returns.
    let err = stderr(&o);
    assert!(!err.contains('\r'), "{err:?}");
    let progress: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("converting:"))
        .collect();
    assert!((2..=12).contains(&progress.len()), "{err}");
    let last = progress.last().unwrap();
    let counts = last
        .trim_start_matches("converting: ")
        .trim_end_matches(" tensors");
    let (done, total) = counts.split_once('/').expect("done/total");
    assert_eq!(done, total, "{err}");
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let text = "今天的实验终于成功了，太棒了！ café";
    let a = duet(&["--model", m, "tokenize", "--json", text], None);
    let b = duet(
        &["--model", out.to_str().unwrap(), "tokenize", "--json", text],
        None,
    );
    assert!(b.status.success(), "{}", stderr(&b));
    assert_eq!(stdout(&a), stdout(&b));
    // Converting again onto an existing model is refused, not overwritten.
    assert_clean_error(
        &duet(&["convert", m, out.to_str().unwrap()], None),
        "exists",
    );
    assert_clean_error(
        &duet(
            &[
                "convert",
                "/nonexistent.gguf",
                tmp.path().join("x").to_str().unwrap(),
            ],
            None,
        ),
        "not a GGUF",
    );
}
