"""Writes hostile DCP checkpoint directories.

usage: dcp_hostile.py OUT_DIR CANARY

OUT_DIR/metadata/<case>/.metadata is a DCP Metadata pickle that ckpt must
refuse as it reads it: some would run code when Python unpickles them (each
would create the file CANARY), others describe impossible tensors.
OUT_DIR/data/<case>/ has a sound .metadata whose data files are not what it
says (past their end, a symlink, a FIFO): ckpt must refuse the load. Nothing
here unpickles anything.
"""

import io
import os
import pickle
import sys

import torch

try:
    import torch.distributed.checkpoint.metadata as md
    import torch.distributed.checkpoint.filesystem as fsmod
except ImportError:  # torch 1.13 on Python 3.11
    import torch113_dcp  # noqa: F401
    import torch.distributed._shard.checkpoint.metadata as md
    import torch.distributed._shard.checkpoint.filesystem as fsmod
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties


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


def tensor_metadata(size, chunk_offsets, chunk_sizes, offset=0, length=64, path="__0_0.distcp"):
    """A one-key checkpoint: "w" of `size`, one chunk, stored at (path, offset, length)."""
    props = TensorProperties(dtype=torch.float32)
    chunk = md.ChunkStorageMetadata(offsets=torch.Size(chunk_offsets), sizes=torch.Size(chunk_sizes))
    tsm = md.TensorStorageMetadata(properties=props, size=torch.Size(size), chunks=[chunk])
    index = md.MetadataIndex("w", torch.Size(chunk_offsets), 0)
    info = fsmod._StorageInfo(relative_path=path, offset=offset, length=length)
    return md.Metadata(state_dict_metadata={"w": tsm}, planner_data=None, storage_data={index: info})


def write(out, case, obj):
    os.makedirs(os.path.join(out, case))
    with open(os.path.join(out, case, ".metadata"), "wb") as f:
        pickle.dump(obj, f)


def main():
    out, canary = sys.argv[1], sys.argv[2]
    meta = os.path.join(out, "metadata")
    write(meta, "os_system", metadata(RunsShell(canary)))
    write(meta, "builtins_eval", metadata(Evaluates(canary)))
    write(meta, "getattr_off_the_list", metadata(ExecsThroughGetattr()))
    write(meta, "subclass_of_metadata", EvilMetadata(state_dict_metadata={}, planner_data=None, storage_data={}))
    write(meta, "shell_as_storage_data_key",
          md.Metadata(state_dict_metadata={}, planner_data=None, storage_data={RunsShell(canary): 1}))
    write(meta, "huge_size", tensor_metadata([2**40, 2**40], [0, 0], [2**40, 2**40]))
    write(meta, "chunk_outside_its_tensor", tensor_metadata([4], [2], [4]))
    write(meta, "chunks_that_do_not_cover_the_tensor", tensor_metadata([8], [0], [4]))
    write(meta, "negative_length", tensor_metadata([4], [0], [4], length=-1))
    write(meta, "path_out_of_the_directory", tensor_metadata([4], [0], [4], path="../x.distcp"))
    write(meta, "absolute_path", tensor_metadata([4], [0], [4], path="/etc/passwd"))
    write(meta, "storage_data_not_a_dict",
          md.Metadata(state_dict_metadata={}, planner_data=None, storage_data=[1, 2]))
    write(meta, "dtype_that_is_not_a_dtype",
          md.Metadata(state_dict_metadata={"w": md.TensorStorageMetadata(
              properties=TensorProperties(dtype=torch.Size), size=torch.Size([4]), chunks=[])},
              planner_data=None, storage_data={}))
    write(meta, "size_not_a_torch_size",
          md.Metadata(state_dict_metadata={"w": md.TensorStorageMetadata(
              properties=TensorProperties(dtype=torch.float32), size=[4], chunks=[])},
              planner_data=None, storage_data={}))

    data = os.path.join(out, "data")
    item = io.BytesIO()
    torch.save(torch.zeros(4), item)
    write(data, "offset_past_the_end", tensor_metadata([4], [0], [4], offset=10**9, length=len(item.getvalue())))
    with open(os.path.join(data, "offset_past_the_end", "__0_0.distcp"), "wb") as f:
        f.write(item.getvalue())
    write(data, "length_past_the_end", tensor_metadata([4], [0], [4], length=len(item.getvalue()) + 100))
    with open(os.path.join(data, "length_past_the_end", "__0_0.distcp"), "wb") as f:
        f.write(item.getvalue())
    write(data, "data_file_is_a_symlink", tensor_metadata([4], [0], [4], length=len(item.getvalue())))
    with open(os.path.join(out, "outside.distcp"), "wb") as f:
        f.write(item.getvalue())
    os.symlink(os.path.join(out, "outside.distcp"), os.path.join(data, "data_file_is_a_symlink", "__0_0.distcp"))
    write(data, "data_file_is_a_fifo", tensor_metadata([4], [0], [4], length=len(item.getvalue())))
    os.mkfifo(os.path.join(data, "data_file_is_a_fifo", "__0_0.distcp"))
    write(data, "data_file_missing", tensor_metadata([4], [0], [4], length=len(item.getvalue())))
    write(data, "item_is_not_an_archive", tensor_metadata([4], [0], [4], length=64))
    with open(os.path.join(data, "item_is_not_an_archive", "__0_0.distcp"), "wb") as f:
        f.write(b"\x80\x04" + b"x" * 62)
    hostile_item = io.BytesIO()
    torch.save({"v": RunsShell(canary)}, hostile_item)
    write(data, "hostile_item_pickle", md.Metadata(
        state_dict_metadata={"v": md.BytesStorageMetadata()}, planner_data=None,
        storage_data={md.MetadataIndex("v"): fsmod._StorageInfo("__0_0.distcp", 0, len(hostile_item.getvalue()))}))
    with open(os.path.join(data, "hostile_item_pickle", "__0_0.distcp"), "wb") as f:
        f.write(hostile_item.getvalue())


if __name__ == "__main__":
    main()
