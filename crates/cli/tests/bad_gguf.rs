//! Malformed GGUF files through the real `duet` binary (issue 3): a truncated file, a tensor offset past the
//! end, an absurd string length, an absurd array length, a huge tensor count, an unknown tensor type, and the
//! real default model cut to its first megabyte. Each must give a non-zero exit (not a signal), exactly one
//! `duet: error: ` line as the last line of stderr, no panic, and come back within a few seconds (no huge
//! allocation, no reading past the end).
//!
//! The files come from a small GGUF writer below (the same approach as crates/qwen2/tests/gguf_common): a
//! valid tiny qwen2 model, checked to load, then corrupted byte by byte.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::duet_command;

/// A malformed file is rejected while its header is read: milliseconds. The margin is for a busy machine.
const TIME_LIMIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------------------
// A tiny GGUF writer
// ---------------------------------------------------------------------------------------------------------

const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STR: u32 = 8;
const T_ARR: u32 = 9;

const GGML_F32: u32 = 0;
/// A type ggml knows and Duet does not read.
const GGML_Q4_0: u32 = 2;
const ALIGNMENT: usize = 32;

enum V {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// Element type and elements (written without their own type tags, as GGUF does).
    Arr(u32, Vec<V>),
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U32(_) => T_U32,
            V::I32(_) => T_I32,
            V::F32(_) => T_F32,
            V::Bool(_) => T_BOOL,
            V::Str(_) => T_STR,
            V::Arr(..) => T_ARR,
        }
    }

    fn str(s: &str) -> V {
        V::Str(s.to_string())
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            V::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::Bool(v) => out.push(u8::from(*v)),
            V::Str(s) => put_str(out, s),
            V::Arr(t, items) => {
                out.extend_from_slice(&t.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for i in items {
                    i.write(out);
                }
            }
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Tensor {
    name: String,
    /// ggml order: dims[0] is the row length.
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
}

struct Gguf {
    kvs: Vec<(String, V)>,
    tensors: Vec<Tensor>,
}

/// Where the fields a test corrupts were written.
struct Layout {
    /// Byte position of each tensor's ggml type (u32) and data offset (u64) in its tensor info.
    type_at: Vec<usize>,
    offset_at: Vec<usize>,
    tensor_infos_start: usize,
    data_start: usize,
}

impl Gguf {
    fn bytes(&self) -> (Vec<u8>, Layout) {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            v.write(&mut out);
        }
        let tensor_infos_start = out.len();
        let (mut type_at, mut offset_at, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = 0usize;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            type_at.push(out.len());
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            offset_at.push(out.len());
            out.extend_from_slice(&(next as u64).to_le_bytes());
            offsets.push(next);
            next = (next + t.data.len()).next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        let data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.data);
        }
        let layout = Layout {
            type_at,
            offset_at,
            tensor_infos_start,
            data_start,
        };
        (out, layout)
    }
}

/// GPT-2's bytes_to_unicode: the characters byte-level vocabularies are spelled in.
fn byte_alphabet() -> Vec<char> {
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap()
            }
        })
        .collect()
}

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                             {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A small but complete qwen2 model, all F32: 2 layers, hidden 32, 4 heads / 2 KV heads, vocab 262.
fn tiny_qwen2() -> Gguf {
    const HIDDEN: u64 = 32;
    const FFN: u64 = 64;
    const KV: u64 = 16;
    const VOCAB: u64 = 262;
    let mut tokens: Vec<V> = byte_alphabet()
        .iter()
        .map(|c| V::Str(c.to_string()))
        .collect();
    for t in [
        "Ġt",
        "hi",
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<tool_call>",
    ] {
        tokens.push(V::str(t));
    }
    let mut types: Vec<V> = (0..258).map(|_| V::I32(1)).collect();
    types.extend([V::I32(3), V::I32(3), V::I32(3), V::I32(4)]);
    let kvs: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::str("qwen2")),
        ("general.name".into(), V::str("tiny")),
        ("qwen2.block_count".into(), V::U32(2)),
        ("qwen2.context_length".into(), V::U32(128)),
        ("qwen2.embedding_length".into(), V::U32(HIDDEN as u32)),
        ("qwen2.feed_forward_length".into(), V::U32(FFN as u32)),
        ("qwen2.attention.head_count".into(), V::U32(4)),
        ("qwen2.attention.head_count_kv".into(), V::U32(2)),
        ("qwen2.rope.freq_base".into(), V::F32(1_000_000.0)),
        (
            "qwen2.attention.layer_norm_rms_epsilon".into(),
            V::F32(1e-6),
        ),
        ("tokenizer.ggml.model".into(), V::str("gpt2")),
        ("tokenizer.ggml.pre".into(), V::str("qwen2")),
        ("tokenizer.ggml.tokens".into(), V::Arr(T_STR, tokens)),
        ("tokenizer.ggml.token_type".into(), V::Arr(T_I32, types)),
        (
            "tokenizer.ggml.merges".into(),
            V::Arr(T_STR, vec![V::str("Ġ t"), V::str("h i")]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(260)),
        ("tokenizer.ggml.padding_token_id".into(), V::U32(258)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(258)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        ("tokenizer.chat_template".into(), V::str(CHAT_TEMPLATE)),
    ];
    let mut seed = 7u64;
    let mut t = |name: &str, dims: &[u64]| -> Tensor {
        let n: u64 = dims.iter().product();
        let data = (0..n)
            .flat_map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = ((seed >> 33) % 2001) as f32 / 10_000.0 - 0.1;
                v.to_le_bytes()
            })
            .collect();
        Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type: GGML_F32,
            data,
        }
    };
    let mut tensors = vec![
        t("token_embd.weight", &[HIDDEN, VOCAB]),
        t("output_norm.weight", &[HIDDEN]),
    ];
    for l in 0..2 {
        let b = |s: &str| format!("blk.{l}.{s}");
        tensors.push(t(&b("attn_norm.weight"), &[HIDDEN]));
        tensors.push(t(&b("attn_q.weight"), &[HIDDEN, HIDDEN]));
        tensors.push(t(&b("attn_q.bias"), &[HIDDEN]));
        tensors.push(t(&b("attn_k.weight"), &[HIDDEN, KV]));
        tensors.push(t(&b("attn_k.bias"), &[KV]));
        tensors.push(t(&b("attn_v.weight"), &[HIDDEN, KV]));
        tensors.push(t(&b("attn_v.bias"), &[KV]));
        tensors.push(t(&b("attn_output.weight"), &[HIDDEN, HIDDEN]));
        tensors.push(t(&b("ffn_norm.weight"), &[HIDDEN]));
        tensors.push(t(&b("ffn_gate.weight"), &[HIDDEN, FFN]));
        tensors.push(t(&b("ffn_up.weight"), &[HIDDEN, FFN]));
        tensors.push(t(&b("ffn_down.weight"), &[FFN, HIDDEN]));
    }
    Gguf { kvs, tensors }
}

fn patch_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn patch_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Byte position of the first occurrence of `needle`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| panic!("{:?} not in the file", String::from_utf8_lossy(needle)))
}

/// Position of the u64 length of a metadata array: key, value type 9, element type, then the length.
fn array_len_at(b: &[u8], key: &str) -> usize {
    find(b, key.as_bytes()) + key.len() + 4 + 4
}

// ---------------------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------------------

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs `duet ARGS` with no stdin; kills it (and fails) if it runs past the time limit.
fn duet(args: &[&str]) -> Run {
    let start = Instant::now();
    let mut child = duet_command(args, "")
        .stdin(Stdio::null())
        .spawn()
        .expect("run duet");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for duet") {
            break s;
        }
        if start.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("duet {args:?} still running after {TIME_LIMIT:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    Run {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        elapsed,
    }
}

/// `duet --model FILE tokenize hi` and `duet --model FILE analyze hi` both fail cleanly, the error mentioning
/// `needle` (case-insensitive). Returns the error line of the first command.
fn assert_rejected(file: &Path, needle: &str) -> String {
    let mut first = None;
    for cmd in [&["tokenize", "hi"][..], &["analyze", "hi"][..]] {
        let mut args = vec!["--model", file.to_str().unwrap()];
        args.extend_from_slice(cmd);
        let r = duet(&args);
        let what = format!("duet {}", args.join(" "));
        assert!(
            !r.status.success(),
            "{what}: succeeded; stdout: {}",
            r.stdout
        );
        assert!(
            r.status.code().is_some(),
            "{what}: killed by a signal ({:?}); stderr: {}",
            r.status,
            r.stderr
        );
        assert!(
            !r.stderr.contains("panicked") && !r.stderr.contains("RUST_BACKTRACE"),
            "{what}: panicked: {}",
            r.stderr
        );
        assert!(
            r.stderr.ends_with('\n'),
            "{what}: stderr does not end with a newline: {:?}",
            r.stderr
        );
        let last = r.stderr.lines().last().unwrap_or("");
        assert!(
            last.starts_with("duet: error: "),
            "{what}: last stderr line {last:?}; stderr: {}",
            r.stderr
        );
        // The error is exactly one line: every other stderr line (progress, if any) comes before it, and
        // none of them is a second error or a continuation of it.
        assert_eq!(
            r.stderr.matches("duet: error: ").count(),
            1,
            "{what}: stderr: {}",
            r.stderr
        );
        assert!(!last.contains('\r'), "{what}: {last:?}");
        assert!(
            last.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: {last:?} should mention {needle:?}"
        );
        assert!(r.elapsed < TIME_LIMIT, "{what}: took {:?}", r.elapsed);
        println!("{what}\n    {last}");
        first.get_or_insert(last.to_string());
    }
    first.unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// The uncorrupted file loads and tokenizes: the errors below come from the corruption, not the writer.
#[test]
fn the_tiny_model_itself_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = tiny_qwen2().bytes();
    let p = write(dir.path(), "ok.gguf", &bytes);
    let r = duet(&["--model", p.to_str().unwrap(), "tokenize", "hi"]);
    assert!(r.status.success(), "stderr: {}", r.stderr);
    assert!(r.stdout.contains("257"), "{}", r.stdout);
}

/// The reader reports a short file as "file truncated", a count or array that "cannot fit" in the bytes
/// left, or a tensor extending "past the end", depending on where the cut falls.
fn says_too_short(line: &str) -> bool {
    ["truncated", "cannot fit", "past the end"]
        .iter()
        .any(|w| line.contains(w))
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, layout) = tiny_qwen2().bytes();
    let tokens_at = find(&bytes, b"tokenizer.ggml.tokens");
    let cuts = [
        ("empty", 0),
        ("magic_only", 4),
        ("inside_the_counts", 13),
        ("inside_a_key", 30),
        ("inside_the_vocab", tokens_at + 400),
        ("inside_the_tensor_infos", layout.tensor_infos_start + 50),
        ("before_the_data", layout.data_start - 1),
        ("inside_the_first_tensor", layout.data_start + 100),
        ("one_byte_short", bytes.len() - 1),
    ];
    for (name, cut) in cuts {
        let p = write(dir.path(), &format!("{name}.gguf"), &bytes[..cut]);
        // A file shorter than the magic is not recognised as GGUF at all; that is a clean error too.
        let needle = if cut < 4 { "gguf" } else { "" };
        let line = assert_rejected(&p, needle);
        if cut >= 4 {
            assert!(says_too_short(&line), "{name}: {line}");
        }
    }
}

#[test]
fn tensor_offset_past_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, layout) = tiny_qwen2().bytes();
    let last = layout.offset_at.len() - 1;
    for (i, off) in [
        (last, 1u64 << 40),
        (last, u64::MAX - 31),
        (0, 1 << 62),
        // Aligned and only just past the end of the data.
        (
            last,
            (bytes.len() - layout.data_start).next_multiple_of(ALIGNMENT) as u64,
        ),
    ] {
        let mut b = bytes.clone();
        patch_u64(&mut b, layout.offset_at[i], off);
        let p = write(dir.path(), "offset.gguf", &b);
        assert_rejected(&p, "past the end");
    }
}

#[test]
fn absurd_string_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = tiny_qwen2().bytes();
    for len in [u64::MAX, 1 << 40, (1 << 32) + 5, 100_000_000] {
        // The first key's length (right after the 24-byte header).
        let mut b = bytes.clone();
        patch_u64(&mut b, 24, len);
        assert_rejected(&write(dir.path(), "key.gguf", &b), "length");
        // A string value: the chat template.
        let mut b = bytes.clone();
        let at = find(&b, CHAT_TEMPLATE.as_bytes()) - 8;
        assert_eq!(read_u64(&b, at), CHAT_TEMPLATE.len() as u64);
        patch_u64(&mut b, at, len);
        assert_rejected(
            &write(dir.path(), "value.gguf", &b),
            "tokenizer.chat_template",
        );
        // One vocabulary string inside an array.
        let mut b = bytes.clone();
        let at = find(&b, "<|im_start|>".as_bytes()) - 8;
        patch_u64(&mut b, at, len);
        assert_rejected(
            &write(dir.path(), "element.gguf", &b),
            "tokenizer.ggml.tokens",
        );
        // A tensor name.
        let mut b = bytes.clone();
        let at = find(&b, b"token_embd.weight") - 8;
        patch_u64(&mut b, at, len);
        assert_rejected(&write(dir.path(), "tensor_name.gguf", &b), "tensor #0");
    }
}

#[test]
fn absurd_array_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = tiny_qwen2().bytes();
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
    ] {
        let at = array_len_at(&bytes, key);
        let true_len = read_u64(&bytes, at);
        assert!(true_len == 262 || true_len == 2, "{key}: {true_len}");
        for len in [u64::MAX, 1 << 60, 1 << 40, (1 << 24) + 1, 1 << 20] {
            let mut b = bytes.clone();
            patch_u64(&mut b, at, len);
            assert_rejected(&write(dir.path(), "array.gguf", &b), key);
        }
    }
}

#[test]
fn huge_tensor_and_metadata_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = tiny_qwen2().bytes();
    for n in [u64::MAX, 1 << 60, 1 << 40, 1 << 32, 1_000_000] {
        let mut b = bytes.clone();
        patch_u64(&mut b, 8, n);
        assert_rejected(&write(dir.path(), "tensors.gguf", &b), "tensor count");
        let mut b = bytes.clone();
        patch_u64(&mut b, 16, n);
        assert_rejected(&write(dir.path(), "kvs.gguf", &b), "metadata count");
    }
}

#[test]
fn unknown_and_unsupported_tensor_types() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, layout) = tiny_qwen2().bytes();
    // Type ids ggml never had: the error names the tensor and the id.
    for ty in [99u32, 0xFFFF_FFFF, 40] {
        let mut b = bytes.clone();
        patch_u32(&mut b, layout.type_at[0], ty);
        let line = assert_rejected(&write(dir.path(), "type.gguf", &b), "unknown ggml type");
        assert!(
            line.contains("token_embd.weight") && line.contains(&ty.to_string()),
            "{line}"
        );
    }
    // A real ggml type Duet does not read (Q4_0), with correctly sized data: named with the tensor.
    let mut g = tiny_qwen2();
    let t = g
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.0.ffn_up.weight")
        .unwrap();
    t.ggml_type = GGML_Q4_0;
    t.data = vec![0; (t.dims.iter().product::<u64>() / 32 * 18) as usize];
    let (b, _) = g.bytes();
    let line = assert_rejected(&write(dir.path(), "q4_0.gguf", &b), "not supported");
    assert!(line.contains("Q4_0"), "{line}");
    assert!(line.contains("ffn_up"), "{line}");
    assert!(line.contains("q4_0.gguf"), "the file is named: {line}");
}

#[test]
fn the_real_model_cut_to_one_megabyte() {
    let model = qwen2::fetch::resolve_model(None)
        .unwrap_or_else(|e| panic!("cannot get the default model: {e}"));
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(&model)
        .and_then(|mut f| f.read_exact(&mut head))
        .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
    assert_eq!(
        &head[..4],
        b"GGUF",
        "{} is not a GGUF file",
        model.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "cut.gguf", &head);
    let line = assert_rejected(&p, "");
    assert!(says_too_short(&line), "{line}");
    assert!(
        line.contains("cut.gguf"),
        "the error names the file: {line}"
    );
}
