#!/usr/bin/env bash
# Installs the Debian packages ckpt builds, tests and runs with (Debian bookworm).
# Idempotent: when every package is already installed it does nothing and
# touches no package list. Runs as root, or through sudo when it is available.
set -euo pipefail

packages=(
  cmake g++ make ccache pkg-config
  libtorch-dev libgloo-dev
  libboost1.81-dev libboost-test1.81-dev libboost-json1.81-dev
  libfmt-dev zlib1g-dev
  python3-torch
  clang libclang-rt-14-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  as_root=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
