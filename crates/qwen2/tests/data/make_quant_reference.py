#!/usr/bin/env python3
"""Generates quant_reference.bin: ggml quantized blocks and their dequantized values, as computed by the
`gguf` Python package (gguf.quants.dequantize), for crates/qwen2/tests/gguf_quant.rs.

Usage: python make_quant_reference.py /path/to/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Blocks come from real tensors of the model (start and middle of a tensor) plus random blocks whose f16
scale fields are replaced by sane finite values (random bytes elsewhere).

File format (little-endian), records until EOF:
    u32 ggml type id, u32 number of blocks, the raw block bytes, then the expected f32 values.
"""
import os
import struct
import sys

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

# Byte offsets of f16 scale fields within a block, per type.
SCALE_FIELDS = {T.Q8_0: [0], T.Q5_0: [0], T.Q4_K: [0, 2], T.Q6_K: [208]}
BLOCKS_PER_CASE = 8


def main() -> None:
    reader = GGUFReader(sys.argv[1])
    rng = np.random.default_rng(20240601)
    out = bytearray()

    def record(qtype: T, raw: np.ndarray) -> None:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
        assert raw.size % type_size == 0
        values = dequantize(raw, qtype).astype(np.float32).reshape(-1)
        n_blocks = raw.size // type_size
        assert values.size == n_blocks * block_size
        out.extend(struct.pack("<II", int(qtype), n_blocks))
        out.extend(raw.tobytes())
        out.extend(values.astype("<f4").tobytes())

    for qtype in SCALE_FIELDS:
        _, type_size = GGML_QUANT_SIZES[qtype]
        tensors = [t for t in reader.tensors if t.tensor_type == qtype]
        # Real blocks: the start of the first tensor of this type and the middle of the last one.
        first = np.asarray(tensors[0].data).reshape(-1)
        record(qtype, first[: BLOCKS_PER_CASE * type_size])
        last = np.asarray(tensors[-1].data).reshape(-1)
        mid = (last.size // type_size // 2) * type_size
        record(qtype, last[mid : mid + BLOCKS_PER_CASE * type_size])
        # Random blocks with finite scales of both signs, including a subnormal and a zero scale.
        raw = rng.integers(0, 256, size=(BLOCKS_PER_CASE, type_size), dtype=np.uint8)
        scales = (rng.standard_normal((BLOCKS_PER_CASE, len(SCALE_FIELDS[qtype]))) * 0.02).astype(np.float16)
        scales[0, 0] = np.float16(3e-6)  # subnormal in f16
        scales[1, 0] = np.float16(0.0)
        scales[2, 0] = np.float16(-0.0)
        for b in range(BLOCKS_PER_CASE):
            for k, offset in enumerate(SCALE_FIELDS[qtype]):
                raw[b, offset : offset + 2] = np.frombuffer(scales[b, k].tobytes(), dtype=np.uint8)
        record(qtype, raw)

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quant_reference.bin"), "wb") as f:
        f.write(bytes(out))
    print(f"wrote {len(out)} bytes")


if __name__ == "__main__":
    main()
