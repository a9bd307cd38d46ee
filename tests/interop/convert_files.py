"""The Python side of convert_test (torch 1.13, or 2.x in the trixie chroot).

  convert_files.py write DIR      torch.save files to convert:
      DIR/flat.pt    a flat state dict, as model.state_dict() gives: every dtype
                     that torch.save, DCP and safetensors share, a transposed
                     (non-contiguous) tensor, a view into a larger storage, an
                     empty tensor and a 0-d one
      DIR/nested.pt  model and optimizer state: nested dicts, int keys, lists,
                     ints, floats, strings, a bool, None
  convert_files.py check A B [--str-keys]
      torch.load of A and of B hold the same: the same keys (with --str-keys,
      A's dict keys as text, as a DCP checkpoint keeps them), the same values,
      and tensors of the same dtype and shape with the same bytes. Exit 0 when
      they do, 1 naming the first difference.
  convert_files.py check-dcp DCPDIR REF [--str-keys]     (torch >= 2.4)
      upstream's format_utils.dcp_to_torch_save of DCPDIR holds what REF does
  convert_files.py check-safetensors FILE REF     (the safetensors package)
      safetensors.torch.load_file of FILE holds REF's tensors
  convert_files.py to-dcp FILE DCPDIR     (torch >= 2.4)
      upstream's format_utils.torch_save_to_dcp of FILE into DCPDIR
"""
import os
import tempfile
import sys

import torch


def flat():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(12, 6, generator=g)
    return {
        "embed.weight": torch.randn(16, 8, generator=g),
        "layers.0.attn.weight": torch.randn(8, 8, generator=g, dtype=torch.float64),
        "layers.0.attn.bias": torch.randn(8, generator=g).half(),
        "layers.0.mlp.weight": torch.randn(8, 4, generator=g).bfloat16(),
        "layers.0.mlp.t": base.t(),
        "layers.0.mlp.rows": base[3:7],
        "counts.i64": torch.randint(-(2**40), 2**40, (5,), generator=g, dtype=torch.int64),
        "counts.i32": torch.randint(-(2**30), 2**30, (3, 3), generator=g, dtype=torch.int32),
        "counts.i16": torch.randint(-(2**14), 2**14, (4,), generator=g, dtype=torch.int16),
        "counts.i8": torch.randint(-100, 100, (6,), generator=g, dtype=torch.int8),
        "counts.u8": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
        "mask": torch.rand(9, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(3.5),
    }


def nested():
    g = torch.Generator().manual_seed(11)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g).half()},
        "optim": {
            "state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.randn(4, 3, generator=g)},
                      1: {"step": torch.tensor(10.0), "exp_avg": torch.randn(4, generator=g)}},
            "param_groups": [{"lr": 0.001, "betas": [0.9, 0.999], "params": [0, 1], "amsgrad": False}],
        },
        "epoch": 3,
        "loss": 0.25,
        "run": "convert",
        "note": None,
    }


def same(a, b, path, str_keys):
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return f"{path}: a tensor in A, {type(b).__name__} in B"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype} {list(a.shape)} in A, {b.dtype} {list(b.shape)} in B"
        ab = a.contiguous().reshape(-1).view(torch.uint8)
        bb = b.contiguous().reshape(-1).view(torch.uint8)
        return None if torch.equal(ab, bb) else f"{path}: the bytes differ"
    if isinstance(a, dict):
        if not isinstance(b, dict):
            return f"{path}: a dict in A, {type(b).__name__} in B"
        ka = {(str(k) if str_keys else k): v for k, v in a.items()}
        if set(ka) != set(b):
            return f"{path}: keys {sorted(map(str, ka))} in A, {sorted(map(str, b))} in B"
        for k, v in ka.items():
            why = same(v, b[k], f"{path}.{k}" if path else str(k), str_keys)
            if why:
                return why
        return None
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{path}: {a!r} in A, {b!r} in B"
        for i, (x, y) in enumerate(zip(a, b)):
            why = same(x, y, f"{path}.{i}", str_keys)
            if why:
                return why
        return None
    if type(a) is not type(b) or a != b:
        return f"{path}: {a!r} in A, {b!r} in B"
    return None


def load(path):
    if int(torch.__version__.split(".")[0]) >= 2:
        return torch.load(path, weights_only=True)
    return torch.load(path)


def main(argv):
    if argv[1] == "write":
        torch.save(flat(), f"{argv[2]}/flat.pt")
        torch.save(nested(), f"{argv[2]}/nested.pt")
        return 0
    if argv[1] == "check":
        why = same(load(argv[2]), load(argv[3]), "", "--str-keys" in argv[4:])
        if why:
            print(f"differ: {why}")
            return 1
        print("same")
        return 0
    if argv[1] == "check-dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.pt")
            dcp_to_torch_save(argv[2], out)
            why = same(load(argv[3]), load(out), "", "--str-keys" in argv[4:])
    elif argv[1] == "to-dcp":
        from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

        torch_save_to_dcp(argv[2], argv[3])
        return 0
    elif argv[1] == "check-safetensors":
        from safetensors.torch import load_file

        why = same(load(argv[3]), load_file(argv[2]), "", False)
    else:
        print(__doc__)
        return 2
    if why:
        print(f"differ: {why}")
        return 1
    print("same")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
