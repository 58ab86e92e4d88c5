#!/usr/bin/env python3
"""transformers (PyTorch, CPU) on the measurements `duet bench` makes, for a side-by-side on one machine.

Same model directory, same synthetic token ids, same counting as crates/cli/src/bench.rs: load time; the first
64-token forward pass after the load on its own; prefill of 64 and 128 tokens into a fresh cache, only the last
position's logits computed (`logits_to_keep=1`, as `generate` does); decode of 128 tokens, one at a time, after a
one-token prompt; medians of --reps; peak RSS of the process. float32 weights and compute, the
default attention implementation, as many threads as `duet bench` uses (--threads, default 2).

CI never runs this (it needs torch). Usage:
  /opt/ref-venv/bin/python tests/reference/bench_transformers.py MODEL_DIR [--reps 3] [--threads 2] [--json]
MODEL_DIR is a Hugging Face directory, e.g. one written by `duet convert MODEL.gguf DIR` (f32).
"""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size

    @torch.inference_mode()
    def prefill_s(n):
        ids = torch.tensor([[(1000 + i * 7) % vocab for i in range(n)]])
        t = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode_s(n):
        tok = lambda i: torch.tensor([[(1000 + i) % vocab]])  # noqa: E731
        cache = model(input_ids=tok(0), use_cache=True).cache
        t = time.perf_counter()
        for i in range(n):
            cache = model(input_ids=tok(i + 1), cache=cache, use_cache=True).cache
        return time.perf_counter() - t

    first = prefill_s(64)
    prefill = {n: n / statistics.median(prefill_s(n) for _ in range(args.reps)) for n in (64, 128)}
    decode_n = 128
    decode = decode_n / statistics.median(decode_s(decode_n) for _ in range(args.reps))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "engine": "transformers",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "threads": torch.get_num_threads(),
        "attention": str(getattr(model.config, "_attn_implementation", "unknown")),
        "load_s": load_s,
        "first_forward_64_tokens_s": first,
        "prefill": [{"tokens": n, "tok_s": v} for n, v in prefill.items()],
        "decode": {"tokens": decode_n, "tok_s": decode},
        "peak_rss_bytes": rss,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"load {load_s:.2f} s, first forward (64 tokens) {first:.2f} s")
        for n, v in prefill.items():
            print(f"prefill {n:>3}: {v:8.1f} tok/s")
        print(f"decode:      {decode:8.1f} tok/s")
        print(f"peak RSS:    {rss / 2**20:8.0f} MiB")


if __name__ == "__main__":
    main()
