//! transformers loads the directories `duet convert` writes and gives the same logits (issue 3).
//!
//! tests/reference/make_golden.py --check-converted ran transformers on a `duet convert --dtype f32` and a
//! `--dtype bf16` output of the default model and compared them with transformers on the GGUF itself (for BF16:
//! the GGUF weights rounded to bfloat16): weights tensor by tensor, tokenizer, chat template, logits at every
//! prompt position and greedy continuations of every chat case. It recorded the result in
//! tests/data/golden/converted_check_{f32,bf16}.json. This test checks that record — complete, made from the
//! same model as the golden files, by a recorded duet commit — and that every difference in it is small. It needs
//! neither torch nor the model.

use duet_e2e::{data_dir, ids, read_json};
use serde_json::Value;

struct Expect {
    file: &'static str,
    dtype: &'static str,
    safetensors_dtype: &'static str,
    /// The golden file made by transformers from the same reference weights.
    golden: &'static str,
    /// Largest allowed |converted - reference| of any logit, at any prompt position.
    max_logit_diff: f64,
}

const F32: Expect = Expect {
    file: "converted_check_f32.json",
    dtype: "f32",
    safetensors_dtype: "F32",
    golden: "chat_cases.json",
    max_logit_diff: 1e-4,
};

const BF16: Expect = Expect {
    file: "converted_check_bf16.json",
    dtype: "bf16",
    safetensors_dtype: "BF16",
    golden: "chat_cases_bf16.json",
    max_logit_diff: 1e-3,
};

/// Both sides hold the same stored values (the BF16 reference is rounded the way the file stores them).
const MAX_WEIGHT_DIFF: f64 = 1e-6;

fn golden_dir() -> std::path::PathBuf {
    data_dir().join("golden")
}

fn f(v: &Value, what: &str) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("{what}: not a number: {v}"))
}

fn strs(v: &Value) -> Vec<&str> {
    v.as_array()
        .expect("array of strings")
        .iter()
        .map(|s| s.as_str().expect("string"))
        .collect()
}

/// Every check of one record; returns the failures (so one run reports all of them).
fn check(e: &Expect) -> Vec<String> {
    let rec = read_json(&golden_dir().join(e.file));
    let golden = read_json(&golden_dir().join(e.golden));
    let mut bad = Vec::new();
    let mut expect = |ok: bool, msg: String| {
        if !ok {
            bad.push(format!("{}: {msg}", e.file));
        }
    };

    // Provenance: the same model file as the golden data, converted by a recorded duet commit.
    expect(
        rec["model_sha256"] == golden["model_sha256"] && rec["model_sha256"].is_string(),
        format!(
            "model_sha256 {} is not the golden files' {}",
            rec["model_sha256"], golden["model_sha256"]
        ),
    );
    let commit = rec["converted_by"]["duet_git_commit"]
        .as_str()
        .unwrap_or("");
    expect(
        commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        format!("converted_by.duet_git_commit {commit:?} is not a git commit id"),
    );
    let command = rec["converted_by"]["command"].as_str().unwrap_or("");
    expect(
        command.starts_with("duet convert ") && command.ends_with(&format!("--dtype {}", e.dtype)),
        format!("converted_by.command {command:?}"),
    );
    expect(
        rec["versions"]["transformers"].is_string() && rec["versions"]["torch"].is_string(),
        format!("versions {}", rec["versions"]),
    );

    // What was converted: a complete Hugging Face directory, every tensor stored in the requested dtype.
    let files = strs(&rec["converted_files"]);
    for want in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        expect(files.contains(&want), format!("{want} not in {files:?}"));
    }
    expect(
        strs(&rec["converted_safetensors_dtypes"]) == [e.safetensors_dtype]
            && rec["converted_dtype"] == e.dtype,
        format!(
            "stored dtypes {} / {}",
            rec["converted_safetensors_dtypes"], rec["converted_dtype"]
        ),
    );

    // Weights, tensor by tensor.
    let w = &rec["weights"];
    for list in [
        "missing_in_converted",
        "extra_in_converted",
        "shape_mismatch",
    ] {
        expect(
            w[list].as_array().is_some_and(|a| a.is_empty()),
            format!("weights.{list}: {}", w[list]),
        );
    }
    expect(
        w["n_reference"] == w["n_converted"] && w["n_reference"].as_u64().unwrap_or(0) > 0,
        format!(
            "{} reference tensors, {} converted",
            w["n_reference"], w["n_converted"]
        ),
    );
    let wd = f(&w["max_abs_diff"], "weights.max_abs_diff");
    expect(
        wd <= MAX_WEIGHT_DIFF,
        format!("weights differ by up to {wd} (in {})", w["worst_tensor"]),
    );

    // Tokenizer: the converted tokenizer.json gives the GGUF tokenizer's ids (with NFC) on every string.
    expect(
        rec["tokenizer_cases_total"].as_u64().unwrap_or(0) >= 30,
        format!("only {} tokenizer strings", rec["tokenizer_cases_total"]),
    );
    expect(
        rec["tokenizer_cases_mismatch"]
            .as_array()
            .is_some_and(|a| a.is_empty()),
        format!("tokenizer mismatches: {}", rec["tokenizer_cases_mismatch"]),
    );

    // Chat cases: all of the golden ones, in order (not a partial --cases run).
    let cases = rec["cases"].as_array().expect("cases");
    let gcases = golden["cases"].as_array().expect("golden cases");
    let names: Vec<&str> = cases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    let gnames: Vec<&str> = gcases.iter().map(|c| c["name"].as_str().unwrap()).collect();
    expect(
        names == gnames && names.len() >= 8,
        format!("cases {names:?} are not the golden {gnames:?}"),
    );
    let mut worst: f64 = 0.0;
    for (c, g) in cases.iter().zip(gcases) {
        let name = c["name"].as_str().unwrap();
        for flag in [
            "same_rendered",
            "same_prompt_ids",
            "same_argmax_last",
            "same_greedy",
        ] {
            expect(c[flag] == true, format!("{name}: {flag} is {}", c[flag]));
        }
        expect(
            c["n_prompt"].as_u64() == Some(ids(&g["prompt_ids"]).len() as u64),
            format!(
                "{name}: {} prompt ids, golden has a different prompt",
                c["n_prompt"]
            ),
        );
        let last = f(&c["max_abs_diff_last"], "max_abs_diff_last");
        let all = f(
            &c["max_abs_diff_all_positions"],
            "max_abs_diff_all_positions",
        );
        worst = worst.max(all);
        expect(
            last <= all && all <= e.max_logit_diff,
            format!(
                "{name}: logits differ by up to {all} (last position {last}); allowed {}",
                e.max_logit_diff
            ),
        );
        let nmse = f(&c["nmse_last"], "nmse_last");
        expect(
            nmse <= 1e-8,
            format!("{name}: nmse of the last logits {nmse}"),
        );
        // Greedy: the converted dir continues exactly as the reference, and the reference as the golden file.
        let (gr, gc) = (
            ids(&c["greedy_ids_reference"]),
            ids(&c["greedy_ids_converted"]),
        );
        expect(
            !gr.is_empty() && gr == gc,
            format!("{name}: greedy {gc:?} vs reference {gr:?}"),
        );
        expect(
            gr == ids(&g["greedy_ids"]),
            format!(
                "{name}: reference greedy {gr:?} is not the golden {:?}",
                ids(&g["greedy_ids"])
            ),
        );
    }

    // The summary agrees with the cases.
    let overall = f(&rec["max_abs_diff_all_overall"], "max_abs_diff_all_overall");
    expect(
        overall == worst && overall <= e.max_logit_diff,
        format!("max_abs_diff_all_overall {overall} vs the cases' {worst}"),
    );
    for flag in [
        "all_same_greedy",
        "all_same_prompt_ids",
        "all_same_rendered",
    ] {
        expect(rec[flag] == true, format!("{flag} is {}", rec[flag]));
    }

    // The converted model against the committed golden top-10 logits and greedy ids directly.
    let vg = &rec["converted_vs_committed_golden"];
    expect(
        vg["file"] == e.golden && vg["n_cases"].as_u64() == Some(gcases.len() as u64),
        format!("converted_vs_committed_golden: {vg}"),
    );
    let top10 = vg["max_abs_diff_top10"].as_f64().unwrap_or(f64::INFINITY);
    expect(
        top10 <= 1e-3 && vg["greedy_equals_committed"] == true,
        format!("converted_vs_committed_golden: {vg}"),
    );
    bad
}

#[test]
fn converted_f32_dir_matches_transformers_on_the_gguf() {
    let bad = check(&F32);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn converted_bf16_dir_matches_transformers_on_bf16_rounded_weights() {
    let bad = check(&BF16);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
