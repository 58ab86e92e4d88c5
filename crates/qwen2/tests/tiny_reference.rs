//! The forward pass against transformers on three tiny random Qwen2 models (tests/data/tiny, made by
//! tests/reference/make_tiny_fixtures.py): Qwen1.5 shape (MHA, tied, BF16), Qwen2.5 shape (GQA, untied,
//! F32) and a sharded checkpoint. Logits at every prompt position, 8 incremental decode steps, the greedy
//! continuation, and prefill-then-decode against recomputing from scratch.

use qwen2::{KvCache, Logits, TokenEvent};
use serde_json::Value;
use std::path::PathBuf;

const FIXTURES: [&str; 3] = [
    "qwen15-mha-tied-bf16",
    "qwen25-gqa-untied-f32",
    "qwen25-sharded",
];
const TOL: f32 = 1e-4;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/tiny")
        .join(name)
}

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(dir(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Checks one prompt's prefill logits (all positions), decode steps and greedy continuation.
fn check_prompt(name: &str, m: &qwen2::LoadedModel, r: &Value) {
    let vocab = m.model.config.vocab_size;
    let prompt = ids(&r["prompt_ids"]);
    let mut cache = KvCache::new(&m.model.config, 64).unwrap();
    let logits = m.model.forward(&prompt, &mut cache, Logits::All).unwrap();
    for (pos, want) in r["prefill_logits"].as_array().unwrap().iter().enumerate() {
        let d = max_diff(&logits[pos * vocab..(pos + 1) * vocab], &floats(want));
        assert!(
            d <= TOL,
            "{name}: prefill position {pos}: max |Δlogit| = {d}"
        );
    }
    for (step, s) in r["decode"].as_array().unwrap().iter().enumerate() {
        let id = s["input_id"].as_u64().unwrap() as u32;
        assert_eq!(cache.len(), s["position"].as_u64().unwrap() as usize);
        let got = m.model.forward(&[id], &mut cache, Logits::Last).unwrap();
        let d = max_diff(&got, &floats(&s["logits"]));
        assert!(d <= TOL, "{name}: decode step {step}: max |Δlogit| = {d}");
    }
    // Greedy continuation with eos ignored, token for token.
    let mut cache = KvCache::new(&m.model.config, 64).unwrap();
    let want = ids(&r["greedy_ids"]);
    let opts = qwen2::GenerateOptions {
        max_new_tokens: want.len(),
        ignore_eos: true,
        ..Default::default()
    };
    let g = qwen2::generate(
        &m.model,
        &m.tokenizer,
        &mut cache,
        &prompt,
        &opts,
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(g.ids, want, "{name}: greedy continuation");
}

#[test]
fn logits_and_greedy_match_transformers() {
    for name in FIXTURES {
        let m = qwen2::load(&dir(name)).unwrap();
        let r = reference(name);
        check_prompt(name, &m, &r);
        check_prompt(name, &m, &r["single_token_prompt"]);
    }
}

#[test]
fn config_shapes_are_read_as_transformers_reads_them() {
    let mha = qwen2::load(&dir("qwen15-mha-tied-bf16")).unwrap();
    assert!(mha.model.config.tie_word_embeddings && mha.model.lm_head.is_none());
    assert_eq!(
        mha.model.config.num_key_value_heads,
        mha.model.config.num_attention_heads
    );
    assert_eq!(
        mha.model.embed_tokens.matrix.form(),
        "bf16 (mapped)",
        "BF16 weights stay in the mapping"
    );
    let gqa = qwen2::load(&dir("qwen25-gqa-untied-f32")).unwrap();
    assert_eq!(gqa.model.config.rope_theta, 10000.0);
    assert!(gqa.model.lm_head.is_some());
    assert!(gqa.model.config.num_key_value_heads < gqa.model.config.num_attention_heads);
}

/// An untied embedding table is only looked up, never multiplied, so every weight form keeps it as
/// stored (here mapped f32) and rounds the rows it looks up; the output matrix is held in the form, like
/// every matrix multiplied.
#[test]
fn an_untied_embedding_table_stays_as_stored_in_every_form() {
    use qwen2::kernels::quantized::{decode_layout, Backend, Layout};
    use qwen2::matrix::WeightForm;
    let q8_0 = match decode_layout(Backend::best()) {
        Layout::Rows => "quantized (owned)",
        Layout::Interleaved8 => "q8_0 (interleaved)",
    };
    for (form, output) in [
        (WeightForm::Exact, "f32 (mapped)"),
        (WeightForm::Native, "f32 (mapped)"),
        (WeightForm::Bf16, "bf16 (owned)"),
        (WeightForm::Q8_0, q8_0),
    ] {
        let m = qwen2::load::load_with(&dir("qwen25-gqa-untied-f32"), form)
            .unwrap()
            .model;
        assert_eq!(m.embed_tokens.matrix.form(), "f32 (mapped)", "{form:?}");
        assert_eq!(m.output_matrix().form(), output, "{form:?}");
    }
}

/// A decode step reads every layer matrix and the output matrix once, and no more: the bytes `duet bench`
/// divides by, counted here from config.json by hand (the untied model's embedding table is read for one
/// row only, the tied one's is the output matrix).
#[test]
fn a_decode_step_reads_each_matrix_once() {
    for (name, bytes_per_value) in [("qwen15-mha-tied-bf16", 2), ("qwen25-gqa-untied-f32", 4)] {
        let text = std::fs::read_to_string(dir(name).join("config.json")).unwrap();
        let c: Value = serde_json::from_str(&text).unwrap();
        let n = |k: &str| c[k].as_u64().unwrap() as usize;
        let (h, layers, inter, vocab) = (
            n("hidden_size"),
            n("num_hidden_layers"),
            n("intermediate_size"),
            n("vocab_size"),
        );
        let head_dim = h / n("num_attention_heads");
        let kv = n("num_key_value_heads") * head_dim;
        // q and o are h × h, k and v kv × h, gate, up and down inter × h; then the output, vocab × h.
        let values = layers * (2 * h * h + 2 * kv * h + 3 * inter * h) + vocab * h;
        let m = qwen2::load(&dir(name)).unwrap();
        assert_eq!(
            m.model.weight_bytes_per_token(),
            values * bytes_per_value,
            "{name}"
        );
        let steps = m.model.decode_steps();
        assert_eq!(steps.len(), 4 * layers + 1, "{name}");
        assert_eq!(steps.last().unwrap()[0].rows, vocab, "{name}");
    }
}

#[test]
fn prefill_then_decode_equals_recomputing() {
    for name in FIXTURES {
        let m = qwen2::load(&dir(name)).unwrap();
        let prompt = ids(&reference(name)["prompt_ids"]);
        let vocab = m.model.config.vocab_size;
        // Incremental: prefill all but the last 3 tokens, then one at a time.
        let split = prompt.len() - 3;
        let mut cache = KvCache::new(&m.model.config, 64).unwrap();
        m.model
            .forward(&prompt[..split], &mut cache, Logits::None)
            .unwrap();
        let mut inc = Vec::new();
        for &t in &prompt[split..] {
            inc = m.model.forward(&[t], &mut cache, Logits::Last).unwrap();
        }
        let mut fresh = KvCache::new(&m.model.config, 64).unwrap();
        let all = m.model.forward(&prompt, &mut fresh, Logits::Last).unwrap();
        assert_eq!(all.len(), vocab);
        assert!(max_diff(&inc, &all) <= 1e-5, "{name}");
        // Truncate and resume: the cache reuses the prefix and gives the same logits again.
        cache.truncate(split);
        let again = m
            .model
            .forward(&prompt[split..], &mut cache, Logits::Last)
            .unwrap();
        assert!(
            max_diff(&again, &all) <= 1e-5,
            "{name}: truncate and resume"
        );
    }
}

/// A cache saved to a file and read back continues exactly as the original does (the same logits, bit
/// for bit); a file cut short, with a wrong magic, changed contents or for a model of another shape is
/// refused with an error, not used.
#[test]
fn saved_cache_reads_back_exactly_and_bad_files_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = qwen2::load(&dir("qwen25-gqa-untied-f32")).unwrap();
    let other = qwen2::load(&dir("qwen15-mha-tied-bf16")).unwrap();
    let prompt = ids(&reference("qwen25-gqa-untied-f32")["prompt_ids"]);
    let split = prompt.len() - 2;
    let mut cache = KvCache::new(&m.model.config, 64).unwrap();
    m.model
        .forward(&prompt[..split], &mut cache, Logits::None)
        .unwrap();
    let path = tmp.path().join("prefix.kv");
    cache.snapshot().save(&path).unwrap();

    let mut read = KvCache::new(&m.model.config, 64).unwrap();
    read.copy_prefix_from(&KvCache::load(&m.model.config, &path).unwrap(), split)
        .unwrap();
    let want = m
        .model
        .forward(&prompt[split..], &mut cache, Logits::All)
        .unwrap();
    let got = m
        .model
        .forward(&prompt[split..], &mut read, Logits::All)
        .unwrap();
    assert!(got == want, "read-back cache gives other logits");

    let bytes = std::fs::read(&path).unwrap();
    let bad = tmp.path().join("bad.kv");
    for (what, data) in [
        ("cut short", bytes[..bytes.len() - 4].to_vec()),
        ("only the magic", bytes[..8].to_vec()),
        (
            "wrong magic",
            [b"NOTDUET!".as_slice(), &bytes[8..]].concat(),
        ),
        ("empty", Vec::new()),
        // One bit of one stored value flipped: the right size, a wrong number.
        ("a changed value", {
            let mut b = bytes.clone();
            b[32 + 5] ^= 0x10;
            b
        }),
        // A checksum that does not fit the contents.
        ("a changed checksum", {
            let mut b = bytes.clone();
            *b.last_mut().unwrap() ^= 1;
            b
        }),
    ] {
        std::fs::write(&bad, data).unwrap();
        assert!(KvCache::load(&m.model.config, &bad).is_err(), "{what}");
    }
    let err = match KvCache::load(&other.model.config, &path) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a cache for another model's shape was accepted"),
    };
    assert!(err.contains("different model"), "{err}");
}

#[test]
fn running_past_the_context_is_an_error() {
    let m = qwen2::load(&dir("qwen25-gqa-untied-f32")).unwrap();
    let mut cache = KvCache::new(&m.model.config, 4).unwrap();
    m.model
        .forward(&[1, 2, 3], &mut cache, Logits::None)
        .unwrap();
    let e = m
        .model
        .forward(&[4, 5], &mut cache, Logits::Last)
        .unwrap_err();
    assert!(e.to_string().contains("context"), "{e}");
    // An out-of-vocabulary id is an error too, not a panic.
    let mut cache = KvCache::new(&m.model.config, 8).unwrap();
    assert!(m
        .model
        .forward(&[u32::MAX], &mut cache, Logits::Last)
        .is_err());
}

#[test]
fn many_sequences_share_one_model() {
    let m = qwen2::load(&dir("qwen25-gqa-untied-f32")).unwrap();
    let prompt = ids(&reference("qwen25-gqa-untied-f32")["prompt_ids"]);
    let run = |model: &qwen2::Model| {
        let mut c = KvCache::new(&model.config, 64).unwrap();
        model.forward(&prompt, &mut c, Logits::Last).unwrap()
    };
    let alone = run(&m.model);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let model = m.model.clone();
            let prompt = prompt.clone();
            std::thread::spawn(move || {
                let mut c = KvCache::new(&model.config, 64).unwrap();
                model.forward(&prompt, &mut c, Logits::Last).unwrap()
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), alone);
    }
}

/// A long prompt runs in chunks with progress reports (`Model::prefill`): the logits (last, all, none),
/// the label-scoring hidden state and the cache are those of one pass, bit for bit, and the reports count
/// up to the whole prompt.
#[test]
fn prefill_in_runs_gives_the_bits_of_one_pass() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    for name in FIXTURES {
        let m = qwen2::load(&dir(name)).unwrap();
        let model = &m.model;
        let prompt: Vec<u32> = (0..100u32).map(|i| i * 37 % 512).collect();
        let fresh = || KvCache::new(&model.config, 128).unwrap();
        // 12 (`GEMM_MIN_TOKENS`) and 30 tokens a run, and one pass.
        for chunk in [12, 30, prompt.len()] {
            let runs = if prompt.len() > 2 * chunk {
                prompt.len().div_ceil(chunk) - 1
            } else {
                0
            };
            for logits in [Logits::Last, Logits::All, Logits::None] {
                let (mut one, mut chunked) = (fresh(), fresh());
                let want = model.forward(&prompt, &mut one, logits).unwrap();
                let reports = std::sync::Mutex::new(Vec::new());
                let got = model
                    .prefill(&prompt, &mut chunked, logits, chunk, &|done, total| {
                        reports.lock().unwrap().push((done, total))
                    })
                    .unwrap();
                assert_eq!(bits(&got), bits(&want), "{name}, runs of {chunk}");
                let (n, t) = (prompt.len(), &one);
                assert_eq!(chunked.len(), n);
                let next = |c: &mut KvCache| model.forward(&[prompt[0]], c, Logits::Last).unwrap();
                assert_eq!(
                    bits(&next(&mut chunked)),
                    bits(&next(&mut t.clone())),
                    "{name}: cache"
                );
                let reports = reports.into_inner().unwrap();
                assert_eq!(reports.len(), runs, "{name}, runs of {chunk}");
                assert!(reports.windows(2).all(|w| w[0].0 < w[1].0));
                assert!(reports.iter().all(|&(_, total)| total == n));
                assert_eq!(reports.last().map_or(n, |r| r.0), n);
            }
            let (mut one, mut chunked) = (fresh(), fresh());
            let want = model.forward_last_hidden(&prompt, &mut one).unwrap();
            let got = model
                .prefill_last_hidden(&prompt, &mut chunked, chunk, &|_, _| {})
                .unwrap();
            assert_eq!(
                bits(&got),
                bits(&want),
                "{name}: last hidden, runs of {chunk}"
            );
        }
    }
}

/// A phrase to avoid (`GenerateOptions::avoid`) on the Qwen2.5-shape fixture. Its greedy continuation's
/// fourth token is "The"; avoiding "the" (ASCII case ignored) must go back there and take transformers'
/// second choice at that step (from its decode-step logits), keep the three before, show only text that
/// stays, and continue as a fresh greedy run from that point would: the KV cache is cut back exactly.
#[test]
fn an_avoided_phrase_takes_transformers_second_choice_where_it_began() {
    let name = "qwen25-gqa-untied-f32";
    let m = qwen2::load(&dir(name)).unwrap();
    let r = reference(name);
    let (prompt, greedy) = (ids(&r["prompt_ids"]), ids(&r["greedy_ids"]));
    assert_eq!(
        m.tokenizer.piece(greedy[3]),
        "The",
        "the fixture's fourth token"
    );
    // transformers' logits for the fourth token: decode step 2 (input: the third greedy token).
    let step = &r["decode"][2];
    assert_eq!(step["input_id"].as_u64(), Some(greedy[2] as u64));
    let logits = floats(&step["logits"]);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    assert_eq!(order[0] as u32, greedy[3]);
    assert!(
        logits[order[1]] - logits[order[2]] > 1e-2,
        "no near-tie for second place"
    );
    let second = order[1] as u32;

    // Each run from a fresh cache.
    let run = |prompt: &[u32],
               opts: &qwen2::GenerateOptions,
               on_token: &mut dyn FnMut(TokenEvent) -> bool| {
        let mut cache = KvCache::new(&m.model.config, 64).unwrap();
        qwen2::generate(&m.model, &m.tokenizer, &mut cache, prompt, opts, on_token).unwrap()
    };
    let n = 12;
    let opts = qwen2::GenerateOptions {
        max_new_tokens: n,
        ignore_eos: true,
        avoid: vec!["the".into()],
        ..Default::default()
    };
    let (mut shown, mut events) = (String::new(), Vec::new());
    let g = run(&prompt, &opts, &mut |ev| {
        shown.push_str(ev.text);
        if let Some(a) = ev.avoided {
            events.push((a.phrase.to_string(), a.token, a.id));
        }
        true
    });
    assert_eq!(events.first(), Some(&("the".to_string(), 3, greedy[3])));
    assert_eq!(g.rewinds, events.len());
    assert_eq!(g.ids[..3], greedy[..3]);
    assert_eq!(
        g.ids[3], second,
        "transformers' second choice at the fourth token"
    );
    assert!(!g.text.to_ascii_lowercase().contains("the"), "{:?}", g.text);
    assert_eq!(
        shown, g.text,
        "what was shown is the text: nothing shown was taken back"
    );

    // The same from scratch: the prompt and the first four tokens, then greedy without the guard (which
    // did not step in again here).
    assert_eq!(events.len(), 1, "{events:?}");
    let plain = qwen2::GenerateOptions {
        max_new_tokens: n - 4,
        ignore_eos: true,
        ..Default::default()
    };
    let rest = run(
        &[prompt.as_slice(), &g.ids[..4]].concat(),
        &plain,
        &mut |_| true,
    );
    assert_eq!(
        g.ids[4..],
        rest.ids[..],
        "after going back, as if never gone forward"
    );

    // Stopped by the callback when told of the return: the text ends before the phrase.
    let mut shown = String::new();
    let g = run(&prompt, &opts, &mut |ev| {
        shown.push_str(ev.text);
        ev.avoided.is_none()
    });
    assert_eq!(g.stop_reason, qwen2::StopReason::Cancelled);
    assert_eq!(g.ids, greedy[..3]);
    assert_eq!(
        (shown.as_str(), g.text.as_str()),
        (
            g.text.as_str(),
            m.tokenizer.decode(&greedy[..3], true).unwrap().as_str()
        )
    );
}
