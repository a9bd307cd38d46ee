"""Writes PyTorch DCP checkpoints with this Python's torch, for dcp_interop_test.

usage: dcp_files.py OUT_DIR

OUT_DIR/<case>/ is a DCP checkpoint directory as torch's FileSystemWriter
writes it, and OUT_DIR/<case>.pt the same state dict saved with torch.save: the
C++ side loads the first and compares it bit for bit with the second.
"""

import os
import sys

import torch

try:
    import torch.distributed.checkpoint as dcp  # torch >= 2.0
    LEGACY = False
except ImportError:  # torch 1.13 on Python 3.11
    import torch113_dcp  # noqa: F401  (must come before the import below)
    import torch.distributed._shard.checkpoint as dcp
    LEGACY = True

from interop_common import DTYPES, pattern, specials


def state_dict():
    """Tensors of every dtype, special values, scalars, empty tensors, a
    non-contiguous view, and plain values."""
    sd = {}
    for name, dt in DTYPES.items():
        sd["pattern_" + name] = pattern(dt)
        sd["specials_" + name] = specials(dt)
    sd["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    sd["empty"] = torch.zeros(2, 0, dtype=torch.int16)
    sd["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    sd["row_of_a_bigger_storage"] = torch.arange(40, dtype=torch.int64).reshape(4, 10)[2]
    sd["step"] = 7
    sd["lr"] = 0.25
    sd["name"] = "h\u00e9llo"
    sd["flags"] = [1, 2.5, "x", None, True]
    sd["nested"] = {"x": torch.ones(2), "y": {"z": 3}}
    sd["big"] = torch.arange(256 * 1024, dtype=torch.float32).reshape(256, 1024)
    return sd


def save(directory, sd, **writer_options):
    os.makedirs(directory, exist_ok=True)
    writer = dcp.FileSystemWriter(directory, **writer_options)
    if LEGACY:
        dcp.save_state_dict(sd, writer, no_dist=True)
    else:
        dcp.save_state_dict(sd, writer, no_dist=True)


def main():
    out = sys.argv[1]
    sd = state_dict()
    torch.save(sd, os.path.join(out, "values.pt"))
    save(os.path.join(out, "one_file"), sd, single_file_per_rank=True)
    save(os.path.join(out, "per_item"), sd, single_file_per_rank=False)
    with open(os.path.join(out, "torch_version"), "w") as f:
        f.write(torch.__version__)


if __name__ == "__main__":
    main()
