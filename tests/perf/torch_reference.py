"""Python torch reference timings for bench_format (run with /usr/bin/python3).

usage: torch_reference.py save PATH N_TENSORS NUMEL [DEVICE]   -> best of three torch.save + fsync
       torch_reference.py load PATH                   -> one torch.load in this fresh process
Prints one number, in seconds.
"""
import os
import sys
import time

import torch


def best(fn, runs=3):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def save(path, n, numel, device="cpu"):
    sd = {f"t{i}": torch.full((numel,), float(i), device=device) for i in range(n)}

    def once():
        with open(path, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())

    return best(once)


def load(path):
    return best(lambda: torch.load(path), runs=1)


if __name__ == "__main__":
    if sys.argv[1] == "save":
        print(save(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:6]))
    else:
        print(load(sys.argv[2]))
