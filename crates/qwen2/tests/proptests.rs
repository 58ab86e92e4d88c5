//! Property tests: tokenizer round trips on the tiny fixture's tokenizer (Qwen2's byte-level BPE with NFC
//! normalization), streaming that loses nothing, and the SIMD kernels against their scalar references on
//! random shapes and values.

use proptest::collection::vec;
use proptest::prelude::*;
use qwen2::kernels::matmul::{bf16, f16, matmul, matmul_scalar, WeightSlice};
use qwen2::kernels::norm::{rmsnorm, rmsnorm_scalar};
use qwen2::{TextStream, Tokenizer};
use std::path::PathBuf;
use std::sync::OnceLock;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data/tiny/qwen25-gqa-untied-f32");
        Tokenizer::from_hf_dir(&dir).unwrap()
    })
}

const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

fn has_special(s: &str) -> bool {
    SPECIAL.iter().any(|t| s.contains(t))
}

fn round_trip(s: &str) -> String {
    let tok = tokenizer();
    tok.decode(&tok.encode(s).unwrap(), false).unwrap()
}

/// The pieces a [`TextStream`] emits for `ids`, concatenated.
fn streamed(ids: &[u32]) -> String {
    let tok = tokenizer();
    let mut st = TextStream::new();
    let mut out = String::new();
    for &id in ids {
        out.push_str(&st.push(tok, id).unwrap());
    }
    out.push_str(&st.finish(tok).unwrap());
    out
}

/// Characters NFC leaves alone whatever their neighbours: ASCII, Greek and Cyrillic letters, CJK unified
/// ideographs, precomposed Hangul syllables (no conjoining jamo to combine with) and emoji. For text made
/// of these, NFC(s) == s, so the round trip must be exact.
fn nfc_stable_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => 0u32..0x80,
        1 => 0x3B1u32..=0x3C9,
        1 => 0x410u32..=0x44F,
        2 => 0x4E00u32..=0x9FFF,
        1 => 0xAC00u32..=0xD7A3,
        1 => 0x1F600u32..=0x1F64F,
    ]
    .prop_map(|c| char::from_u32(c).unwrap())
}

fn nfc_stable_string() -> impl Strategy<Value = String> {
    vec(nfc_stable_char(), 0..80).prop_map(|v| v.into_iter().collect())
}

proptest! {
    /// decode(encode(s)) is NFC(s); NFC is idempotent, so a second round trip changes nothing.
    #[test]
    fn round_trip_is_idempotent(s in any::<String>()) {
        prop_assume!(!has_special(&s));
        let once = round_trip(&s);
        prop_assert_eq!(round_trip(&once), once);
    }

    /// ASCII (control characters and NUL included) is its own NFC form: exact round trip.
    #[test]
    fn ascii_round_trips_exactly(bytes in vec(0u8..0x80, 0..200)) {
        let s = String::from_utf8(bytes).unwrap();
        prop_assume!(!has_special(&s));
        prop_assert_eq!(round_trip(&s), s);
    }

    #[test]
    fn nfc_stable_text_round_trips_exactly(s in nfc_stable_string()) {
        prop_assert_eq!(round_trip(&s), s);
    }

    /// Special-token text between ordinary text is recognised, and decodes back to itself.
    #[test]
    fn special_tokens_round_trip(parts in vec((nfc_stable_string(), 0usize..3), 0..5)) {
        let s: String = parts.iter().map(|(t, i)| format!("{t}{}", SPECIAL[*i])).collect();
        let tok = tokenizer();
        let ids = tok.encode(&s).unwrap();
        let specials = ids.iter().filter(|&&id| SPECIAL.iter().any(|t| tok.id_of(t) == Some(id))).count();
        prop_assert_eq!(specials, parts.len());
        prop_assert_eq!(tok.decode(&ids, false).unwrap(), s);
    }

    /// Streaming one id at a time loses and duplicates nothing: the pieces add up to the whole decode
    /// (even when a character's bytes are split across tokens).
    #[test]
    fn stream_pieces_add_up_to_the_decode(s in any::<String>()) {
        let tok = tokenizer();
        let ids = tok.encode(&s).unwrap();
        prop_assert_eq!(streamed(&ids), tok.decode(&ids, true).unwrap());
    }

    /// Any ids at all, including byte tokens that never complete a character and special tokens: the
    /// pieces still add up to the whole decode (the stream decodes a window, not the whole list).
    #[test]
    fn stream_of_any_ids_adds_up_to_the_decode(picks in vec(any::<proptest::sample::Index>(), 0..120)) {
        let tok = tokenizer();
        let ids: Vec<u32> = picks.iter().map(|i| i.index(tok.vocab_size()) as u32).collect();
        prop_assert_eq!(streamed(&ids), tok.decode(&ids, true).unwrap());
    }

    #[test]
    fn stream_of_nfc_stable_text_is_the_text(s in nfc_stable_string()) {
        let ids = tokenizer().encode(&s).unwrap();
        prop_assert_eq!(streamed(&ids), s);
    }
}

/// One matmul case: shape, a scale for the values (so products are not all of one magnitude), weights
/// (`rows × cols`) and activations (`t × cols`) in [-1, 1) before scaling.
fn matmul_case(
    tokens: std::ops::RangeInclusive<usize>,
) -> impl Strategy<Value = (usize, usize, usize, f32, Vec<f32>, Vec<f32>)> {
    (
        1usize..=70,
        1usize..=300,
        tokens,
        prop_oneof![Just(1e-3f32), Just(1.0), Just(1e3)],
    )
        .prop_flat_map(|(rows, cols, t, scale)| {
            (
                Just(rows),
                Just(cols),
                Just(t),
                Just(scale),
                vec(-1.0f32..1.0, rows * cols),
                vec(-1.0f32..1.0, t * cols),
            )
        })
}

/// `got` equals the reference up to f32 summation-order error: each entry within
/// `2·cols·ε·Σ|wᵢxᵢ|` of it (the standard bound for two orders of summing the same products).
fn check_matmul(
    w: &[f32],
    x: &[f32],
    rows: usize,
    cols: usize,
    got: &[f32],
    want: &[f32],
) -> Result<(), TestCaseError> {
    for (i, (g, r)) in got.iter().zip(want).enumerate() {
        let (ti, row) = (i / rows, i % rows);
        let abs_sum: f32 = (0..cols)
            .map(|k| (w[row * cols + k] * x[ti * cols + k]).abs())
            .sum();
        let tol = 2.0 * cols as f32 * f32::EPSILON * abs_sum + f32::MIN_POSITIVE;
        prop_assert!(
            (g - r).abs() <= tol,
            "token {ti} row {row}: {g} vs {r} (tolerance {tol})"
        );
    }
    Ok(())
}

/// Every weight form through `matmul` against `matmul_scalar` on the same (widened) weights.
fn check_all_forms(
    rows: usize,
    cols: usize,
    t: usize,
    scale: f32,
    w: &[f32],
    x: &[f32],
) -> Result<(), TestCaseError> {
    let w: Vec<f32> = w.iter().map(|v| v * scale).collect();
    let x: Vec<f32> = x.iter().map(|v| v / scale.sqrt()).collect();
    let mut got = vec![f32::NAN; t * rows];
    let mut want = vec![f32::NAN; t * rows];

    matmul(WeightSlice::F32(&w), rows, cols, &x, t, &mut got);
    matmul_scalar(&w, rows, cols, &x, t, &mut want);
    check_matmul(&w, &x, rows, cols, &got, &want)?;

    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let wbf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
    matmul(WeightSlice::BF16(&wb), rows, cols, &x, t, &mut got);
    matmul_scalar(&wb, rows, cols, &x, t, &mut want);
    check_matmul(&wbf, &x, rows, cols, &got, &want)?;

    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    let whf: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
    matmul(WeightSlice::F16(&wh), rows, cols, &x, t, &mut got);
    matmul_scalar(&wh, rows, cols, &x, t, &mut want);
    check_matmul(&whf, &x, rows, cols, &got, &want)
}

proptest! {
    /// Decode (one token) and short prefills: rows 1..=70, cols 1..=300, tokens 1..=9.
    #[test]
    fn matmul_matches_scalar_reference((rows, cols, t, scale, w, x) in matmul_case(1..=9)) {
        check_all_forms(rows, cols, t, scale, &w, &x)?;
    }

    /// Longer prefills, which the kernels may tile differently (token groups, packed panels).
    #[test]
    fn long_prefill_matmul_matches_scalar_reference(
        (rows, cols, t, scale, w, x) in matmul_case(10..=40),
    ) {
        check_all_forms(rows, cols, t, scale, &w, &x)?;
    }

    #[test]
    fn rmsnorm_matches_scalar_reference(
        (x, w) in (1usize..=2000).prop_flat_map(|n| (vec(-1.0f32..1.0, n), vec(0.0f32..2.0, n))),
        scale in prop_oneof![Just(1e-3f32), Just(1.0), Just(1e3)],
        eps in prop_oneof![Just(0.0f32), Just(1e-6), Just(1e-5)],
    ) {
        let x: Vec<f32> = x.iter().map(|v| v * scale).collect();
        let n = x.len();
        let (mut got, mut want) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        rmsnorm(&mut got, &x, &w, eps);
        rmsnorm_scalar(&mut want, &x, &w, eps);
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            if r.is_nan() {
                // All-zero input with eps 0: both divide 0 by 0.
                prop_assert!(g.is_nan(), "at {i}: {g} vs NaN");
                continue;
            }
            // The sums of squares differ by summation order only: relative n·ε, halved by the square root.
            let tol = n as f32 * f32::EPSILON * r.abs() + f32::MIN_POSITIVE;
            prop_assert!((g - r).abs() <= tol, "at {i} of {n}: {g} vs {r} (tolerance {tol})");
        }
    }
}
