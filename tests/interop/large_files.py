#!/usr/bin/env python3
"""Checkpoints larger than 4 GiB (zip64), for interop_large_test.cpp.

usage:
  large_files.py make FILE N     torch.save({'big': uint8[N] with big[i] = i % 251,
                                 'after': arange(1000) * 3, 'name': 'python-large'})
  large_files.py check FILE N M  FILE (written by ckpt) holds {'big': uint8[N], i % 251;
                                 'second': uint8[M], i % 241; 'tail': arange(1000) * 3;
                                 'name': 'ckpt-large'}, read by torch.load; then
                                 zipfile: every CRC right, zip64 sizes and offsets,
                                 every tensor record's data 4096-byte aligned

Byte patterns are checked completely and cheaply: the first period against
arange, then t[p:] == t[:-p]; windows around 2 and 4 GiB are also compared
directly. Exits non-zero with a message on the first mismatch.
"""
import sys

sys.dont_write_bytecode = True

import gc
import struct
import zipfile

import torch

ZIP32_MAX = 0xFFFFFFFF
ALIGN = 4096


class Mismatch(Exception):
    pass


def periodic(n, period):
    """uint8[n] with t[i] = i % period, built without an int64 temporary of n."""
    t = torch.empty(n, dtype=torch.uint8)
    first = min(n, period)
    t[:first] = torch.arange(first, dtype=torch.int64).to(torch.uint8)
    filled = first
    while filled < n:  # filled stays a multiple of period until the last copy
        m = min(filled, n - filled)
        t[filled:filled + m] = t[:m]
        filled += m
    return t


def windows(n):
    starts = [0, n // 3, n // 2, 2**31 - 2048, 2**32 - 2048, n - 4096]
    return sorted({min(max(s, 0), max(n - 4096, 0)) for s in starts})


def check_periodic(name, t, n, period):
    if not torch.is_tensor(t) or t.dtype != torch.uint8 or tuple(t.shape) != (n,):
        raise Mismatch(f"{name}: expected uint8[{n}], got "
                       f"{t.dtype if torch.is_tensor(t) else type(t).__name__} {tuple(getattr(t, 'shape', ()))}")
    if t.stride() != (1,) or t.storage_offset() != 0:
        raise Mismatch(f"{name}: stride {t.stride()}, offset {t.storage_offset()}")
    for s in windows(n):
        e = min(s + 4096, n)
        want = (torch.arange(s, e, dtype=torch.int64) % period).to(torch.uint8)
        if not torch.equal(t[s:e], want):
            bad = s + int((t[s:e] != want).nonzero()[0])
            raise Mismatch(f"{name}[{bad}] is {int(t[bad])}, expected {bad % period}")
    first = min(n, period)
    if not torch.equal(t[:first], torch.arange(first, dtype=torch.int64).to(torch.uint8)):
        raise Mismatch(f"{name}: the first {first} bytes are not 0..{first - 1}")
    if n > period and not torch.equal(t[period:], t[:n - period]):
        raise Mismatch(f"{name}: the bytes do not repeat with period {period}")


def check_exact(name, got, want):
    if not torch.is_tensor(got) or got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        raise Mismatch(f"{name}: {got!r}, expected {want!r}")


def make(path, n):
    torch.save({"big": periodic(n, 251), "after": torch.arange(1000, dtype=torch.int64) * 3,
                "name": "python-large"}, path)
    print(f"{path}: written by torch.save")


def check(path, n, m):
    loaded = torch.load(path, map_location="cpu")
    if type(loaded) is not dict or list(loaded) != ["big", "second", "tail", "name"]:
        raise Mismatch(f"top level: {type(loaded).__name__} with keys {list(loaded)}")
    check_periodic("big", loaded["big"], n, 251)
    check_periodic("second", loaded["second"], m, 241)
    check_exact("tail", loaded["tail"], torch.arange(1000, dtype=torch.int64) * 3)
    if loaded["name"] != "ckpt-large":
        raise Mismatch(f"name: {loaded['name']!r}")
    del loaded
    gc.collect()
    print(f"{path}: torch.load reads every byte right")

    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        infos = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
        sizes = {"data/0": n, "data/1": m, "data/2": 8000}
        for key, size in sizes.items():
            if key not in infos or infos[key].file_size != size:
                raise Mismatch(f"record {key}: size {getattr(infos.get(key), 'file_size', None)}, expected {size}")
        if infos["data/0"].header_offset > ZIP32_MAX or infos["data/1"].header_offset <= ZIP32_MAX:
            raise Mismatch("records are not where a > 4 GiB record puts them "
                           f"({infos['data/0'].header_offset}, {infos['data/1'].header_offset})")
        for info in z.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                raise Mismatch(f"{info.filename}: no local header at {info.header_offset}")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            data_offset = info.header_offset + 30 + name_len + extra_len
            if "/data/" in info.filename and data_offset % ALIGN:
                raise Mismatch(f"{info.filename}: data at {data_offset}, not a multiple of {ALIGN}")
        bad = z.testzip()
        if bad is not None:
            raise Mismatch(f"record {bad} fails its CRC check")
    print(f"{path}: zip64 directory right, every CRC right, tensor data 4096-byte aligned")


def main():
    args = sys.argv[1:]
    try:
        if len(args) == 3 and args[0] == "make":
            make(args[1], int(args[2]))
        elif len(args) == 4 and args[0] == "check":
            check(args[1], int(args[2]), int(args[3]))
        else:
            raise SystemExit(__doc__)
    except Mismatch as e:
        print(f"MISMATCH: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
