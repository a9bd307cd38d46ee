#!/usr/bin/env bash
# Installs the built ckpt into a scratch prefix, then configures, builds and
# runs tests/consumer against that installed package only.
set -euo pipefail
build_dir=$1
source_dir=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" >/dev/null
cmake -S "$source_dir/tests/consumer" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" \
  -DCMAKE_BUILD_TYPE=Release ${CMAKE_CXX_COMPILER_LAUNCHER:+-DCMAKE_CXX_COMPILER_LAUNCHER=$CMAKE_CXX_COMPILER_LAUNCHER} >/dev/null
cmake --build "$work/build" -j2 >/dev/null
mkdir "$work/out"
"$work/build/consumer" "$work/out"
test -x "$work/prefix/bin/ckpt"
test -x "$work/prefix/bin/ckpt-writer"
test -x "$work/prefix/bin/ckpt-launch"
"$work/prefix/bin/ckpt" verify "$work/out"
