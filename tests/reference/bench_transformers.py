#!/usr/bin/env python3
"""transformers (PyTorch, CPU) on the measurements `duet bench` makes, for a side-by-side on one machine.

Same model directory, same synthetic token ids, same counting as crates/cli/src/bench.rs: load time; the first
64-token forward pass after the load on its own; prefill of 64 and 128 tokens into a fresh cache, only the last
position's logits computed (`logits_to_keep=1`, as `generate` does); decode of 128 tokens, one at a time, after a
one-token prompt; medians of --reps; peak RSS of the process. float32 weights and compute, the
default attention implementation, as many threads as `duet bench` uses (--threads, default 2).

With --dual-trace FILE (the stderr of `duet --trace analyze TEXT`), also the dual task the way the article ran it
with transformers: Duet's own two prompts for TEXT (as the trace prints them), each run whole, since transformers
keeps no prefix cache between requests. Sentiment label: one forward pass over the sentiment prompt and the
labels' first-token logits compared; first reply token: one over the reply prompt; full reply: greedy `generate`
of up to 64 tokens. Medians of --reps.

CI never runs this (it needs torch). Usage:
  /opt/ref-venv/bin/python tests/reference/bench_transformers.py MODEL_DIR [--reps 3] [--threads 2] [--json]
      [--dual-trace FILE]
MODEL_DIR is a Hugging Face directory, e.g. one written by `duet convert MODEL.gguf DIR` (f32).
"""

import argparse
import json
import resource
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def traced_prompts(path):
    """The rendered prompts `duet --trace` printed, by task name (lines after `prompt::build (NAME)`)."""
    prompts, cur = {}, None
    for line in open(path, encoding="utf-8").read().split("\n"):
        if line.startswith("[trace] prompt::build ("):
            cur = line.split("(", 1)[1].split(")", 1)[0]
            prompts[cur] = []
        elif cur is not None and line.startswith("[trace]   |"):
            prompts[cur].append(line[len("[trace]   | "):])
        else:
            cur = None
    # The template ends the generation prompt with a newline, which the trace shows as an empty last line.
    return {k: "\n".join(v) + "\n" for k, v in prompts.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dual-trace", metavar="FILE")
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
    dual = None
    if args.dual_trace:
        prompts = traced_prompts(args.dual_trace)
        tok = AutoTokenizer.from_pretrained(args.model_dir)
        sent = tok(prompts["sentiment"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        reply = tok(prompts["reply"], return_tensors="pt", add_special_tokens=False)["input_ids"]
        labels = [tok("正面", add_special_tokens=False)["input_ids"][0], tok("负面", add_special_tokens=False)["input_ids"][0]]

        @torch.inference_mode()
        def dual_once():
            t = time.perf_counter()
            logits = model(input_ids=sent, logits_to_keep=1).logits[0, -1]
            label = ["正面", "负面"][int(logits[labels[1]] > logits[labels[0]])]
            label_ms = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            model(input_ids=reply, logits_to_keep=1)
            first_ms = label_ms + (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            out = model.generate(input_ids=reply, attention_mask=torch.ones_like(reply), max_new_tokens=64,
                                 do_sample=False, temperature=None, top_p=None, top_k=None)
            full_ms = label_ms + (time.perf_counter() - t) * 1e3
            return label, label_ms, first_ms, full_ms, out.shape[1] - reply.shape[1]

        runs = [dual_once() for _ in range(args.reps + 1)][1:]  # the first warms up, as duet bench's does
        med = lambda i: statistics.median(r[i] for r in runs)  # noqa: E731
        dual = {"prompt_tokens": {"sentiment": sent.shape[1], "reply": reply.shape[1]}, "label": runs[0][0],
                "sentiment_ms": med(1), "first_token_ms": med(2), "full_reply_ms": med(3),
                "reply_tokens": runs[0][4]}
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
        "dual_task": dual,
        "peak_rss_bytes": rss,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"load {load_s:.2f} s, first forward (64 tokens) {first:.2f} s")
        for n, v in prefill.items():
            print(f"prefill {n:>3}: {v:8.1f} tok/s")
        print(f"decode:      {decode:8.1f} tok/s")
        if dual:
            print(f"dual task:   label {dual['label']} in {dual['sentiment_ms']:.0f} ms, first reply token "
                  f"{dual['first_token_ms']:.0f} ms, full reply ({dual['reply_tokens']} tokens) "
                  f"{dual['full_reply_ms']:.0f} ms; prompts {dual['prompt_tokens']}")
        print(f"peak RSS:    {rss / 2**20:8.0f} MiB")


if __name__ == "__main__":
    main()
