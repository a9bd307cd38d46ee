#!/usr/bin/env bash
# Installs the Debian packages ckpt builds, tests and runs with (Debian bookworm).
# Idempotent: when every package is already installed (and the torch 2.6
# chroot made) it does nothing and touches no package list. Runs as root,
# or through sudo when it is available.
set -euo pipefail

packages=(
  cmake g++ make ccache pkg-config
  libtorch-dev libgloo-dev
  libboost1.81-dev libboost-test1.81-dev libboost-json1.81-dev
  libfmt-dev zlib1g-dev
  python3-torch
  clang libclang-rt-14-dev
  debootstrap libzstd-dev zstd libdeflate-dev
  iproute2
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed; then
    missing+=("$p")
  fi
done

as_root=()
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then
  as_root=(sudo)
fi

if [ ${#missing[@]} -ne 0 ]; then
  if [ "$(id -u)" -ne 0 ] && [ ${#as_root[@]} -eq 0 ]; then
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The second Python torch of the interop tests: Debian trixie's python3-torch
# (2.6) in a chroot made from Debian's own registry (~1.5 GB, a few minutes,
# once). Made under a temporary name and renamed when torch imports in it, so
# an interrupted run leaves nothing that looks finished. Tests find it at
# $CKPT_TRIXIE_ROOT (default below); cmake/chroot-python runs Python in it.
trixie=${CKPT_TRIXIE_ROOT:-/var/lib/ckpt/trixie}
if [ ! -e "$trixie/.ckpt-ready" ]; then
  if [ "$(id -u)" -ne 0 ] && [ ${#as_root[@]} -eq 0 ]; then
    echo "install-deps: need root (or sudo) to make the torch 2.6 chroot at $trixie" >&2
    exit 1
  fi
  echo "install-deps: making the Debian trixie chroot with python3-torch at $trixie"
  "${as_root[@]}" rm -rf "$trixie.partial"
  "${as_root[@]}" mkdir -p "$(dirname "$trixie")"
  "${as_root[@]}" debootstrap --variant=minbase \
    --include=python3-torch,python3-numpy,python3-safetensors \
    trixie "$trixie.partial" http://deb.debian.org/debian >/dev/null
  "${as_root[@]}" touch "$trixie.partial/.ckpt-ready"
  "${as_root[@]}" env CKPT_TRIXIE_ROOT="$trixie.partial" "$(dirname "$0")/chroot-python" \
    -c 'import numpy, safetensors, torch; assert torch.__version__.startswith("2.")'
  "${as_root[@]}" rm -rf "$trixie"
  "${as_root[@]}" mv "$trixie.partial" "$trixie"
fi
