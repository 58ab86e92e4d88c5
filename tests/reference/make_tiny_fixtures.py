#!/usr/bin/env python3
"""Generate the tiny random Qwen2 fixtures in tests/data/tiny/ (CI never runs this).

Three randomly initialised (fixed seed) Qwen2ForCausalLM models, each saved as a complete Hugging Face
directory with a tiny byte-level BPE tokenizer (512 tokens, Qwen2-style pipeline), plus reference.json with
float32 logits computed by transformers:

  qwen15-mha-tied-bf16/   Qwen1.5 shape: MHA (num_key_value_heads 4 == num_attention_heads 4), tied embeddings, weights stored in bfloat16, a redundant lm_head.weight stored
                          beside embed_tokens (bit-identical copy), legacy top-level rope_theta = 1e6, ChatML
                          template of Qwen1.5 (default system prompt "You are a helpful assistant.").
  qwen25-gqa-untied-f32/  Qwen2.5 shape: GQA 4 heads / 2 KV heads, untied lm_head, float32, 3 layers, theta only
                          under rope_parameters (that is how transformers 5 writes it) with rope_theta = 10000 (not
                          the usual 1e6, so a hard-coded theta fails), sliding_window = 4 with
                          use_sliding_window = false (must be ignored), Qwen2.5 ChatML template.
  qwen25-sharded/         The same weights and config as qwen25-gqa-untied-f32, saved in several safetensors shards
                          with model.safetensors.index.json. Its reference.json equals the unsharded one.

Usage:  /opt/ref-venv/bin/python tests/reference/make_tiny_fixtures.py [--out tests/data/tiny]
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from refjson import f32, versions, write_json  # noqa: E402

from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

SEED = 20240607
VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 509, 510, 511 (same order as Qwen: 151643..5)
N_BPE = VOCAB - len(SPECIALS)

# Qwen2's pre-tokenizer split regex (from Qwen's tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen1.5-Chat's template (ChatML with a default system prompt).
QWEN15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5-Instruct's template (as stored in the default model's GGUF metadata).
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# ---------------------------------------------------------------------------------------------------------
# Training text for the tiny tokenizer: a few hundred lines of mixed Chinese / English / code.
# ---------------------------------------------------------------------------------------------------------
EN = [
    "The weather is nice today, and the experiment finally worked.",
    "I am so happy with the results of this project!",
    "This product is terrible, it broke after two days.",
    "Please answer only positive or negative.",
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "We measured the bandwidth with two threads on a small machine.",
    "Thank you for your patience, we are looking into it.",
    "I'm sorry to hear that you had a bad day.",
    "Let's write a small inference engine in Rust.",
    "The model predicts the next token from the previous ones.",
    "Greedy decoding always picks the most likely token.",
    "What time is it? It's almost 3:45 in the afternoon.",
    "Customer service never replied to my emails.",
    "The cat sat on the mat and looked out of the window.",
    "Numbers like 1234567890 and 3.14159 appear in the text.",
    "She said: \"don't worry, everything will be fine.\"",
    "He'll arrive tomorrow, they've already booked the hotel.",
    "Reading books is a great way to learn new things.",
    "The train was late again, which made everyone angry.",
]
ZH = [
    "今天的实验终于成功了，太棒了！",
    "你是一个情感分析助手，只回答正面或负面。",
    "这个产品太差了，用了两天就坏了。",
    "我很高兴能和你一起工作。",
    "天气很好，我们去公园散步吧。",
    "模型根据前面的词预测下一个词。",
    "请用中文回答下面的问题。",
    "我们在一台小机器上测量了内存带宽。",
    "谢谢你的耐心，我们正在处理这个问题。",
    "听到你今天过得不好，我很难过。",
    "学习新的东西总是让人开心。",
    "火车又晚点了，大家都很生气。",
    "我喜欢读书，也喜欢写代码。",
    "这家餐厅的服务非常好，菜也很好吃。",
    "明天我们要去北京开会。",
    "你好，世界！",
    "人工智能正在改变我们的生活。",
    "他说：“别担心，一切都会好起来的。”",
    "小猫坐在窗边看着外面的雨。",
    "数字一二三四五六七八九十。",
]
CODE = [
    "def add(a, b):\n    return a + b\n",
    "fn main() {\n    println!(\"hello, world\");\n}\n",
    "for i in range(10):\n\tprint(i)\n",
    "let x: Vec<f32> = vec![0.0; 64];\n",
    "if x > 0 and y < 10:\n    z = x * y\n",
    "impl Model {\n    pub fn forward(&self, ids: &[u32]) -> Vec<f32> {\n        todo!()\n    }\n}\n",
]
OTHER = ["café crème", "こんにちは、世界", "안녕하세요 세계", "naïve résumé", "Grüße aus München", "👍 😀 🎉"]


def training_lines():
    lines = []
    for i, e in enumerate(EN):
        lines.append(e)
        lines.append(ZH[i % len(ZH)])
        lines.append(e + " " + ZH[(i * 7 + 3) % len(ZH)])
        lines.append(ZH[(i * 3 + 1) % len(ZH)] + " " + EN[(i * 5 + 2) % len(EN)])
        lines.append(f"<|im_start|>user\n{e}<|im_end|>\n<|im_start|>assistant\n{ZH[i % len(ZH)]}<|im_end|>")
    for j in range(3):
        lines.extend(CODE)
        lines.extend(OTHER)
        lines.extend(" ".join(EN[k:k + 3]) for k in range(0, len(EN), 3))
        lines.extend("".join(ZH[k:k + 3]) for k in range(0, len(ZH), 3))
    return lines


def build_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=N_BPE, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    # The special-token strings must not be learned as merges: strip them from the training text.
    text = [ln.replace("<|im_start|>", "").replace("<|im_end|>", "") for ln in training_lines()]
    tok.train_from_iterator(text, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=False)
    if n != N_BPE:
        raise SystemExit(f"trained BPE vocab has {n} tokens, wanted {N_BPE}: add training text")
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=False, rstrip=False,
                                       single_word=False) for s in SPECIALS])
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    for k, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == N_BPE + k
    # Make the serialised form look like Qwen's tokenizer.json (ByteLevel post-processor, no padding/truncation).
    j = json.loads(tok.to_str())
    j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False}
    j["truncation"] = None
    j["padding"] = None
    return Tokenizer.from_str(json.dumps(j, ensure_ascii=False))


def tokenizer_config(chat_template, eos, model_max_length):
    added = {}
    for k, s in enumerate(SPECIALS):
        added[str(N_BPE + k)] = {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
ENDOFTEXT, IM_START, IM_END = N_BPE, N_BPE + 1, N_BPE + 2


def randomize(model, seed, std=0.15, lm_head_std=0.3):
    """Overwrite every parameter with seeded random values larger than the default init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                v = 1.0 + 0.25 * torch.randn(p.shape, generator=g)  # random, positive-ish RMSNorm gains
            elif name.endswith(".bias"):  # q/k/v biases (transformers initialises them to zero)
                v = 0.2 * torch.randn(p.shape, generator=g)
            elif name == "model.embed_tokens.weight":
                v = 0.5 * torch.randn(p.shape, generator=g)
            elif name == "lm_head.weight":
                v = lm_head_std * torch.randn(p.shape, generator=g)
            else:
                v = std * torch.randn(p.shape, generator=g)
            p.copy_(v.to(p.dtype))


MIN_MARGIN = 0.05  # smallest allowed top-2 logit gap on every greedy step of both fixture prompts


@torch.no_grad()
def greedy_with_margins(model, ids, n):
    out, margins = [], []
    x = torch.tensor([ids])
    for _ in range(n):
        lg = model(input_ids=x, use_cache=False).logits[0, -1]
        top = torch.topk(lg, 2).values
        margins.append(float(top[0] - top[1]))
        out.append(int(torch.argmax(lg)))
        x = torch.cat([x, torch.tensor([[out[-1]]])], dim=1)
    return out, margins


def pick_seed(model, tok, first_seed, bf16, tries=500):
    """Randomize with the first seed whose greedy continuations (both prompts, N_GREEDY steps) have no
    near-ties (top-2 margin >= MIN_MARGIN) and are not one token repeated, so that an engine whose float
    summation order differs from PyTorch's still reproduces them exactly."""
    main_ids = tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
    short_ids = tok.encode(SHORT_PROMPT_TEXT, add_special_tokens=False).ids
    for seed in range(first_seed, first_seed + tries):
        randomize(model, seed)
        if bf16:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).to(p.dtype))
        g1, m1 = greedy_with_margins(model, main_ids, N_GREEDY)
        g2, m2 = greedy_with_margins(model, short_ids, N_GREEDY)
        if min(m1 + m2) >= MIN_MARGIN and len(set(g1)) >= 8 and len(set(g2)) >= 8:
            return seed
    raise SystemExit("no seed found")


def make_mha_tied_bf16(out_dir, tok):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
                      rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(cfg).eval()
    seed = pick_seed(model, tok, SEED + 1, bf16=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    print(f"qwen15: weight seed {seed}")
    os.makedirs(out_dir, exist_ok=True)
    # Weights: bf16, plus the redundant lm_head.weight copy some Qwen1.5 checkpoints carry.
    sd = {k: v.detach().to(torch.bfloat16).contiguous().clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    sd = dict(sorted(sd.items()))
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    # A Qwen1.5-style (transformers 4.37-era) config.json written by hand: top-level rope_theta, torch_dtype.
    # num_key_value_heads is written explicitly (== num_attention_heads), as real Qwen1.5 configs do: when the key
    # is MISSING, transformers (4.x and 5.x) uses its class default 32, not num_attention_heads (only an explicit
    # null falls back to num_attention_heads), so omitting it would not describe an MHA model to transformers.
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 176,
        "max_position_embeddings": 512,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 512,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.37.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    gen = {"bos_token_id": ENDOFTEXT, "do_sample": True, "eos_token_id": [IM_END, ENDOFTEXT],
           "pad_token_id": ENDOFTEXT, "repetition_penalty": 1.1, "top_k": 20, "top_p": 0.8}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    write_tokenizer(out_dir, tok, QWEN15_CHAT_TEMPLATE, "<|im_end|>")


def qwen25_model(tok):
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, use_sliding_window=False)
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(SEED + 10)
    model = Qwen2ForCausalLM(cfg).eval()
    seed = pick_seed(model, tok, SEED + 1000, bf16=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    print(f"qwen25: weight seed {seed}")
    return model


def save_qwen25(model, out_dir, tok, max_shard_size=None):
    os.makedirs(out_dir, exist_ok=True)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kw)
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        config = json.load(f)
    written_by_transformers = {k: config.get(k) for k in ("rope_theta", "rope_parameters", "sliding_window",
                                                         "use_sliding_window", "dtype", "torch_dtype")}
    # transformers 5 writes theta only under rope_parameters; make sure that stays so.
    if "rope_theta" in config:
        theta = config.pop("rope_theta")
        config.setdefault("rope_parameters", {"rope_theta": theta, "rope_type": "default"})
    assert config["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}, config["rope_parameters"]
    # A trap: a small sliding_window that must be ignored because use_sliding_window is false.
    assert config["use_sliding_window"] is False
    config["sliding_window"] = 4
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    gen = {"bos_token_id": ENDOFTEXT, "do_sample": True, "eos_token_id": [IM_END, ENDOFTEXT],
           "pad_token_id": ENDOFTEXT, "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    write_tokenizer(out_dir, tok, QWEN25_CHAT_TEMPLATE, "<|im_end|>")
    return written_by_transformers


def write_tokenizer(out_dir, tok, chat_template, eos):
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(chat_template, eos, 512), f, indent=2, ensure_ascii=False)
        f.write("\n")
    for stale in ("chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt"):
        p = os.path.join(out_dir, stale)
        if os.path.exists(p):
            os.remove(p)


# ---------------------------------------------------------------------------------------------------------
# Reference computation
# ---------------------------------------------------------------------------------------------------------
PROMPT_TEXT = "<|im_start|>user\n你好, world!<|im_end|>\n"
SHORT_PROMPT_TEXT = "The"
N_DECODE = 8
N_GREEDY = 16


def row(t):
    return [f32(x) for x in t.detach().to(torch.float32).reshape(-1).tolist()]


def margin(logits):
    top = torch.topk(logits.to(torch.float32), 2)
    return f32(top.values[0] - top.values[1])


@torch.no_grad()
def reference_for_prompt(model, ids):
    x = torch.tensor([ids], dtype=torch.long)
    out = model(input_ids=x, use_cache=True)
    prefill = out.logits[0]  # [T, V]
    past = out.past_key_values
    next_id = int(torch.argmax(prefill[-1]))
    greedy_margins = [margin(prefill[-1])]
    decode = []
    manual = [next_id]
    pos = len(ids)
    for _ in range(N_DECODE):
        o = model(input_ids=torch.tensor([[next_id]]), past_key_values=past, use_cache=True,
                  position_ids=torch.tensor([[pos]]))
        past = o.past_key_values
        lg = o.logits[0, -1]
        chosen = int(torch.argmax(lg))
        decode.append({"input_id": next_id, "position": pos, "argmax": chosen, "margin": margin(lg),
                       "logits": row(lg)})
        next_id = chosen
        manual.append(chosen)
        if len(manual) <= N_GREEDY:
            greedy_margins.append(margin(lg))
        pos += 1
    # Extend the manual greedy loop to N_GREEDY tokens for a cross-check of generate().
    while len(manual) < N_GREEDY:
        o = model(input_ids=torch.tensor([[next_id]]), past_key_values=past, use_cache=True,
                  position_ids=torch.tensor([[pos]]))
        past = o.past_key_values
        next_id = int(torch.argmax(o.logits[0, -1]))
        manual.append(next_id)
        greedy_margins.append(margin(o.logits[0, -1]))
        pos += 1
    # Cross-check the incremental logits against a full (no-cache) forward over prompt + decoded tokens.
    full = model(input_ids=torch.tensor([ids + manual[:N_DECODE]]), use_cache=False).logits[0]
    for i, d in enumerate(decode):
        diff = (full[len(ids) + i] - torch.tensor(d["logits"])).abs().max().item()
        assert diff < 1e-4, f"cache vs full forward differ by {diff}"
    gc = GenerationConfig(do_sample=False, max_new_tokens=N_GREEDY, min_new_tokens=None, eos_token_id=None,
                          pad_token_id=ENDOFTEXT, bos_token_id=None, temperature=None, top_p=None, top_k=None,
                          repetition_penalty=1.0, num_beams=1)
    gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
    greedy = gen[0, len(ids):].tolist()
    greedy_margins = greedy_margins[:N_GREEDY]
    assert len(greedy_margins) == N_GREEDY
    assert len(greedy) == N_GREEDY, f"generate stopped early: {greedy}"
    assert greedy == manual, f"generate {greedy} != manual greedy {manual}"
    return {
        "prompt_ids": ids,
        "prefill_logits": [row(prefill[t]) for t in range(prefill.shape[0])],
        "prefill_argmax": [int(torch.argmax(prefill[t])) for t in range(prefill.shape[0])],
        "prefill_last_margin": margin(prefill[-1]),
        "decode": decode,
        "greedy_ids": greedy,
        "greedy_margins": greedy_margins,
    }


def make_reference(fixture_dir, description, extra):
    tok = AutoTokenizer.from_pretrained(fixture_dir)
    model = AutoModelForCausalLM.from_pretrained(fixture_dir, dtype=torch.float32).eval()
    cfg = model.config
    prompt_ids = tok(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    short_ids = tok(SHORT_PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    assert len(short_ids) == 1, short_ids
    # The plain `tokenizers` library must agree with transformers on these fixture prompts.
    raw = Tokenizer.from_file(os.path.join(fixture_dir, "tokenizer.json"))
    assert raw.encode(PROMPT_TEXT, add_special_tokens=False).ids == prompt_ids
    main = reference_for_prompt(model, prompt_ids)
    short = reference_for_prompt(model, short_ids)
    rope = getattr(cfg, "rope_parameters", None) or {}
    ref = {
        "description": description,
        "versions": versions(),
        "dtype_computed": "float32",
        "config_as_loaded_by_transformers": {
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.hidden_size // cfg.num_attention_heads, "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": rope.get("rope_theta"), "tie_word_embeddings": cfg.tie_word_embeddings,
            "sliding_window_effective": cfg.sliding_window,
        },
        "prompt_text": PROMPT_TEXT,
        **main,
        "single_token_prompt": {"prompt_text": SHORT_PROMPT_TEXT, **short},
        **extra,
    }
    write_json(os.path.join(fixture_dir, "reference.json"), ref)
    return model, ref


def check_tied_bf16(fixture_dir, model):
    """The saved tensors really are bf16 and the redundant lm_head equals embed_tokens."""
    sd = load_file(os.path.join(fixture_dir, "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert model.config.num_key_value_heads == model.config.num_attention_heads == 4
    assert model.config.rope_parameters["rope_theta"] == 1e6
    assert torch.equal(model.lm_head.weight, sd["model.embed_tokens.weight"].to(torch.float32))
    for q in ("q", "k", "v"):
        assert sd[f"model.layers.0.self_attn.{q}_proj.bias"].abs().sum() > 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "data", "tiny"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    tok = build_tokenizer()

    # (a) Qwen1.5 shape
    a = os.path.join(out, "qwen15-mha-tied-bf16")
    shutil.rmtree(a, ignore_errors=True)
    make_mha_tied_bf16(a, tok)
    model_a, _ = make_reference(a, (
        "Qwen1.5 shape: MHA (num_key_value_heads == num_attention_heads == 4), tied embeddings with a redundant "
        "bit-identical lm_head.weight in the file, bf16 weights (logits computed in float32 from the bf16 "
        "values), top-level rope_theta 1e6, 2 layers, hidden 64, intermediate 176, head_dim 16, vocab 512."), {})
    check_tied_bf16(a, model_a)

    # (b) Qwen2.5 shape, and (c) the same model sharded
    model = qwen25_model(tok)
    b = os.path.join(out, "qwen25-gqa-untied-f32")
    shutil.rmtree(b, ignore_errors=True)
    written = save_qwen25(model, b, tok)
    desc_b = ("Qwen2.5 shape: GQA 4 heads / 2 KV heads, untied lm_head, float32, 3 layers, hidden 64, "
              "intermediate 176, head_dim 16, vocab 512, theta only in rope_parameters (10000), "
              "sliding_window 4 with use_sliding_window false (ignored).")
    model_b, ref_b = make_reference(b, desc_b, {"config_fields_written_by_transformers": written})
    # The reloaded model must match the in-memory one (so the sliding_window edit is really ignored).
    with torch.no_grad():
        ids = torch.tensor([ref_b["prompt_ids"]])
        d = (model(input_ids=ids).logits - model_b(input_ids=ids).logits).abs().max().item()
    assert d == 0.0, f"reloaded model differs from the in-memory one by {d}"

    c = os.path.join(out, "qwen25-sharded")
    shutil.rmtree(c, ignore_errors=True)
    save_qwen25(model, c, tok, max_shard_size="300KB")
    idx = os.path.join(c, "model.safetensors.index.json")
    assert os.path.exists(idx), "not sharded"
    with open(idx) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) >= 3, shards
    _, ref_c = make_reference(c, desc_b.replace("Qwen2.5 shape", "Sharded copy of qwen25-gqa-untied-f32") +
                              f" Saved in {len(shards)} safetensors shards.",
                              {"config_fields_written_by_transformers": written, "shards": shards})
    assert ref_c["greedy_ids"] == ref_b["greedy_ids"] and ref_c["prefill_logits"] == ref_b["prefill_logits"]

    for d in (a, b, c):
        total = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
        print(f"{d}: {sorted(os.listdir(d))} {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
