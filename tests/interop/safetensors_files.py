"""Hugging Face safetensors both ways, for tests/safetensors_interop_test.cpp.

Runs with Python's own safetensors package (the trixie chroot: torch 2.6 and
python3-safetensors; Debian bookworm's Python has no safetensors).

usage: safetensors_files.py write OUT_DIR
       safetensors_files.py check DIR

write: OUT_DIR gets, each beside a torch.save of the same tensors (<case>.pt,
the reference the C++ side compares with, bit for bit):
  dtypes.safetensors   save_file of every dtype safetensors and torch 1.13
                       share (bf16 and bool among them), special values, a 0-d
                       and two empty tensors, a transposed tensor made
                       contiguous; metadata {"format": "pt", "note": NOTE}
  model.safetensors    save_model of a small nn.Sequential whose embedding and
                       output layer share one weight (tied): save_model keeps
                       one name and records the other in the metadata;
                       model.pt holds model.state_dict() with both names
  sharded/             save_file of two shards and the index transformers
                       writes (model.safetensors.index.json: metadata
                       total_size, weight_map sorted by name); sharded.pt
check: DIR/manifest.json lists what ckpt wrote: {"files": {case: file},
  "indexes": {case: index}, "metadata": {case: {str: str}}}. Each file is
  loaded with safetensors.torch.load_file (an index by loading every shard its
  weight_map names) and compared with DIR/<case>.pt (written by ckpt, read with
  torch.load(weights_only=True)): names, dtypes, shapes and bytes; its metadata
  through safe_open; and its header read here by hand: 8-aligned data, offsets
  contiguous from 0 and aligned to each tensor's element size. Prints "ok
  <case>" for each; exits 1 at the first difference.
"""

import json
import math
import os
import struct
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model

NOTE = "h\u00e9llo \"quoted\" \u65e5\u672c"
SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
         "BOOL": 1}


def every_dtype():
    specials = torch.tensor([0.1, -0.0, math.inf, -math.inf, math.nan, 1e300, -1e-300, 5e-324, 65504.0,
                             65505.0, 1.0 / 3.0, -2.5], dtype=torch.float64)
    return {
        "f64": specials.reshape(3, 4),
        "f32": specials.to(torch.float32),
        "f16": specials.to(torch.float16).reshape(2, 6),
        "bf16": specials.to(torch.bfloat16),
        "i64": torch.tensor([-2**63, 2**63 - 1, 0, -1, 2**40], dtype=torch.int64),
        "i32": torch.tensor([-2**31, 2**31 - 1, 0, -1], dtype=torch.int32),
        "i16": torch.tensor([-32768, 32767, 0, -1], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0, -1], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 1, 128], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.empty(0, dtype=torch.float32),
        "empty_2d": torch.empty(2, 0, 3, dtype=torch.float16),
        "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t().contiguous(),
    }


class Tied(torch.nn.Module):
    """An embedding and an output layer sharing one weight, a norm between."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def write(out):
    torch.manual_seed(0)
    tensors = every_dtype()
    save_file(tensors, os.path.join(out, "dtypes.safetensors"), metadata={"format": "pt", "note": NOTE})
    torch.save(tensors, os.path.join(out, "dtypes.pt"))

    model = Tied()
    with torch.no_grad():
        model.norm.weight.copy_(torch.arange(4, dtype=torch.float32) / 3)
    save_model(model, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out, "model.pt"))

    sharded = os.path.join(out, "sharded")
    os.makedirs(sharded)
    shards = {
        "model-00001-of-00002.safetensors": {"a.weight": torch.randn(3, 5), "a.bias": torch.randn(5).half()},
        "model-00002-of-00002.safetensors": {"b.weight": torch.randn(2, 2).bfloat16(),
                                             "b.mask": torch.tensor([True, False])},
    }
    weight_map, total, everything = {}, 0, {}
    for name, part in shards.items():
        save_file(part, os.path.join(sharded, name), metadata={"format": "pt"})
        for key, t in part.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
            everything[key] = t
    with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    torch.save(everything, os.path.join(out, "sharded.pt"))
    with open(os.path.join(out, "torch_version"), "w") as f:
        f.write(torch.__version__)


def fail(case, what):
    print(f"FAIL {case}: {what}")
    sys.exit(1)


def same(case, name, got, want):
    if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
        fail(case, f"{name}: {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}")
    a = got.contiguous().reshape(-1).view(torch.uint8)
    b = want.contiguous().reshape(-1).view(torch.uint8)
    if not torch.equal(a, b):
        fail(case, f"{name}: other bytes")


def check_header(case, path):
    """The layout ckpt promises, read here without the safetensors package."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    if (8 + n) % 8:
        fail(case, f"{path}: the data starts at {8 + n}, not 8-aligned")
    header = json.loads(data[8:8 + n])
    entries = sorted((v["data_offsets"], k, v["dtype"]) for k, v in header.items() if k != "__metadata__")
    at = 0
    for (begin, end), name, dtype in entries:
        if begin != at:
            fail(case, f"{path}: {name} starts at {begin}, not {at}")
        if dtype in SIZES and begin % SIZES[dtype]:
            fail(case, f"{path}: {name} ({dtype}) starts at {begin}, not aligned to its element size")
        at = end
    if 8 + n + at != len(data):
        fail(case, f"{path}: {len(data) - 8 - n - at} bytes after the last tensor")


def check(root):
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    for case, name in manifest["files"].items():
        path = os.path.join(root, name)
        check_header(case, path)
        got = load_file(path)
        want = torch.load(os.path.join(root, case + ".pt"), weights_only=True)
        if sorted(got) != sorted(want):
            fail(case, f"names {sorted(got)}, expected {sorted(want)}")
        for key in want:
            same(case, key, got[key], want[key])
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta != manifest["metadata"].get(case, {}):
            fail(case, f"metadata {meta}, expected {manifest['metadata'].get(case, {})}")
        print(f"ok {case}")
    for case, name in manifest["indexes"].items():
        index = os.path.join(root, name)
        with open(index) as f:
            doc = json.load(f)
        folder = os.path.dirname(index)
        got = {}
        for shard in sorted(set(doc["weight_map"].values())):
            path = os.path.join(folder, shard)
            check_header(case, path)
            part = load_file(path)
            for key in part:
                if doc["weight_map"].get(key) != shard:
                    fail(case, f"{shard} holds {key}, which the index puts in {doc['weight_map'].get(key)}")
            got.update(part)
        want = torch.load(os.path.join(root, case + ".pt"), weights_only=True)
        if sorted(got) != sorted(want) or sorted(doc["weight_map"]) != sorted(want):
            fail(case, f"names {sorted(got)}, expected {sorted(want)}")
        for key in want:
            same(case, key, got[key], want[key])
        total = sum(t.numel() * t.element_size() for t in want.values())
        if doc["metadata"].get("total_size") != total:
            fail(case, f"total_size {doc['metadata'].get('total_size')}, expected {total}")
        print(f"ok {case}")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        print(__doc__)
        sys.exit(2)
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        check(sys.argv[2])


if __name__ == "__main__":
    main()
