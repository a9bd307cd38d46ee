"""Writes PyTorch DCP checkpoints with torch 2.x's dcp.save, for the C++ side.

usage: dcp_torch2_files.py OUT_DIR

For each case below, OUT_DIR/<case>/ is a DCP checkpoint directory and
OUT_DIR/<case>.pt the same nested state dict saved with torch.save, every
tensor whole (a DTensor as its full_tensor()) and nothing in it but dicts,
lists, tuples, tensors, ints, floats, strings, bools and None, so that
torch.load(weights_only=True) reads it: the C++ side loads the first and
compares it bit for bit with the second.

  no_group  dcp_files.state_dict() through dcp.save with no process group
  threads   the same through FileSystemWriter(thread_count=2): two data files
  gloo3     three gloo ranks on a 1-D CPU DeviceMesh: DTensors sharded by rows
            (7 rows over 3 ranks), by columns and replicated, a tensor every
            rank holds alike, and plain values
  module    get_state_dict() of a small model and its AdamW after two steps

OUT_DIR/torch_version is the torch version that wrote them.
"""

import datetime
import glob
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dcp_files
from interop_common import free_port, quiet_torch2_warnings

GLOO_RANKS = 3

quiet_torch2_warnings()


class Failure(Exception):
    pass


def whole(obj):
    """`obj` with every DTensor replaced by its full_tensor() and every other
    tensor by a detached copy (collective when it holds DTensors)."""
    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: whole(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(whole(v) for v in obj)
    return obj


def write_case(out, case, sd, expected, **writer_options):
    directory = os.path.join(out, case)
    if writer_options:
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(directory, **writer_options))
    else:
        dcp.save(sd, checkpoint_id=directory)
    torch.save(expected, directory + ".pt")


def no_group(out):
    sd = dcp_files.state_dict()
    write_case(out, "no_group", sd, sd)


def threads(out):
    sd = dcp_files.state_dict()
    write_case(out, "threads", sd, sd, thread_count=2)
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(out, "threads", "*.distcp")))
    if len(files) != 2:
        raise Failure(f"threads: thread_count=2 wrote {len(files)} data files {files}, expected 2")


def gloo_global_tensors():
    return {
        "rows": torch.arange(35, dtype=torch.float32).reshape(7, 5) * 0.25 - 4.0,
        "cols": (torch.arange(36, dtype=torch.float32).reshape(4, 9) * 1.5 - 20.0).to(torch.bfloat16),
        "replicated": torch.arange(9, dtype=torch.int64).reshape(3, 3) * 1000003 - 2**40,
    }


def gloo_rank(rank, out, port):
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=GLOO_RANKS, timeout=datetime.timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (GLOO_RANKS,))
    full = gloo_global_tensors()
    sd = {
        "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
        "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
        "replicated": distribute_tensor(full["replicated"], mesh, [Replicate()]),
        "plain": torch.arange(6, dtype=torch.float64) / 3.0,
        "step": 11,
        "name": "gloo",
    }
    dcp.save(sd, checkpoint_id=os.path.join(out, "gloo3"))
    expected = whole(sd)
    for key, tensor in full.items():
        if not torch.equal(expected[key], tensor):
            raise Failure(f"gloo3: rank {rank}: full_tensor() of {key} is not the tensor distributed")
    if rank == 0:
        torch.save(expected, os.path.join(out, "gloo3.pt"))
    # No destroy_process_group(): it can hang once a peer has gone, and a
    # forked child ends with os._exit() anyway.
    dist.barrier()



def gloo3(out):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.start_processes(gloo_rank, args=(out, free_port()), nprocs=GLOO_RANKS, start_method="fork")


def module(out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = torch.arange(12).reshape(3, 4) % 10
    target = (torch.arange(24, dtype=torch.float32).reshape(3, 4, 2) - 12.0) / 8.0
    for _ in range(2):
        optim.zero_grad()
        loss = nn.functional.mse_loss(model(tokens), target)
        loss.backward()
        optim.step()
    model_sd, optim_sd = get_state_dict(model, optim)
    sd = {"model": model_sd, "optimizer": optim_sd}
    write_case(out, "module", sd, whole(sd))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    try:
        for case in (gloo3, no_group, threads, module):  # gloo3 forks: first, before any work
            case(out)
    except (Failure, mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        sys.exit(f"dcp_torch2_files.py: {e}")
    with open(os.path.join(out, "torch_version"), "w") as f:
        f.write(torch.__version__)


if __name__ == "__main__":
    main()
