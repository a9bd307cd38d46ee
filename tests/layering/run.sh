#!/usr/bin/env bash
# The layering check passes on the tree, and fails on each kind of violation
# planted in a copy of it: an upward include, Asio in the format layer, c10d
# in the barrier interface, an include cycle, a source outside the layers.
#
# usage: run.sh SOURCE_DIR
set -euo pipefail
src=$1
check="$src/cmake/check_layers.py"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

/usr/bin/python3 "$check" "$src"

fresh() {
  rm -rf "$work/tree"
  mkdir -p "$work/tree"
  cp -r "$src/lib" "$src/include" "$work/tree/"
}
expect_failure() {
  local what=$1 needle=$2
  if /usr/bin/python3 "$check" "$work/tree" >"$work/out" 2>&1; then
    echo "FAIL: the check passed with $what"
    exit 1
  fi
  if ! grep -qF -- "$needle" "$work/out"; then
    echo "FAIL: with $what the check said:"
    cat "$work/out"
    echo "(expected it to mention: $needle)"
    exit 1
  fi
  echo "ok: $what is refused"
}

fresh
sed -i '0,/#include/s//#include <ckpt\/async_checkpointer.hpp>\n#include/' "$work/tree/lib/format/zip.cpp"
expect_failure "format including the async checkpointer" \
  "layer 'format' includes 'ckpt/async_checkpointer.hpp' of layer 'async'"

fresh
sed -i '0,/#include/s//#include "dcp\/serialize.hpp"\n#include/' "$work/tree/lib/dist/dist.cpp"
expect_failure "dist including DCP" "layer 'dist' includes 'dcp/serialize.hpp' of layer 'dcp'"

fresh
sed -i '0,/#include/s//#include <boost\/asio\/post.hpp>\n#include/' "$work/tree/lib/format/file_reader.cpp"
expect_failure "Asio in the format layer" "which layer 'format' must not see"

fresh
sed -i '0,/#include/s//#include <torch\/csrc\/distributed\/c10d\/Store.hpp>\n#include/' "$work/tree/include/ckpt/barrier.hpp"
expect_failure "c10d in the barrier interface" "includes <torch/csrc/distributed/c10d/Store.hpp>"

fresh
sed -i '0,/#include/s//#include <ckpt\/checkpoint_reader.hpp>\n#include/' "$work/tree/lib/checkpoint/commit.cpp"
sed -i '0,/#include/s//#include <ckpt\/commit.hpp>\n#include/' "$work/tree/lib/checkpoint/checkpoint_reader.cpp"
expect_failure "commit and checkpoint_reader including each other" "commit -> checkpoint_reader (lib/checkpoint/commit.cpp:1)"

fresh
echo '#include <ckpt/error.hpp>' >"$work/tree/lib/stray.cpp"
expect_failure "a source outside the layer folders" "lib/stray.cpp: a source outside every layer folder"

echo "layering: 1 passed, 0 failed"
