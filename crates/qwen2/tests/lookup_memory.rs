//! The default model's untied embedding table is only looked up, a row per token: the rows a prompt uses
//! must not bring the table into the process's resident set. Through the mapping they did: each row's
//! page fault mapped the whole 2 MiB page-cache folio around it, and 50 rows spread over the vocabulary
//! had ~76 MB of the 94 MB table resident. Alone in its own test binary, so that nothing else maps or
//! reads the file while it counts.
//!
//! The model is `$DUET_MODEL` if set, else the default model, fetched first if missing.

use qwen2::matrix::WeightForm;
use qwen2::weights::{gguf, DType};

/// This process's resident file-backed memory (`RssFile` in `/proc/self/status`), in bytes.
#[cfg(target_os = "linux")]
fn rss_file_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("an RssFile line");
    kib * 1024
}

#[cfg(target_os = "linux")]
#[test]
fn looked_up_rows_do_not_map_the_table_in() {
    let path = qwen2::fetch::resolve_model(None)
        .unwrap_or_else(|e| panic!("this test needs the default model ({e})"));
    let loaded = qwen2::load::load_with(&path, WeightForm::Native).unwrap();
    let c = &loaded.model.config;
    assert!(
        !c.tie_word_embeddings,
        "the default model's table is untied"
    );
    let (vocab, h) = (c.vocab_size, c.hidden_size);

    // 200 rows spread over the whole vocabulary: with 2 MiB folios, every one in a folio of its own.
    let rows: Vec<usize> = (0..200).map(|i| i * (vocab - 1) / 199).collect();
    let before = rss_file_bytes();
    let mut looked_up = vec![0f32; rows.len() * h];
    for (&r, out) in rows.iter().zip(looked_up.chunks_exact_mut(h)) {
        loaded.model.embed_tokens.row_into(r, out);
    }
    let grown = rss_file_bytes().saturating_sub(before);
    // The rows themselves are 200 × 616 bytes; allow a few pages of anything else the file holds.
    assert!(
        grown < 4 << 20,
        "looking up {} rows grew the resident file pages by {:.1} MiB",
        rows.len(),
        grown as f64 / (1 << 20) as f64
    );

    // And they are the table's rows: dequantized here from the tensor's bytes as the file stores them.
    let file = gguf::load(&path).unwrap();
    let t = file.store.get("model.embed_tokens.weight").unwrap();
    assert_eq!(t.dtype, DType::Q5_0);
    let rb = t.dtype.bytes_for(h).unwrap();
    for (&r, got) in rows.iter().zip(looked_up.chunks_exact(h)) {
        let bytes = &t.bytes.as_slice()[r * rb..(r + 1) * rb];
        let want = qwen2::weights::quant::dequantize(DType::Q5_0, bytes, h).unwrap();
        assert_eq!(got, &want[..], "row {r}");
    }
}
