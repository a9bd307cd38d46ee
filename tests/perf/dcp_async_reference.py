"""Python torch's dcp.async_save, timed for bench_dcp's async table.

usage: dcp_async_reference.py DIR N_TENSORS NUMEL ROUNDS
Saves N_TENSORS float32 tensors of NUMEL elements with dcp.async_save (no
process group: the thread executor of torch 2.6) into DIR, ROUNDS times after
one warm-up save, waiting for each write before the next. Prints the best
blocking time (the call, until it returns its future) and the best time until
the write is done, in seconds, on one line.
"""
import shutil
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp


def main():
    warnings.simplefilter("ignore")
    path, n, numel, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    sd = {f"layers.{i}.weight": torch.full((numel,), float(i)) for i in range(n)}
    blocked, done = [], []
    for r in range(rounds + 1):
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        future = dcp.async_save(sd, checkpoint_id=path)
        returned = time.perf_counter()
        future.result()
        finished = time.perf_counter()
        if r > 0:
            blocked.append(returned - start)
            done.append(finished - start)
    shutil.rmtree(path, ignore_errors=True)
    print(min(blocked), min(done))


if __name__ == "__main__":
    main()
