#!/usr/bin/env python3
"""Checks, with Python's torch and zipfile, checkpoints that ckpt wrote.

usage:
  check_files.py values FILE           torch.load(FILE) equals
                                       expected_values(python_side=False) exactly,
                                       storages shared as they were
  check_files.py roundtrip ORIG FILE [ORIG FILE...]
                                       torch.load(FILE) equals torch.load(ORIG)
                                       exactly (dict and OrderedDict alike)
  check_files.py resave FILE OUT       torch.load(FILE), torch.save to OUT
  check_files.py zip FILE...           zipfile.testzip() finds every CRC right,
                                       every record is stored, and every tensor
                                       record's data (<prefix>/data/<key>)
                                       starts at a multiple of 4096

Exits non-zero with a message on the first mismatch.
"""
import sys

sys.dont_write_bytecode = True

import struct
import zipfile

import torch

import interop_common as ic

ALIGN = 4096


def load(path):
    # Not weights_only=True: torch 1.13's restricted unpickler refuses BINFLOAT,
    # so it cannot load any state dict holding a Python float, torch's own included.
    return torch.load(path, map_location="cpu")


def check_values(path):
    got = load(path)
    ic.compare(got, ic.expected_values(python_side=False))
    ic.check_sharing(got)
    print(f"{path}: values, dtypes, views and shared storages exact")


def check_roundtrip(orig, path):
    ic.compare(load(path), load(orig), dict_types_strict=False)
    print(f"{path}: equals {orig} exactly")


def resave(path, out):
    torch.save(load(path), out)
    print(f"{path}: re-saved by torch.save to {out}")


def check_zip(path):
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        bad = z.testzip()
        if bad is not None:
            raise ic.Mismatch(f"{path}: record {bad} fails its CRC check")
        infos = z.infolist()
        if not infos:
            raise ic.Mismatch(f"{path}: no records")
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise ic.Mismatch(f"{path}: {info.filename} is compressed ({info.compress_type})")
            f.seek(info.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                raise ic.Mismatch(f"{path}: {info.filename}: no local header at {info.header_offset}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            if f.read(name_len).decode("utf-8") != info.filename:
                raise ic.Mismatch(f"{path}: the local header at {info.header_offset} is not {info.filename}")
            data_offset = info.header_offset + 30 + name_len + extra_len
            if "/data/" in info.filename and data_offset % ALIGN != 0:
                raise ic.Mismatch(f"{path}: {info.filename}: data at offset {data_offset}, "
                                  f"not a multiple of {ALIGN}")
        print(f"{path}: {len(infos)} records, CRCs right, tensor data 4096-byte aligned")


def main():
    args = sys.argv[1:]
    try:
        if len(args) == 2 and args[0] == "values":
            check_values(args[1])
        elif len(args) >= 3 and len(args) % 2 == 1 and args[0] == "roundtrip":
            for orig, path in zip(args[1::2], args[2::2]):
                check_roundtrip(orig, path)
        elif len(args) == 3 and args[0] == "resave":
            resave(args[1], args[2])
        elif len(args) >= 2 and args[0] == "zip":
            for path in args[1:]:
                check_zip(path)
        else:
            raise SystemExit(__doc__)
    except ic.Mismatch as e:
        print(f"MISMATCH: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
