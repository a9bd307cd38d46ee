"""Rewrites a DCP checkpoint with every item through upstream's ZStandard
stream transform ("stream.zstd/1"), for dcp_interop_test.

usage: dcp_zstd.py SRC_DIR DST_DIR

DST_DIR gets SRC_DIR's items, each compressed into one zstd frame (the zstd
command), one after another in one data file, and a .metadata whose
_StorageInfo entries give the compressed bytes' offset and length and
transform_descriptors = ["stream.zstd/1"], as torch's _extensions write them.
"""

import os
import pickle
import subprocess
import sys

try:
    import torch.distributed.checkpoint  # noqa: F401  (torch >= 2.0)
except ImportError:  # torch 1.13 on Python 3.11
    import torch113_dcp  # noqa: F401
    import torch.distributed._shard.checkpoint  # noqa: F401


def main():
    src, dst = sys.argv[1], sys.argv[2]
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, ".metadata"), "rb") as f:
        md = pickle.load(f)
    out = bytearray()
    for info in md.storage_data.values():
        with open(os.path.join(src, info.relative_path), "rb") as f:
            f.seek(info.offset)
            raw = f.read(info.length)
        frame = subprocess.run(["zstd", "-q", "-c", "-3"], input=raw, stdout=subprocess.PIPE, check=True).stdout
        info.relative_path = "__0_0.distcp"
        info.offset = len(out)
        info.length = len(frame)
        info.transform_descriptors = ["stream.zstd/1"]
        out += frame
    with open(os.path.join(dst, "__0_0.distcp"), "wb") as f:
        f.write(out)
    with open(os.path.join(dst, ".metadata"), "wb") as f:
        pickle.dump(md, f)


if __name__ == "__main__":
    main()
