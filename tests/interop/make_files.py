#!/usr/bin/env python3
"""Writes the Python-side checkpoints interop_test.cpp reads with ckpt.

usage: make_files.py OUTDIR

  values.pt   torch.save(expected_values(python_side=True)): every dtype, special
              floats, 0-dim and empty tensors, views, shared storages, nested
              containers, an OrderedDict, int keys, unicode, 2**40, None, bool.
  module.pt   nn.Sequential(Linear, ReLU, Linear).state_dict()
  adam.pt     optim.Adam(...).state_dict() after one step
  torch2.pt   torch2_values() in torch 2.x's layout (hand-made with zipfile:
              torch 1.13 cannot write it)
  NAME.dump   interop_common.dump() of what torch.load reads from NAME.pt
"""
import sys

sys.dont_write_bytecode = True

import io
import os
import struct
import zipfile

import torch

import interop_common as ic


def save(obj, outdir, name):
    path = os.path.join(outdir, name + ".pt")
    torch.save(obj, path)
    with open(os.path.join(outdir, name + ".dump"), "w") as f:
        f.write(ic.dump(torch.load(path)))
    return path


def local_data_offset(f, info):
    f.seek(info.header_offset)
    header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise SystemExit(f"{info.filename}: no local header at {info.header_offset}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def write_torch2_layout(path, obj):
    """Writes `obj` as torch 2.x does: prefix `archive/`, the records
    data.pkl, .format_version, .storage_alignment, byteorder, data/<key>...,
    version, .data/version, .data/serialization_id, all stored, every record's
    data aligned to 64 bytes by padding in the local header's extra field."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    prefix = src.namelist()[0].split("/")[0]
    data_prefix = prefix + "/data/"
    keys = sorted((n[len(data_prefix):] for n in src.namelist() if n.startswith(data_prefix)), key=int)
    records = [("archive/data.pkl", src.read(prefix + "/data.pkl")),
               ("archive/.format_version", b"1"),
               ("archive/.storage_alignment", b"64"),
               ("archive/byteorder", b"little")]
    records += [("archive/data/" + k, src.read(data_prefix + k)) for k in keys]
    records += [("archive/version", b"3\n"),
                ("archive/.data/version", b"3\n"),
                ("archive/.data/serialization_id", b"1046392841751034209416301275486052919447")]
    with open(path, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
            for name, data in records:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_STORED
                fixed = f.tell() + 30 + len(name.encode()) + 4
                pad = (-fixed) % 64
                info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
                z.writestr(info, data)
    # Check what was made: the layout, the alignment, and that torch reads it.
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        names = z.namelist()
        if names != [n for n, _ in records]:
            raise SystemExit(f"{path}: records are {names}")
        for info in z.infolist():
            if local_data_offset(f, info) % 64 != 0:
                raise SystemExit(f"{path}: {info.filename} is not 64-byte aligned")
        if z.testzip() is not None:
            raise SystemExit(f"{path}: bad CRC")
    ic.compare(torch.load(path), obj)


def main():
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)

    values = ic.expected_values(python_side=True)
    path = save(values, outdir, "values")
    loaded = torch.load(path)  # self-check of the comparison itself
    ic.compare(loaded, values)
    ic.check_sharing(loaded)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.arange(15, dtype=torch.float32).reshape(5, 3) * 0.1 - 0.7
    model(x).square().sum().backward()
    opt.step()
    save(model.state_dict(), outdir, "module")
    save(opt.state_dict(), outdir, "adam")

    obj = ic.torch2_values()
    write_torch2_layout(os.path.join(outdir, "torch2.pt"), obj)
    with open(os.path.join(outdir, "torch2.dump"), "w") as f:
        f.write(ic.dump(torch.load(os.path.join(outdir, "torch2.pt"))))
    print("wrote", sorted(os.listdir(outdir)))


if __name__ == "__main__":
    main()
