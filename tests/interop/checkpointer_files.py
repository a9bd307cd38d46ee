#!/usr/bin/env python3
"""The Python side of checkpointer_test's interop cases (torch 1.13, /usr/bin/python3).

usage:
  checkpointer_files.py check DIR   torch.load(DIR/checkpoint_0.pt) equals saved_by_ckpt()
                                    exactly: kinds, keys in order, dtypes, shapes, values
  checkpointer_files.py make DIR    torch.save(made_by_python(), DIR/checkpoint_0.pt)

Every value comes from a deterministic recipe; tests/checkpointer_test.cpp builds
the same values (linear_weight(), linear_bias(), saved_by_ckpt()). Keep the two
in step. Exits non-zero with a message on the first mismatch.
"""
import os
import sys

sys.dont_write_bytecode = True

import torch


def linear_weight():
    """The weight of Linear(10, 5): 5x10 float32, exact in binary."""
    return (torch.arange(50, dtype=torch.float32) * 0.125 - 3.0).reshape(5, 10)


def linear_bias():
    return torch.arange(5, dtype=torch.float32) * -0.75 + 0.5


def saved_by_ckpt():
    """What checkpointer_test saves through SyncCheckpointer (saved_by_ckpt() there)."""
    return {
        "model": {"weight": linear_weight(), "bias": linear_bias()},
        "optimizer": {
            "state": {
                0: {"step": 3, "exp_avg": torch.arange(50, dtype=torch.float64).reshape(5, 10) / 8},
                1: {"step": 3, "exp_avg": torch.full((5,), -0.5, dtype=torch.float64)},
            },
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "nesterov": False, "params": [0, 1]}],
        },
        "epoch": 5,
        "step": 1000,
        "name": "run-1",
        "best": None,
        "mask": torch.arange(6, dtype=torch.int64).remainder(2) == 0,
        "counts": torch.arange(-3, 3, dtype=torch.int32),
    }


def made_by_python():
    """A Linear(10, 5) state dict (an OrderedDict with _metadata) and an epoch."""
    model = torch.nn.Linear(10, 5)
    with torch.no_grad():
        model.weight.copy_(linear_weight())
        model.bias.copy_(linear_bias())
    return {
        "model": model.state_dict(),
        "optimizer": {"param_groups": [{"lr": 0.01}]},
        "epoch": 7,
    }


class Mismatch(Exception):
    pass


def compare(got, want, where="root"):
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise Mismatch(f"{where}: {type(got).__name__}, expected a tensor")
        if got.dtype != want.dtype or got.shape != want.shape:
            raise Mismatch(f"{where}: {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}")
        if got.device.type != "cpu" or not torch.equal(got, want):
            raise Mismatch(f"{where}: values differ: {got} vs {want}")
        return
    if isinstance(want, dict):  # dict and OrderedDict alike
        if not isinstance(got, dict):
            raise Mismatch(f"{where}: {type(got).__name__}, expected a dict")
        if list(got.keys()) != list(want.keys()):
            raise Mismatch(f"{where}: keys {list(got.keys())}, expected {list(want.keys())}")
        for k in want:
            compare(got[k], want[k], f"{where}[{k!r}]")
        return
    if type(got) is not type(want):
        raise Mismatch(f"{where}: {type(got).__name__} {got!r}, expected {type(want).__name__} {want!r}")
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            raise Mismatch(f"{where}: length {len(got)}, expected {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, f"{where}[{i}]")
        return
    if got != want:
        raise Mismatch(f"{where}: {got!r}, expected {want!r}")


def main(argv):
    if len(argv) != 3 or argv[1] not in ("check", "make"):
        print(__doc__, file=sys.stderr)
        return 2
    command, directory = argv[1], argv[2]
    path = os.path.join(directory, "checkpoint_0.pt")
    if command == "check":
        try:
            compare(torch.load(path, map_location="cpu"), saved_by_ckpt())
        except Mismatch as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 1
        print(f"{path}: equals saved_by_ckpt() exactly")
    else:
        os.makedirs(directory, exist_ok=True)
        torch.save(made_by_python(), path)
        print(f"{path}: written by torch.save")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
