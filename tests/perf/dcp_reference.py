"""Python torch DCP reference timings for bench_dcp.

usage: dcp_reference.py DIR N_TENSORS NUMEL ROUNDS
Saves N_TENSORS float32 tensors of NUMEL elements with FileSystemWriter (no
process group) into DIR, then loads them in place into preallocated tensors
with FileSystemReader, ROUNDS times each. Prints the best save and the best
load, in seconds, on one line.
"""
import os
import shutil
import sys
import time
import warnings

import torch

try:
    import torch.distributed.checkpoint as dcp  # torch >= 2.0
except ImportError:  # torch 1.13 on Python 3.11
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "interop"))
    import torch113_dcp  # noqa: F401
    import torch.distributed._shard.checkpoint as dcp


def save(sd, path):
    if hasattr(dcp, "save"):  # torch >= 2.2
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path))
    else:
        dcp.save_state_dict(sd, dcp.FileSystemWriter(path), no_dist=True)


def load(sd, path):
    if hasattr(dcp, "load"):
        dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
    else:
        dcp.load_state_dict(sd, dcp.FileSystemReader(path), no_dist=True)


def main():
    warnings.simplefilter("ignore")
    path, n, numel, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    sd = {f"layers.{i}.weight": torch.full((numel,), float(i)) for i in range(n)}
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    saves, loads = [], []
    for _ in range(rounds):
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        start = time.perf_counter()
        save(sd, path)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        load(target, path)
        loads.append(time.perf_counter() - start)
    for k in sd:
        assert torch.equal(sd[k], target[k]), k
    shutil.rmtree(path, ignore_errors=True)
    print(min(saves), min(loads))


if __name__ == "__main__":
    main()
