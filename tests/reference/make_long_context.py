#!/usr/bin/env python3
"""Golden data for long prompts on the real default model: tests/data/golden/long_context.json.

The chat cases of make_golden.py are all under 64 tokens, so nothing there compares attention over a long
cache, RoPE at positions in the thousands, or the tokenizer on a long mixed text with transformers. These cases
do: a customer-message log of 3027 tokens (Chinese) and one of 2073 tokens (English), each followed by a question
whose answer is one record near the start, so a wrong long-range attention also shows in the greedy answer.

The logs are generated from small word lists with a fixed seed (written for this file), the same on every run.
Output schema: as chat_cases.json (see README.md), same fields per case.

Usage (CI never runs this):
  /opt/ref-venv/bin/python tests/reference/make_long_context.py [MODEL_DIR [GGUF_FILE]]
"""

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as mg  # noqa: E402
from refjson import sha256_file, versions, write_json  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ZH_PRODUCTS = ["手机壳", "蓝牙耳机", "台灯", "运动鞋", "书包", "充电宝", "键盘", "雨伞", "茶叶", "毛巾", "鼠标",
               "电饭煲", "围巾", "笔记本", "收纳盒"]
ZH_NOTES = ["物流很快，包装也很完好。", "颜色和图片一致，很满意。", "发货慢了两天，不过东西没问题。",
            "尺寸有点偏小，考虑换一个大号。", "质量不错，性价比很高。", "客服回复及时，态度很好。",
            "用了一周，目前一切正常。", "包装盒有点压痕，商品本身没事。", "和上次买的一样好用，会回购。",
            "说明书只有英文，希望加上中文。", "送给家人的，他们很喜欢。", "价格比实体店便宜不少。"]
EN_PRODUCTS = ["phone case", "desk lamp", "running shoes", "backpack", "power bank", "keyboard", "umbrella",
               "tea set", "towel", "mouse", "rice cooker", "scarf", "notebook"]
EN_NOTES = ["Arrived quickly and well packed.", "The colour matches the photos.", "Shipping took two extra days, "
            "but the item is fine.", "Runs a little small, may exchange for a larger size.", "Good value for "
            "the price.", "Support answered within the hour.", "Working fine after a week of use.", "The box "
            "was dented, the product was not.", "Same as my last one, will buy again.", "A gift for my "
            "parents, they love it."]


def order_code(rng):
    return rng.choice("ABCDEFGHJKLMNPQRSTUVWXY") + str(rng.randrange(1000, 10000))


def order_log(seed, records, special_at, special_line, line):
    """`records` log lines `NNN. <line>` with distinct order codes; record `special_at` (0-based) is
    `special_line(code)`, the others `line(code, rng)`. Returns the lines and the special record's code."""
    rng = random.Random(seed)
    codes, lines, special = set(), [], None
    for i in range(records):
        code = order_code(rng)
        while code in codes:
            code = order_code(rng)
        codes.add(code)
        if i == special_at:
            special = code
            lines.append(f"{i + 1:03d}. {special_line(code)}")
        else:
            lines.append(f"{i + 1:03d}. {line(code, rng)}")
    return lines, special


# One case per language: the log's seed, size and special record, and the words around it.
CASES = [
    {"name": "long_zh_order_log", "seed": 20261201, "records": 130, "special_at": 4,
     "special": lambda c: f"订单{c}：保温杯收到时杯身有一道裂缝，希望尽快换货。",
     "line": lambda c, rng: f"订单{c}：{rng.choice(ZH_PRODUCTS)}，{rng.choice(ZH_NOTES)}",
     "system": "你是一个客服助手，根据客户留言记录回答问题。",
     "header": "下面是本周的客户留言记录，每条以订单号开头。",
     "question": "问题：哪个订单的保温杯有裂缝？只回答订单号。"},
    {"name": "long_en_order_log", "seed": 1201, "records": 90, "special_at": 2,
     "special": lambda c: f"Order {c}: the glass teapot arrived shattered; customer wants a refund.",
     "line": lambda c, rng: f"Order {c}: {rng.choice(EN_PRODUCTS)}. {rng.choice(EN_NOTES)}",
     "system": "You are a customer service assistant. Answer from the log.",
     "header": "Here is this week's customer message log, one order per line.",
     "question": "Question: which order had the shattered teapot? Answer with the order number only."},
]


def log_case(spec):
    """A case's name, chat messages and expected answer (the special record's order code)."""
    lines, answer = order_log(spec["seed"], spec["records"], spec["special_at"], spec["special"], spec["line"])
    user = spec["header"] + "\n" + "\n".join(lines) + "\n\n" + spec["question"]
    messages = [{"role": "system", "content": spec["system"]}, {"role": "user", "content": user}]
    return spec["name"], messages, answer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mg.add_model_args(ap)
    args = ap.parse_args()

    torch.set_num_threads(2)
    gguf_path = os.path.join(args.model_dir, args.gguf_file)
    digest = sha256_file(gguf_path)
    if digest != mg.EXPECTED_SHA256:
        print(f"WARNING: {gguf_path} sha256 {digest} is not the expected {mg.EXPECTED_SHA256}", file=sys.stderr)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf_file)
    tok_nfc = mg.nfc_tokenizer(tok)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=args.gguf_file,
                                                 dtype=torch.float32).eval()
    print(f"loaded in {time.time() - t0:.1f}s", flush=True)

    cases = []
    for name, messages, answer in map(log_case, CASES):
        t1 = time.time()
        rec = mg.run_chat_case(model, tok_nfc, name, messages)
        assert tok(rec["rendered"], add_special_tokens=False)["input_ids"] == rec["prompt_ids"]
        rec["answer_order"] = answer
        rec["greedy_text_has_answer"] = answer in rec["greedy_text"]
        cases.append(rec)
        print(f"{name}: {rec['n_prompt']} prompt ids, {rec['n_generated']} generated ({rec['stop_reason']}), "
              f"min margin {rec['min_margin']:.4f}, first near tie {rec['first_near_tie_step']}, "
              f"{time.time() - t1:.0f}s: {rec['greedy_text']!r} (answer {answer})", flush=True)
    meta = {
        "model": "Qwen2.5-Coder-0.5B-Instruct GGUF Q4_K_M (dequantized to float32 by transformers)",
        "model_file": args.gguf_file,
        "model_sha256": digest,
        "versions": versions("gguf", "accelerate"),
        "eos_token_ids": mg.EOS_IDS,
        "weights": "float32 (GGUF dequantized)",
        "max_new_tokens": mg.MAX_NEW,
        "generation": "greedy (do_sample=False), no logits processors, eos_token_id=[151645, 151643]",
        "tokenizer": "GGUF tokenizer with NFC (identical ids to without NFC for these prompts)",
        "attention": str(getattr(model.config, "_attn_implementation", "unknown")),
    }
    n = write_json(os.path.join(args.out, "long_context.json"), {**meta, "cases": cases})
    print(f"long_context.json: {n} bytes, done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
