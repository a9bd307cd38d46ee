#!/bin/bash
# The memory bound of `ckpt convert` at scale (docs/convert.md): Python's torch
# writes a 4 GiB torch.save file (32 tensors of 128 MiB: F32, BF16, I64, F16);
# ckpt converts it torch.save -> DCP -> safetensors -> torch.save, each step
# under /usr/bin/time -v; Python's torch then checks the last file against the
# first, bit for bit. Prints each step's peak resident memory as ckpt reports
# it (VmHWM) and as /usr/bin/time does, and the wall time.
#
# usage: tests/perf/convert_4gib.sh DIR [CKPT]   (about 17 GiB free in DIR;
#        CKPT defaults to build/bin/ckpt; /usr/bin/time is Debian's time)
set -euo pipefail
dir=${1:?usage: convert_4gib.sh DIR [CKPT]}
here=$(cd "$(dirname "$0")/../.." && pwd)
ckpt=${2:-$here/build/bin/ckpt}
mkdir -p "$dir"
cd "$dir"
rm -rf big.pt big-dcp big.safetensors back.pt
/usr/bin/python3 - <<'PY'
import torch
g = torch.Generator().manual_seed(1)
sd = {}
for i in range(32):
    dt = [torch.float32, torch.bfloat16, torch.int64, torch.float16][i % 4]
    rows = (128 << 20) // torch.tensor([], dtype=dt).element_size() // 1024
    if dt.is_floating_point:
        sd[f"layers.{i}.weight"] = torch.randn(rows, 1024, generator=g).to(dt)
    else:
        sd[f"layers.{i}.weight"] = torch.randint(-1000, 1000, (rows, 1024), generator=g, dtype=dt)
torch.save(sd, "big.pt")
PY
ls -l big.pt
for step in "big.pt big-dcp" "big-dcp big.safetensors" "big.safetensors back.pt"; do
  # shellcheck disable=SC2086
  /usr/bin/time -v "$ckpt" convert $step 2>&1 | grep -E "peak resident|Maximum resident|Elapsed"
done
/usr/bin/python3 -B "$here/tests/interop/convert_files.py" check big.pt back.pt
