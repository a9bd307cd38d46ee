"""Checks a DCP checkpoint directory that the C++ side wrote, with Python's torch.

usage: dcp_check.py MODE DIR EXPECTED_PT

EXPECTED_PT is a torch.save file of the state dict DIR should hold, every
tensor whole. MODE says how DIR is read:

  load           torch 2.x: dcp.load, with no process group, into a nested
                 state dict shaped like EXPECTED (zero tensors, None for the rest)
  to_torch_save  torch 2.x: format_utils.dcp_to_torch_save, then torch.load
  gloo2          torch 2.x: dcp.load on two gloo ranks, every tensor with at
                 least two rows as a DTensor sharded by rows (Shard(0))
  legacy         torch 1.13: torch.distributed._shard.checkpoint.load_state_dict
                 with no_dist=True into a flat state dict (EXPECTED is flat)

In every mode DIR's .metadata must name exactly the keys of EXPECTED as DCP
flattens it, each tensor with its dtype and shape and everything else as
bytes, and (torch 2.x) its planner_data must map each key to its path in
EXPECTED. What is read must equal EXPECTED exactly: tensors in dtype, shape and
every byte, floats bit for bit, everything else with == (tuple is not list,
bool is not int). Prints nothing and exits 0 when it does; otherwise prints
the first difference and exits 1.
"""

import datetime
import os
import struct
import sys
import tempfile

import torch

from interop_common import free_port, quiet_torch2_warnings

try:
    import torch.distributed.checkpoint as dcp  # torch >= 2.0
    LEGACY = False
except ImportError:  # torch 1.13 on Python 3.11
    import torch113_dcp  # noqa: F401  (must come before the import below)
    import torch.distributed._shard.checkpoint as dcp
    LEGACY = True

GLOO_RANKS = 2

quiet_torch2_warnings()


class Mismatch(Exception):
    pass


def load_expected(path):
    if LEGACY:
        # torch 1.13's weights_only unpickler refuses BINFLOAT, so any float.
        return torch.load(path, map_location="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def float_bits(x):
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def raw_bytes(t):
    """The bytes of `t` in row-major order, as a flat uint8 tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def compare_tensors(got, want, path):
    if not torch.is_tensor(got):
        raise Mismatch(f"{path}: expected a tensor, got {type(got).__name__} {got!r}")
    if got.dtype != want.dtype:
        raise Mismatch(f"{path}: dtype is {got.dtype}, expected {want.dtype}")
    if got.shape != want.shape:
        raise Mismatch(f"{path}: shape is {tuple(got.shape)}, expected {tuple(want.shape)}")
    gb, wb = raw_bytes(got), raw_bytes(want)
    if not torch.equal(gb, wb):
        first = int((gb != wb).nonzero()[0])
        size = want.element_size()
        element = first // size

        def show(t, b):
            raw = bytes(b[element * size:(element + 1) * size].tolist()).hex()
            return f"{t.reshape(-1)[element].item()!r} (bytes {raw})"
        raise Mismatch(f"{path}: bytes differ, first at byte {first} (element {element}): "
                       f"got {show(got, gb)}, expected {show(want, wb)}")


def is_dict(x):
    return isinstance(x, dict)


def compare(got, want, path="<root>"):
    """Raises Mismatch naming the first difference between `got` and `want`.

    Dicts are compared regardless of key order (dict and OrderedDict alike);
    other types must match exactly (bool is not int, tuple is not list)."""
    if torch.is_tensor(want):
        compare_tensors(got, want, path)
        return
    if is_dict(want):
        if not is_dict(got):
            raise Mismatch(f"{path}: expected a dict, got {type(got).__name__} {got!r}")
        missing = [k for k in want if k not in got]
        if missing:
            raise Mismatch(f"{path}: keys {missing!r} missing")
        extra = [k for k in got if k not in want]
        if extra:
            raise Mismatch(f"{path}: unexpected keys {extra!r}")
        for k in want:
            compare(got[k], want[k], f"{path}[{k!r}]")
        return
    if type(got) is not type(want):
        raise Mismatch(f"{path}: type is {type(got).__name__}, expected {type(want).__name__}: "
                       f"got {got!r}, expected {want!r}")
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            raise Mismatch(f"{path}: length {len(got)}, expected {len(want)}: got {got!r}, expected {want!r}")
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        if float_bits(got) != float_bits(want):
            raise Mismatch(f"{path}: {got!r} (bits {float_bits(got):016x}), expected {want!r} "
                           f"(bits {float_bits(want):016x})")
    elif got != want:
        raise Mismatch(f"{path}: {got!r}, expected {want!r}")


def flatten(expected):
    """EXPECTED as DCP stores it: {key: value} and {key: path in EXPECTED}
    (None for torch 1.13, which stores the top-level keys as they are)."""
    if LEGACY:
        return expected, None
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    return flatten_state_dict(expected)


def check_metadata(directory, expected):
    """DIR's .metadata names the keys of EXPECTED, each tensor with its dtype
    and shape, everything else as bytes; and, for torch 2.x, its planner_data
    maps each key to its path in the nested state dict."""
    metadata = dcp.FileSystemReader(directory).read_metadata()
    stored = metadata.state_dict_metadata
    flat, mappings = flatten(expected)
    missing = [k for k in flat if k not in stored]
    if missing:
        raise Mismatch(f".metadata lacks the keys {missing!r}")
    extra = [k for k in stored if k not in flat]
    if extra:
        raise Mismatch(f".metadata has keys EXPECTED lacks: {extra!r}")
    for key, want in flat.items():
        md = stored[key]
        if torch.is_tensor(want):
            if not isinstance(md, dcp.TensorStorageMetadata):
                raise Mismatch(f".metadata: {key!r} is a {type(md).__name__}, expected a tensor")
            if md.properties.dtype != want.dtype or tuple(md.size) != tuple(want.shape):
                raise Mismatch(f".metadata: {key!r} is {md.properties.dtype} of shape {tuple(md.size)}, "
                               f"expected {want.dtype} of shape {tuple(want.shape)}")
        elif not isinstance(md, dcp.BytesStorageMetadata):
            raise Mismatch(f".metadata: {key!r} is a {type(md).__name__}, expected bytes")
    if mappings is not None:
        planner_data = metadata.planner_data
        if not isinstance(planner_data, dict):
            raise Mismatch(f".metadata: planner_data is {planner_data!r}, expected a dict")
        for key, path in mappings.items():
            got = planner_data.get(key)
            if got is None or tuple(got) != tuple(path):
                raise Mismatch(f".metadata: planner_data[{key!r}] is {got!r}, expected {path!r}")


def target_like(want, make_tensor):
    """A state dict shaped like `want` for dcp.load to fill: dicts and lists
    alike (DCP flattens through them), make_tensor(t) for each tensor t, None
    for every other value (DCP stores those whole and replaces them)."""
    if torch.is_tensor(want):
        return make_tensor(want)
    if is_dict(want):
        return {k: target_like(v, make_tensor) for k, v in want.items()}
    if isinstance(want, list):
        return [target_like(v, make_tensor) for v in want]
    return None


def check_load(directory, expected):
    target = target_like(expected, torch.zeros_like)
    dcp.load(target, checkpoint_id=directory)
    compare(target, expected)


def check_to_torch_save(directory, expected):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "converted.pt")
        dcp_to_torch_save(directory, path)
        got = torch.load(path, map_location="cpu", weights_only=False)
    compare(got, expected)


def check_legacy(directory, expected):
    target = {k: torch.zeros_like(v) if torch.is_tensor(v) else None for k, v in expected.items()}
    dcp.load_state_dict(target, dcp.FileSystemReader(directory), no_dist=True)
    compare(target, expected)


def gathered(obj):
    """`obj` with every DTensor (sharded by rows) replaced by the whole tensor,
    gathered from all ranks (collective). Not full_tensor(): Gloo cannot
    all-gather int16."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    if isinstance(obj, DTensor):
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, obj.to_local())
        return torch.cat(pieces)
    if is_dict(obj):
        return {k: gathered(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [gathered(v) for v in obj]
    return obj


def gloo_rank(rank, directory, expected, port):
    import torch.distributed as dist
    import torch.distributed.tensor as dtensor

    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=GLOO_RANKS, timeout=datetime.timedelta(seconds=60))
    mesh = dtensor.init_device_mesh("cpu", (GLOO_RANKS,))

    def sharded(t):
        if t.dim() >= 1 and t.size(0) >= 2:
            return dtensor.zeros(t.shape, dtype=t.dtype, device_mesh=mesh, placements=[dtensor.Shard(0)])
        return torch.zeros_like(t)

    target = target_like(expected, sharded)
    dcp.load(target, checkpoint_id=directory)
    got = gathered(target)
    # No destroy_process_group(): it can hang once a peer has gone, and a
    # forked child ends with os._exit() anyway.
    dist.barrier()
    try:
        compare(got, expected)
    except Mismatch as e:
        print(f"dcp_check.py: gloo2 {directory}: rank {rank}: {e}", file=sys.stderr)
        sys.exit(1)



def check_gloo2(directory, expected):
    import torch.multiprocessing as mp
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        mp.start_processes(gloo_rank, args=(directory, expected, free_port()), nprocs=GLOO_RANKS,
                           start_method="fork")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        raise Mismatch(str(e).strip()) from None


MODES = {
    "load": check_load,
    "to_torch_save": check_to_torch_save,
    "gloo2": check_gloo2,
    "legacy": check_legacy,
}


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in MODES:
        sys.exit(__doc__)
    mode, directory, expected_path = sys.argv[1:]
    if LEGACY != (mode == "legacy"):
        sys.exit(f"dcp_check.py: mode {mode} needs torch {'1.13' if mode == 'legacy' else '2.x'}, "
                 f"this is torch {torch.__version__}")
    try:
        expected = load_expected(expected_path)
        check_metadata(directory, expected)
        MODES[mode](directory, expected)
    except Mismatch as e:
        print(f"dcp_check.py: {mode} {directory}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
