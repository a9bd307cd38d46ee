"""Writes `.metadata` files whose unpickling would run code in Python.

usage: dcp_hostile.py OUT_DIR CANARY

Each OUT_DIR/<case>/.metadata is a DCP Metadata pickle with one hostile part:
unpickled by Python, each would create the file CANARY. dcp_interop_test
reads them with ckpt (which must refuse each) and checks that CANARY never
appears. Nothing here unpickles them.
"""

import os
import pickle
import sys

try:
    import torch.distributed.checkpoint.metadata as md
except ImportError:  # torch 1.13 on Python 3.11
    import torch113_dcp  # noqa: F401
    import torch.distributed._shard.checkpoint.metadata as md


class RunsShell:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, ("touch " + self.canary,))


class Evaluates:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (eval, ("open(%r, 'w').close()" % self.canary,))


class ExecsThroughGetattr:
    """getattr(MEM_FORMAT_ENCODING, "__class__"): a getattr the allowlist
    names, on an attribute it does not."""

    def __reduce__(self):
        from torch.distributed._shard.sharded_tensor.metadata import MEM_FORMAT_ENCODING
        return (getattr, (MEM_FORMAT_ENCODING, "__class__"))


class EvilMetadata(md.Metadata):
    """A subclass of an allowed class: its name is not on the list."""


def metadata(value):
    return md.Metadata(state_dict_metadata={"w": value}, planner_data=None, storage_data={})


def write(out, case, obj):
    os.makedirs(os.path.join(out, case))
    with open(os.path.join(out, case, ".metadata"), "wb") as f:
        pickle.dump(obj, f)


def main():
    out, canary = sys.argv[1], sys.argv[2]
    write(out, "os_system", metadata(RunsShell(canary)))
    write(out, "builtins_eval", metadata(Evaluates(canary)))
    write(out, "getattr_off_the_list", metadata(ExecsThroughGetattr()))
    write(out, "subclass_of_metadata", EvilMetadata(state_dict_metadata={}, planner_data=None, storage_data={}))
    write(out, "shell_as_storage_data_key",
          md.Metadata(state_dict_metadata={}, planner_data=None, storage_data={RunsShell(canary): 1}))


if __name__ == "__main__":
    main()
