//! Reading a BPE `tokenizer.json` quickly: the same tokenizer `tokenizers` builds from the file, in about
//! half the time.
//!
//! Why: a Hugging Face directory's load time was the tokenizer's (~0.4 s of ~0.6 s; the weights are
//! mapped in milliseconds). `tokenizers` reads the merge list as an untagged enum: serde first buffers all
//! 151,000 entries, tries them as pairs, then again as strings. Here the two large parts (vocabulary and
//! merges) are read once, typed, and everything else goes through `tokenizers`' own types, then the same
//! builder calls its reader makes. Anything this reader does not cover (another model type, truncation,
//! padding, a key `tokenizers` would refuse) returns `None`, and the caller takes `tokenizers`' full
//! reader; the two accept the same files, which the `tokenizer_json` fuzz target checks.

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
};

/// The parts of `tokenizer.json` this reader covers. Another key makes `tokenizers`' reader fail (it
/// does not skip the value of a key it does not know; fuzzing found this), so it makes this one decline.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizerFile {
    /// Missing is fine, as for `tokenizers`; anything but the string "1.0" (null too) is not.
    #[serde(default = "version_one")]
    version: serde_json::Value,
    #[serde(default)]
    truncation: serde_json::Value,
    #[serde(default)]
    padding: serde_json::Value,
    #[serde(default)]
    added_tokens: Vec<FileAddedToken>,
    // Read as JSON values first, then as `tokenizers`' types: its readers of these types panic on some
    // malformed JSON (a decoder with a non-string key, say) instead of returning an error; from a value
    // they cannot meet a syntax error.
    normalizer: Option<serde_json::Value>,
    pre_tokenizer: Option<serde_json::Value>,
    post_processor: Option<serde_json::Value>,
    decoder: Option<serde_json::Value>,
    model: BpeFile,
}

fn version_one() -> serde_json::Value {
    "1.0".into()
}

#[derive(Deserialize)]
struct FileAddedToken {
    // Required, as in `tokenizers`' reader, though unused: an added token's id is the one its content
    // has in the vocabulary, or the next free one (`add_tokens`).
    #[allow(dead_code)]
    id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

/// The `model` object of a BPE tokenizer; absent options keep the builder's defaults, and another key
/// fails, as in `tokenizers`' reader.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BpeFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
    vocab: Vocab,
    #[serde(deserialize_with = "merge_list")]
    merges: Merges,
}

/// Merges as `["a b", …]` (older files) or `[["a", "b"], …]`, each entry read once.
fn merge_list<'de, D: Deserializer<'de>>(d: D) -> Result<Merges, D::Error> {
    struct List;
    impl<'de> Visitor<'de> for List {
        type Value = Merges;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of merges")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merges, A::Error> {
            let mut merges = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            let (mut strings, mut pairs) = (false, false);
            while let Some(merge) = seq.next_element()? {
                match merge {
                    Merge::Pair(a, b) => {
                        pairs = true;
                        merges.push((a, b));
                    }
                    Merge::String(a, b) => {
                        strings = true;
                        merges.push((a, b));
                    }
                    // `tokenizers` skips these lines of the old merges.txt format too.
                    Merge::Version => strings = true,
                }
            }
            if strings && pairs {
                return Err(de::Error::custom("merges mix strings and pairs"));
            }
            Ok(merges)
        }
    }
    d.deserialize_seq(List)
}

enum Merge {
    String(String, String),
    Pair(String, String),
    Version,
}

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Merge, D::Error> {
        struct One;
        impl<'de> Visitor<'de> for One {
            type Value = Merge;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a merge: \"a b\" or [\"a\", \"b\"]")
            }
            // `tokenizers` splits a string merge at spaces and wants exactly two parts.
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Merge, E> {
                if s.starts_with("#version") {
                    return Ok(Merge::Version);
                }
                match s.split_once(' ') {
                    Some((a, b)) if !b.contains(' ') => {
                        Ok(Merge::String(a.to_string(), b.to_string()))
                    }
                    _ => Err(E::custom(format!("merge {s:?} is not two tokens"))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge, A::Error> {
                let a: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let b: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(Merge::Pair(a, b))
            }
        }
        d.deserialize_any(One)
    }
}

/// The tokenizer `text` (a `tokenizer.json`) describes, if it is a BPE tokenizer without truncation or
/// padding; `None` for anything else, including errors, which `tokenizers`' own reader then reports.
/// `Some(Err)` refuses a vocabulary that gives one id to two tokens: `tokenizers` accepts it, and which
/// token the id then decodes to depends on its hash map's random iteration order (fuzzing found this).
pub fn read_bpe(text: &str) -> Option<Result<tokenizers::Tokenizer, String>> {
    let file: TokenizerFile = serde_json::from_str(text).ok()?;
    let supported = file.version == "1.0"
        && file.truncation.is_null()
        && file.padding.is_null()
        && file.model.kind.as_deref().is_none_or(|k| k == "BPE");
    if !supported {
        return None;
    }
    let m = file.model;
    let mut ids: Vec<u32> = m.vocab.values().copied().collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        let id = w[0];
        let mut tokens: Vec<&String> = m.vocab.iter().filter(|e| *e.1 == id).map(|e| e.0).collect();
        tokens.sort();
        return Some(Err(format!(
            "the vocabulary gives id {id} to more than one token ({tokens:?})"
        )));
    }
    let mut bpe = BPE::builder().vocab_and_merges(m.vocab, m.merges);
    if let Some(p) = m.dropout {
        bpe = bpe.dropout(p);
    }
    if let Some(t) = m.unk_token {
        bpe = bpe.unk_token(t);
    }
    if let Some(p) = m.continuing_subword_prefix {
        bpe = bpe.continuing_subword_prefix(p);
    }
    if let Some(s) = m.end_of_word_suffix {
        bpe = bpe.end_of_word_suffix(s);
    }
    if let Some(f) = m.fuse_unk {
        bpe = bpe.fuse_unk(f);
    }
    if let Some(f) = m.byte_fallback {
        bpe = bpe.byte_fallback(f);
    }
    if let Some(f) = m.ignore_merges {
        bpe = bpe.ignore_merges(f);
    }
    fn part<T: serde::de::DeserializeOwned>(v: Option<serde_json::Value>) -> Option<Option<T>> {
        v.map(serde_json::from_value).transpose().ok()
    }
    let normalizer: Option<NormalizerWrapper> = part(file.normalizer)?;
    let pre_tokenizer: Option<PreTokenizerWrapper> = part(file.pre_tokenizer)?;
    let post_processor: Option<PostProcessorWrapper> = part(file.post_processor)?;
    let decoder: Option<DecoderWrapper> = part(file.decoder)?;
    let mut tok = tokenizers::Tokenizer::new(bpe.build().ok()?);
    tok.with_normalizer(normalizer)
        .with_pre_tokenizer(pre_tokenizer)
        .with_post_processor(post_processor)
        .with_decoder(decoder);
    // As `tokenizers` does: added tokens keep the id their content has, or get the next free one.
    let added: Vec<AddedToken> = file.added_tokens.into_iter().map(|t| t.token).collect();
    tok.add_tokens(&added);
    Some(Ok(tok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The tiny models' `tokenizer.json` files, which transformers wrote (Qwen2's pipeline, a small
    /// vocabulary).
    fn fixtures() -> Vec<(String, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny");
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path().join("tokenizer.json");
            if path.is_file() {
                files.push((
                    path.display().to_string(),
                    std::fs::read_to_string(&path).unwrap(),
                ));
            }
        }
        assert!(files.len() >= 3, "fixtures in {}", dir.display());
        files
    }

    const TEXTS: &[&str] = &[
        "Hello, world!",
        "  leading and trailing spaces  ",
        "快递太慢了，客服也不理人。",
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
        "numbers 1234567 and 3.14, emoji 😄👍, tabs\tand\r\nnewlines\n\n",
        "I'm sure you'll see we've done it'd be",
        "",
    ];

    /// Our reader and `tokenizers`' give the same ids, pieces and decoded text.
    fn assert_same(what: &str, text: &str) {
        let ours = read_bpe(text)
            .unwrap_or_else(|| panic!("{what}: not read"))
            .unwrap();
        let theirs: tokenizers::Tokenizer = text.parse().unwrap();
        assert_eq!(
            ours.get_vocab_size(true),
            theirs.get_vocab_size(true),
            "{what}"
        );
        for s in TEXTS {
            let a = ours.encode(*s, false).unwrap();
            let b = theirs.encode(*s, false).unwrap();
            assert_eq!(a.get_ids(), b.get_ids(), "{what}: {s:?}");
            assert!(!s.is_empty() || a.get_ids().is_empty());
            for skip in [false, true] {
                assert_eq!(
                    ours.decode(a.get_ids(), skip).unwrap(),
                    theirs.decode(b.get_ids(), skip).unwrap(),
                    "{what}: {s:?}"
                );
            }
        }
        let v: Value = serde_json::from_str(text).unwrap();
        for t in v["added_tokens"].as_array().unwrap() {
            let content = t["content"].as_str().unwrap();
            assert_eq!(ours.token_to_id(content), theirs.token_to_id(content));
            assert_eq!(
                ours.token_to_id(content),
                Some(t["id"].as_u64().unwrap() as u32)
            );
        }
    }

    #[test]
    fn reads_what_tokenizers_reads() {
        for (path, text) in fixtures() {
            assert_same(&path, &text);
            // The same merges as pairs (newer files) and as strings (older ones, also with a
            // `#version` line first).
            let mut v: Value = serde_json::from_str(&text).unwrap();
            let pairs: Vec<(String, String)> = v["model"]["merges"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| match m {
                    Value::String(m) => {
                        let (a, b) = m.split_once(' ').unwrap();
                        (a.to_string(), b.to_string())
                    }
                    m => (m[0].as_str().unwrap().into(), m[1].as_str().unwrap().into()),
                })
                .collect();
            assert!(!pairs.is_empty());
            v["model"]["merges"] = pairs.iter().map(|(a, b)| json!([a, b])).collect();
            assert_same(&format!("{path} (pairs)"), &v.to_string());
            let strings = pairs.iter().map(|(a, b)| json!(format!("{a} {b}")));
            v["model"]["merges"] = strings.clone().collect();
            assert_same(&format!("{path} (strings)"), &v.to_string());
            v["model"]["merges"] = std::iter::once(json!("#version: 0.2"))
                .chain(strings)
                .collect();
            assert_same(&format!("{path} (#version)"), &v.to_string());
        }
    }

    #[test]
    fn leaves_the_rest_to_tokenizers() {
        let (_, text) = fixtures().remove(0);
        let base: Value = serde_json::from_str(&text).unwrap();
        let edit = |f: &dyn Fn(&mut Value)| {
            let mut v = base.clone();
            f(&mut v);
            v.to_string()
        };
        let cases = [
            (
                "truncation",
                edit(
                    &|v| v["truncation"] = json!({"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}),
                ),
            ),
            (
                "another model",
                edit(&|v| v["model"]["type"] = json!("WordPiece")),
            ),
            ("another version", edit(&|v| v["version"] = json!("2.0"))),
            ("an unknown key", edit(&|v| v["truncatio*"] = json!(null))),
            ("a null version", edit(&|v| v["version"] = json!(null))),
            (
                "an unknown model key",
                edit(&|v| v["model"]["vocab2"] = json!({})),
            ),
            (
                "no merges",
                edit(&|v| {
                    v["model"].as_object_mut().unwrap().remove("merges");
                }),
            ),
            (
                "a bad merge",
                edit(&|v| v["model"]["merges"][0] = json!("a b c")),
            ),
            (
                // The fixtures' merges are pairs: one of them spelled as a string.
                "mixed merges",
                edit(&|v| {
                    let m = &v["model"]["merges"][0];
                    let joined = format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap());
                    v["model"]["merges"][0] = json!(joined);
                }),
            ),
            ("not JSON", text[..text.len() / 2].to_string()),
        ];
        for (what, text) in cases {
            assert!(read_bpe(&text).is_none(), "{what}");
        }
        // Two tokens with one id: refused, naming them.
        let mut v = base.clone();
        let vocab = v["model"]["vocab"].as_object_mut().unwrap();
        let first = vocab.iter().find(|e| e.1 == 0).unwrap().0.clone();
        let other = vocab.iter().find(|e| e.1 == 1).unwrap().0.clone();
        vocab.insert(other.clone(), json!(0));
        let err = read_bpe(&v.to_string()).unwrap().err().unwrap();
        assert!(
            err.contains("id 0") && err.contains(&first) && err.contains(&other),
            "{err}"
        );
    }
}
