#!/usr/bin/env python3
"""Generates gguf_tokenizer_reference.json for crates/qwen2/tests/gguf_real.rs: the ids transformers gives for
some hard strings with the tokenizer it builds from the default model's GGUF metadata.

Qwen2's own tokenizer.json normalizes with NFC before BPE. The tokenizer transformers builds from a GGUF file
has no normalizer, so the text is NFC-normalized here first: the expected ids are those of Qwen2's tokenizer
(all texts below are unchanged by NFC except the one with a combining accent).

Usage: python make_gguf_tokenizer_reference.py /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""
import json
import os
import sys
import unicodedata

from transformers import AutoTokenizer

TEXTS = [
    "Hello, world!",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "  leading and trailing spaces   ",
    "line one\r\nline two\n\n\nthree\ttabs",
    "café (precomposed) vs cafe\u0301 (combining accent)",
    "你好，世界！日本語のテキスト",
    "emoji 👩‍👩‍👧‍👦 and 🇫🇷 flags",
    "numbers 1234567890 and 3.14159",
    "I'm sure they've done it, we'll see; it's John's.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<|endoftext|><|fim_prefix|>x<|fim_suffix|>",
    "",
]


def main() -> None:
    path = os.path.abspath(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    cases = [{"text": t, "ids": tok(unicodedata.normalize("NFC", t))["input_ids"]} for t in TEXTS]
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf_tokenizer_reference.json")
    with open(out, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")
    print(f"wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
