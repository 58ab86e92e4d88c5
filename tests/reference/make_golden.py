#!/usr/bin/env python3
"""Golden data for the real default model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M) in tests/data/golden/.

CI never runs this; Rust tests read the JSON it writes. transformers (fp32, CPU) is the oracle: it loads the GGUF
file with `gguf_file=` and dequantizes every tensor to float32.

Outputs (see tests/reference/README.md for the schemas):
  tokenizer_cases.json    ids for ~45 hard strings (+ decode), with and without NFC
  chat_cases.json         ChatML prompts: rendered template text, prompt ids, top-10 logits at the last prompt
                          position, 32-token greedy continuation with per-step top-2 margins
  chat_cases_bf16.json    the same with every weight rounded to bfloat16 (for a converted BF16 directory)
  last_logits_<case>.f32  raw little-endian f32 logits (vocab 151936) at the last prompt position of one case
  converted_check_<dtype>.json   only with --check-converted DIR (see below); <dtype> is f32, bf16 or f16

Usage:
  /opt/ref-venv/bin/python tests/reference/make_golden.py [MODEL_DIR [GGUF_FILE]]
      MODEL_DIR/GGUF_FILE default to $DUET_MODEL (a path to the .gguf file), else /tmp/model.gguf.
  --cases a,b             only these chat cases (quick checks; don't commit partial golden files)
  --check-converted DIR   load a Hugging Face directory written by `duet convert MODEL.gguf DIR --dtype f32|bf16`
                          with transformers and compare it with the GGUF load (weights tensor by tensor, tokenizer,
                          chat template, logits at every prompt position, greedy ids) for the chat cases; writes
                          converted_check_<dtype>.json and skips the other outputs unless --all is also given.
                          May be repeated (e.g. once for an f32 and once for a bf16 directory).
  --duet-commit SHA       the duet commit the `duet` that wrote the directories was built from (default: this
                          checkout's HEAD when the script starts); recorded in converted_check_<dtype>.json
"""

import argparse
import copy
import glob
import json
import os
import subprocess
import sys
import time
import unicodedata

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refjson import f32, sha256_file, versions, write_json  # noqa: E402

from tokenizers import normalizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

EXPECTED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
MAX_NEW = 32
FULL_LOGITS_CASE = "sentiment_zh_positive"

# ---------------------------------------------------------------------------------------------------------
# Tokenizer cases
# ---------------------------------------------------------------------------------------------------------
TOKENIZER_CASES = [
    ("zh_sentence", "今天的实验终于成功了，太棒了！"),
    ("zh_long", "人工智能正在改变我们的生活方式，从医疗到教育，每个领域都在发生深刻的变化。"),
    ("en_sentence", "The quick brown fox jumps over the lazy dog."),
    ("en_contractions", "I'm sure they'll say it's fine; we've done what you'd expect, haven't we?"),
    ("en_upper_contractions", "DON'T SHOUT, I'LL HEAR YOU. IT'S OK."),
    ("ja_sentence", "こんにちは、世界。今日はいい天気ですね。"),
    ("ja_katakana_digits", "東京タワーは333メートルです。"),
    ("ko_sentence", "안녕하세요, 만나서 반갑습니다."),
    ("ko_nfd_jamo", unicodedata.normalize("NFD", "한국어 텍스트")),
    ("ru_sentence", "Привет, мир! Как дела?"),
    ("ar_sentence", "مرحبا بالعالم"),
    ("emoji_family_zwj", "👨‍👩‍👧‍👦"),
    ("emoji_rainbow_flag", "🏳️‍🌈"),
    ("emoji_mixed", "I love it 😀👍🏽!! ❤️ ✌🏻"),
    ("python_code", "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"),
    ("rust_code", "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n"),
    ("json_text", '{"label": "positive", "score": 0.98, "tags": ["a", "b"]}'),
    ("whitespace_runs", "a    b        c  d"),
    ("tabs", "\tindented\t\ttabs\t"),
    ("crlf", "line one\r\nline two\r\n"),
    ("newline_runs", "\n\n\nthree newlines\n \n  \n"),
    ("mixed_whitespace", "\t \n \r\n\t  x"),
    ("digits_long", "1234567890"),
    ("digits_very_long", "123456789012345678901234567890"),
    ("pi", "3.14159"),
    ("numbers_in_text", "In 2024 there were 366 days and 1,000,000 visitors (≈ 2.7k/day)."),
    ("cafe_nfc", "café"),
    ("cafe_nfd", "cafe\u0301"),
    ("nfd_sentence", unicodedata.normalize("NFD", "Crème brûlée à la française, naïve résumé.")),
    ("ohm_angstrom_singletons", "10 \u2126 and 1 \u212b"),
    ("fullwidth", "ＡＢＣ１２３！"),
    ("nbsp_zero_width", "non\u00a0breaking and zero\u200bwidth"),
    ("special_chatml", "<|im_start|>user\nhi<|im_end|>"),
    ("special_endoftext", "<|endoftext|>"),
    ("special_in_sentence", "before<|endoftext|>after <|im_end|> end"),
    ("special_lookalike", "<|im_start|<|unknown|><|im_end"),
    ("chatml_full_prompt",
     "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("empty", ""),
    ("single_space", " "),
    ("leading_trailing_spaces", "  leading and trailing  "),
    ("mixed_script_zh_en", "我用Python写了一个hello world程序，运行得很好。"),
    ("mixed_script_many", "Rust 是一种系统编程语言；日本語も少し；한국어도 조금; и немного русского."),
    ("punctuation", "Hello!!! ... ??? --- *** ;;; :) (^_^) 「引用」《书名》"),
    ("url_path", "see /usr/local/bin/duet --help or https://localhost:8080/api/v1?q=1&r=two"),
    ("long_word", "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis"),
    ("math_symbols", "∀x ∈ ℝ: x² ≥ 0, ∑ᵢ aᵢ = π/2 → ∞"),
]


def nfc_tokenizer(tok):
    """A copy of the GGUF-loaded tokenizer with Qwen's NFC normalizer (as in Qwen's own tokenizer.json and in
    transformers' Qwen2Tokenizer.__init__)."""
    t = copy.deepcopy(tok)
    t.backend_tokenizer.normalizer = normalizers.NFC()
    return t


def make_tokenizer_cases(tok, tok_nfc, meta):
    names = [n for n, _ in TOKENIZER_CASES]
    assert len(set(names)) == len(names)
    cases = []
    for name, text in TOKENIZER_CASES:
        raw_ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = tok_nfc(text, add_special_tokens=False)["input_ids"]
        # The plain `tokenizers` object must agree with the transformers wrapper.
        assert tok_nfc.backend_tokenizer.encode(text, add_special_tokens=False).ids == ids, name
        nfc = unicodedata.normalize("NFC", text)
        cases.append({
            "name": name,
            "text": text,
            "text_is_nfc": nfc == text,
            "input_ids": ids,
            "tokens": tok_nfc.convert_ids_to_tokens(ids),
            "decoded": tok_nfc.decode(ids),
            "decoded_skip_special": tok_nfc.decode(ids, skip_special_tokens=True),
            "input_ids_gguf_tokenizer_no_nfc": raw_ids,
            "nfc_changes_ids": raw_ids != ids,
        })
    return {
        **meta,
        "description": (
            "input_ids: transformers' tokenizer for the GGUF file WITH Qwen's NFC normalizer, i.e. "
            "tok(text, add_special_tokens=False)['input_ids'] for Qwen's own tokenizer.json (the engine's target). "
            "input_ids_gguf_tokenizer_no_nfc: what AutoTokenizer.from_pretrained(dir, gguf_file=...) gives as "
            "loaded; transformers 5 builds that tokenizer from GGUF metadata with normalizer=None, so it differs "
            "on non-NFC text (nfc_changes_ids). decoded = tok.decode(input_ids) (specials kept); "
            "decoded_skip_special = tok.decode(input_ids, skip_special_tokens=True). tokens are byte-level BPE "
            "pieces (GPT-2 byte-to-unicode alphabet)."),
        "gguf_tokenizer_normalizer": str(tok.backend_tokenizer.normalizer),
        "cases": cases,
    }


# ---------------------------------------------------------------------------------------------------------
# Chat cases
# ---------------------------------------------------------------------------------------------------------
SYS_SENT_ZH = "你是一个情感分析助手，只回答'正面'或'负面'。"
SYS_SENT_EN = "You are a sentiment classifier. Answer only 'positive' or 'negative'."
CHAT_CASES = [
    ("sentiment_zh_positive", [
        {"role": "system", "content": SYS_SENT_ZH},
        {"role": "user", "content": "今天的实验终于成功了，太棒了！"}]),
    ("sentiment_zh_negative", [
        {"role": "system", "content": SYS_SENT_ZH},
        {"role": "user", "content": "这个产品质量太差了，用了两天就坏了，客服也一直不回复。"}]),
    ("sentiment_en_negative", [
        {"role": "system", "content": SYS_SENT_EN},
        {"role": "user", "content": "I ordered a laptop three weeks ago and it still hasn't arrived. Customer "
                                    "support keeps ignoring my emails. Worst service ever."}]),
    ("sentiment_en_positive", [
        {"role": "system", "content": SYS_SENT_EN},
        {"role": "user", "content": "The staff were friendly and my order arrived a day early. Great experience!"}]),
    ("sentiment_en_no_system", [
        {"role": "user", "content": "Classify the sentiment of this review as 'positive' or 'negative'. Answer with "
                                    "one word.\nReview: The battery died after an hour and the screen flickers."}]),
    ("empathy_zh_system", [
        {"role": "system", "content": "你是一个温暖、体贴的聊天伙伴，用一两句话回应对方的感受。"},
        {"role": "user", "content": "我今天工作上犯了个错误，被领导批评了，心情很低落。"}]),
    ("empathy_en_system", [
        {"role": "system", "content": "You are a warm, caring companion. Reply in one or two sentences."},
        {"role": "user", "content": "My dog passed away yesterday and I can't stop crying."}]),
    ("empathy_zh_no_system", [
        {"role": "user", "content": "最近压力好大，晚上总是睡不着。"}]),
    ("empathy_en_no_system", [
        {"role": "user", "content": "I just moved to a new city and I feel really lonely."}]),
    ("code_en_no_system", [
        {"role": "user", "content": "Write a Python function that reverses a string."}]),
    ("multi_turn_system", [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And what is its population, roughly?"}]),
    ("multi_turn_zh_no_system", [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你的吗？"},
        {"role": "user", "content": "给我讲个关于程序员的笑话吧。"}]),
]


def greedy_config():
    # Every sampling/penalty knob from the model's generation_config neutralised: scores == raw logits.
    return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW, temperature=None, top_p=None,
                            top_k=None, min_p=None, typical_p=None, repetition_penalty=1.0,
                            no_repeat_ngram_size=None, eos_token_id=EOS_IDS, pad_token_id=151643,
                            bos_token_id=151643, output_scores=True, output_logits=True,
                            return_dict_in_generate=True)


def topk_list(logits, k):
    v, i = torch.topk(logits.to(torch.float32), k)
    return [{"id": int(a), "logit": f32(b)} for a, b in zip(i.tolist(), v.tolist())]


@torch.no_grad()
def run_chat_case(model, tok, name, messages, with_text=True, full_logits_path=None):
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    via_template = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(via_template, dict) or hasattr(via_template, "keys"):
        via_template = via_template["input_ids"]
    assert list(via_template) == ids, f"{name}: apply_chat_template(tokenize=True) differs"
    x = torch.tensor([ids])
    last = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].to(torch.float32)
    if full_logits_path:
        last.numpy().astype("<f4").tofile(full_logits_path)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=greedy_config())
    gen = out.sequences[0, len(ids):].tolist()
    assert len(out.logits) == len(gen)
    steps, margins = [], []
    for t, (lg, sc) in enumerate(zip(out.logits, out.scores)):
        lg = lg[0].to(torch.float32)
        assert torch.equal(lg, sc[0].to(torch.float32)), f"{name}: a logits processor altered step {t}"
        top = topk_list(lg, 5)
        assert top[0]["id"] == gen[t], f"{name}: generate did not pick the argmax at step {t}"
        margins.append(f32(top[0]["logit"] - top[1]["logit"]))
        steps.append({"top5": top})
    # Step 0 logits of generate() must match the plain forward pass.
    d0 = (out.logits[0][0].to(torch.float32) - last).abs().max().item()
    assert d0 < 1e-3, f"{name}: generate step 0 differs from forward by {d0}"
    stopped = bool(gen) and gen[-1] in EOS_IDS
    rec = {"name": name, "messages": messages}
    if with_text:
        rec["rendered"] = rendered
    rec.update({
        "prompt_ids": ids,
        "n_prompt": len(ids),
        "top10": topk_list(last, 10),
        "last_logits_summary": {"mean": f32(last.mean()), "std": f32(last.std()), "max": f32(last.max()),
                                "argmax": int(torch.argmax(last))},
        "greedy_ids": gen,
        "n_generated": len(gen),
        "stopped_on_eos": stopped,
        "stop_reason": "eos" if stopped else "max_new_tokens",
        "greedy_text": tok.decode(gen, skip_special_tokens=True),
        "greedy_text_raw": tok.decode(gen, skip_special_tokens=False),
        "margins": margins,
        "min_margin": min(margins) if margins else None,
        "first_near_tie_step": next((i for i, m in enumerate(margins) if m < 0.02), None),
        "steps": steps,
    })
    return rec


def run_chat_cases(model, tok, meta, label, with_text, full_logits_dir=None):
    cases = []
    for name, messages in CHAT_CASES:
        t0 = time.time()
        path = None
        if full_logits_dir and name == FULL_LOGITS_CASE:
            path = os.path.join(full_logits_dir, f"last_logits_{name}.f32")
        rec = run_chat_case(model, tok, name, messages, with_text=with_text, full_logits_path=path)
        if path:
            rec["full_last_logits_file"] = os.path.basename(path)
        cases.append(rec)
        print(f"[{label}] {name}: {len(rec['prompt_ids'])} prompt ids, {rec['n_generated']} generated "
              f"({rec['stop_reason']}), min margin {rec['min_margin']:.4f}, {time.time() - t0:.1f}s: "
              f"{rec['greedy_text'][:60]!r}", flush=True)
    return {**meta, "cases": cases}


# ---------------------------------------------------------------------------------------------------------
# Converted-directory check
# ---------------------------------------------------------------------------------------------------------
def safetensors_dtypes_by_name(d):
    from safetensors import safe_open
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        with safe_open(f, framework="pt") as s:
            for k in s.keys():
                out[k] = str(s.get_slice(k).get_dtype())
    return out


ROUND_TO = {"BF16": torch.bfloat16, "bfloat16": torch.bfloat16, "F16": torch.float16, "float16": torch.float16}
DTYPE_LABEL = {"F32": "f32", "float32": "f32", "BF16": "bf16", "bfloat16": "bf16", "F16": "f16", "float16": "f16"}


def converted_label(dtypes):
    """File-name label of a converted directory: its one storage dtype (f32, bf16, f16), else "mixed"."""
    return DTYPE_LABEL.get(dtypes[0], dtypes[0].lower()) if len(dtypes) == 1 else "mixed"


def git_provenance(repo, commit=None):
    """The duet commit that converted the directory, and which source files differed from it when this ran."""
    def git(*a):
        try:
            return subprocess.run(["git", "-C", repo, *a], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
    head = (git("rev-parse", "HEAD") or "").strip() or None
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "crates", "Cargo.toml", "Cargo.lock")
    return {
        "duet_git_commit": commit or head,
        "checkout_head_when_checked": head,
        "crates_modified_in_checkout_when_checked": sorted(l[3:] for l in (dirty or "").splitlines() if l.strip()),
    }


@torch.no_grad()
def vs_committed_golden(golden_path, conv, conv_greedy):
    """The converted model's logits at the committed golden top-10 ids, and its greedy ids vs the committed ones
    (a check that this run's transformers reference is the one the committed golden files were made with)."""
    if golden_path is None:
        return None
    with open(golden_path, encoding="utf-8") as f:
        golden = {c["name"]: c for c in json.load(f)["cases"]}
    worst, same_greedy, n = 0.0, True, 0
    for name, messages in CHAT_CASES:
        g = golden.get(name)
        if g is None:
            continue
        n += 1
        ids = g["prompt_ids"]
        last = conv(input_ids=torch.tensor([ids])).logits[0, -1].to(torch.float32)
        for t in g["top10"]:
            worst = max(worst, abs(float(last[t["id"]]) - t["logit"]))
        same_greedy &= conv_greedy[name] == g["greedy_ids"]
    return {"file": os.path.basename(golden_path), "n_cases": n, "max_abs_diff_top10": f32(worst),
            "greedy_equals_committed": same_greedy}


@torch.no_grad()
def check_converted(conv_dir, ref_model, ref_tok, meta, golden_dirs, provenance):
    by_name = safetensors_dtypes_by_name(conv_dir)
    dtypes = sorted(set(by_name.values()))
    conv = AutoModelForCausalLM.from_pretrained(conv_dir, dtype=torch.float32).eval()
    conv_tok = AutoTokenizer.from_pretrained(conv_dir)
    # Compare against the GGUF weights rounded the way the converted file stores each of them (transformers'
    # parameter names are the safetensors names; a tensor missing from the file is left as it is).
    ref = ref_model
    rounded = {k: ROUND_TO[v] for k, v in by_name.items() if v in ROUND_TO}
    if rounded:
        ref = copy.deepcopy(ref_model)
        for k, p in ref.named_parameters(remove_duplicate=False):
            if k in rounded:
                p.data = p.data.to(rounded[k]).to(torch.float32)
    round_desc = sorted({str(v).replace("torch.", "") for v in rounded.values()})
    # Weights, tensor by tensor.
    rsd, csd = ref.state_dict(), conv.state_dict()
    wmax, worst = 0.0, None
    for k, v in rsd.items():
        if k in csd and csd[k].shape == v.shape:
            d = (csd[k].to(torch.float32) - v.to(torch.float32)).abs().max().item()
            if d > wmax:
                wmax, worst = d, k
    weights = {
        "n_reference": len(rsd), "n_converted": len(csd),
        "missing_in_converted": sorted(set(rsd) - set(csd)), "extra_in_converted": sorted(set(csd) - set(rsd)),
        "shape_mismatch": sorted(k for k in rsd if k in csd and csd[k].shape != rsd[k].shape),
        "max_abs_diff": wmax, "worst_tensor": worst,
    }
    cases = []
    for name, messages in CHAT_CASES:
        r_rendered = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        c_rendered = conv_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = ref_tok(r_rendered, add_special_tokens=False)["input_ids"]
        c_ids = conv_tok(c_rendered, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        rl = ref(input_ids=x).logits[0].to(torch.float32)
        cl = conv(input_ids=x).logits[0].to(torch.float32)
        diff = (rl - cl).abs()
        last_r, last_c = rl[-1], cl[-1]
        nmse = (((last_r - last_c) ** 2).sum() / (last_r ** 2).sum()).item()
        gc = greedy_config()
        gr = ref.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
        gcv = conv.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
        g_ref = gr.sequences[0, len(ids):].tolist()
        g_conv = gcv.sequences[0, len(ids):].tolist()
        cases.append({
            "name": name,
            "same_rendered": r_rendered == c_rendered,
            "same_prompt_ids": ids == c_ids,
            "n_prompt": len(ids),
            "max_abs_diff_last": f32(diff[-1].max()),
            "max_abs_diff_all_positions": f32(diff.max()),
            "nmse_last": f32(nmse),
            "same_argmax_last": int(last_r.argmax()) == int(last_c.argmax()),
            "greedy_ids_reference": g_ref,
            "greedy_ids_converted": g_conv,
            "same_greedy": g_ref == g_conv,
        })
        print(f"[converted] {name}: max|dlogit| last {cases[-1]['max_abs_diff_last']:.3g}, all "
              f"{cases[-1]['max_abs_diff_all_positions']:.3g}, nmse {nmse:.3g}, same greedy {g_ref == g_conv}",
              flush=True)
    tok_mismatch = []
    for name, text in TOKENIZER_CASES:
        if conv_tok(text, add_special_tokens=False)["input_ids"] != ref_tok(text, add_special_tokens=False)["input_ids"]:
            tok_mismatch.append(name)
    conv_files = sorted(os.listdir(conv_dir))
    tok_norm = None
    tj = os.path.join(conv_dir, "tokenizer.json")
    if os.path.exists(tj):
        with open(tj, encoding="utf-8") as f:
            tok_norm = json.load(f).get("normalizer")
    label = converted_label(dtypes)
    golden_file = "chat_cases.json" if label == "f32" else "chat_cases_bf16.json" if label == "bf16" else None
    vs_golden = None
    if golden_file:
        # The golden file next to the output (just written with --all), else the committed one.
        golden_path = next((p for p in (os.path.join(d, golden_file) for d in golden_dirs) if os.path.exists(p)),
                           None)
        vs_golden = vs_committed_golden(golden_path, conv,
                                        {c["name"]: c["greedy_ids_converted"] for c in cases})
    return {
        **meta,
        "converted_by": {**provenance,
                         "command": f"duet convert {meta['model_file']} {os.path.basename(os.path.abspath(conv_dir))}"
                                    f" --dtype {label}"},
        "converted_dir": os.path.abspath(conv_dir),
        "converted_files": conv_files,
        "converted_file_sizes": {f: os.path.getsize(os.path.join(conv_dir, f)) for f in conv_files},
        "converted_file_sha256": {f: sha256_file(os.path.join(conv_dir, f)) for f in conv_files},
        "converted_safetensors_dtypes": dtypes,
        "converted_dtype": label,
        "reference": "GGUF load" + (f", every weight rounded to {', '.join(round_desc)} as stored in the converted "
                                    f"file, then widened to float32" if round_desc else ", float32"),
        "converted_tokenizer_normalizer": tok_norm,
        "tokenizer_cases_total": len(TOKENIZER_CASES),
        "tokenizer_cases_mismatch": tok_mismatch,
        "weights": weights,
        "max_abs_diff_last_overall": max(c["max_abs_diff_last"] for c in cases),
        "max_abs_diff_all_overall": max(c["max_abs_diff_all_positions"] for c in cases),
        "all_same_greedy": all(c["same_greedy"] for c in cases),
        "all_same_prompt_ids": all(c["same_prompt_ids"] for c in cases),
        "all_same_rendered": all(c["same_rendered"] for c in cases),
        "converted_vs_committed_golden": vs_golden,
        "cases": cases,
    }


def add_model_args(ap):
    """The arguments every real-model generator takes: MODEL_DIR and GGUF_FILE (default: $DUET_MODEL, else
    /tmp/model.gguf) and --out (default: tests/data/golden). Returns the scripts' directory."""
    default = os.environ.get("DUET_MODEL", "/tmp/model.gguf")
    ap.add_argument("model_dir", nargs="?", default=os.path.dirname(os.path.abspath(default)))
    ap.add_argument("gguf_file", nargs="?", default=os.path.basename(default))
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "data", "golden"))
    return here


# ---------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = add_model_args(ap)
    ap.add_argument("--check-converted", metavar="DIR", action="append",
                    help="compare a `duet convert` output directory against the GGUF load; writes "
                         "converted_check_<dtype>.json (and nothing else unless --all); may be repeated")
    ap.add_argument("--duet-commit", metavar="SHA",
                    help="the duet commit the converting binary was built from (default: this checkout's HEAD "
                         "when the script starts)")
    ap.add_argument("--all", action="store_true", help="with --check-converted: also write the golden files")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--cases", help="comma-separated chat case names to run (quick checks; default: all)")
    args = ap.parse_args()
    if args.cases:
        wanted = args.cases.split(",")
        unknown = set(wanted) - {n for n, _ in CHAT_CASES}
        if unknown:
            ap.error(f"unknown chat cases: {sorted(unknown)}")
        CHAT_CASES[:] = [c for c in CHAT_CASES if c[0] in wanted]

    # Before the long run: HEAD may move while it goes on (give --duet-commit when the binary is older).
    prov = git_provenance(os.path.abspath(os.path.join(here, "..", "..")), args.duet_commit)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    gguf_path = os.path.join(args.model_dir, args.gguf_file)
    digest = sha256_file(gguf_path)
    if digest != EXPECTED_SHA256:
        print(f"WARNING: {gguf_path} sha256 {digest} is not the expected {EXPECTED_SHA256}", file=sys.stderr)
    meta = {
        "model": "Qwen2.5-Coder-0.5B-Instruct GGUF Q4_K_M (dequantized to float32 by transformers)",
        "model_file": args.gguf_file,
        "model_sha256": digest,
        "versions": versions("gguf", "accelerate"),
        "eos_token_ids": EOS_IDS,
    }

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_file)
    tok_nfc = nfc_tokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file,
                                                 dtype=torch.float32).eval()
    print(f"loaded in {time.time() - t0:.1f}s; tokenizer normalizer: {tok.backend_tokenizer.normalizer}", flush=True)

    do_golden = args.check_converted is None or args.all
    if do_golden:
        n = write_json(os.path.join(out, "tokenizer_cases.json"), make_tokenizer_cases(tok, tok_nfc, meta))
        print(f"tokenizer_cases.json: {n} bytes", flush=True)
        chat_meta = {**meta, "weights": "float32 (GGUF dequantized)", "max_new_tokens": MAX_NEW,
                     "generation": "greedy (do_sample=False), no logits processors, eos_token_id=[151645, 151643]",
                     "tokenizer": "GGUF tokenizer with NFC (identical ids to without NFC for these prompts)"}
        chat = run_chat_cases(model, tok_nfc, chat_meta, "f32", True, full_logits_dir=out)
        for c in chat["cases"]:  # the NFC choice must not matter for the chat prompts
            assert tok(c["rendered"], add_special_tokens=False)["input_ids"] == c["prompt_ids"]
        n = write_json(os.path.join(out, "chat_cases.json"), chat)
        print(f"chat_cases.json: {n} bytes", flush=True)

    if args.check_converted:
        for conv_dir in args.check_converted:
            res = check_converted(conv_dir, model, tok_nfc, meta, [out, os.path.join(here, "..", "data", "golden")],
                                  prov)
            name = f"converted_check_{res['converted_dtype']}.json"
            n = write_json(os.path.join(out, name), res)
            print(f"{name}: {n} bytes; max |dlogit| last {res['max_abs_diff_last_overall']:.3g}, all positions "
                  f"{res['max_abs_diff_all_overall']:.3g}; weights {res['weights']['max_abs_diff']:.3g}", flush=True)

    if do_golden and not args.skip_bf16:
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16).to(torch.float32)
        bmeta = {**meta, "weights": "every GGUF-dequantized weight rounded to bfloat16 then back to float32; "
                                    "computation in float32", "max_new_tokens": MAX_NEW,
                 "generation": "greedy (do_sample=False), no logits processors, eos_token_id=[151645, 151643]"}
        bf = run_chat_cases(model, tok_nfc, bmeta, "bf16", False)
        n = write_json(os.path.join(out, "chat_cases_bf16.json"), bf)
        print(f"chat_cases_bf16.json: {n} bytes", flush=True)
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
