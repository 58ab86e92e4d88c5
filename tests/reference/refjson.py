"""Small helpers shared by the reference-data generators (not used by CI).

JSON is written with floats as ``%.9g`` of their float32 value: 9 significant digits are enough for any
float32 to survive text -> f64 -> f32 unchanged, so Rust can parse them exactly. Lists of numbers are kept on
one line; everything else is indented, which keeps the files diff-friendly and small.
"""

import hashlib
import importlib.metadata
import json
import math

import numpy as np


def f32(x):
    """Round a Python/NumPy/torch scalar to float32 and return a Python float."""
    return float(np.float32(x))


def _fmt_float(x):
    x = np.float32(x)
    if not math.isfinite(float(x)):
        raise ValueError(f"non-finite float {x!r} cannot be written to JSON")
    s = "%.9g" % float(x)
    # "%.9g" of an integral value like 3.0 gives "3": keep it a float for readers that care.
    if all(c in "-0123456789" for c in s):
        s += ".0"
    return s


def _is_scalar(v):
    return v is None or isinstance(v, (bool, int, float, str, np.integer, np.floating))


def _dump(obj, indent, level):
    pad = " " * (indent * (level + 1))
    end = " " * (indent * level)
    if isinstance(obj, bool) or obj is None:
        return json.dumps(obj)
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    if isinstance(obj, (float, np.floating)):
        return _fmt_float(obj)
    if isinstance(obj, str):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_dump(v, indent, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + end + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        if all(_is_scalar(v) for v in obj):
            return "[" + ",".join(_dump(v, indent, level + 1) for v in obj) + "]"
        items = [pad + _dump(v, indent, level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + end + "]"
    if hasattr(obj, "tolist"):
        return _dump(obj.tolist(), indent, level)
    raise TypeError(f"cannot serialise {type(obj)}")


def write_json(path, obj, indent=1):
    text = _dump(obj, indent, 0) + "\n"
    json.loads(text)  # sanity: must be valid JSON
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return len(text.encode("utf-8"))


def versions(*extra):
    out = {}
    for name in ("torch", "transformers", "tokenizers", "safetensors", "numpy", *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path, bufsize=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
