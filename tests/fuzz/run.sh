#!/usr/bin/env bash
# Builds the reader's fuzz target with clang (ASan + UBSan), seeds its corpus
# with valid files from ckpt and from Python's torch.save, and fuzzes for a
# bounded time. Exit status non-zero on any finding.
#
# usage: run.sh SOURCE_DIR BUILD_DIR SECONDS [extra libFuzzer flags...]
set -euo pipefail
src=$1
build=$2
seconds=$3
shift 3
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$src/tests/fuzz" -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "${launcher[@]}" >/dev/null
cmake --build "$build" -j2 >/dev/null
seeds="$build/seeds"
corpus="$build/corpus"
rm -rf "$seeds"
mkdir -p "$seeds" "$corpus"
export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0
"$build/make_seeds" "$seeds"
/usr/bin/python3 "$src/tests/fuzz/make_seeds.py" "$seeds"
# -rss_limit_mb catches a huge allocation driven by the input.
"$build/reader_fuzz" -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=20 \
  -print_final_stats=1 "$@" "$corpus" "$seeds" 2>&1 | grep -v '^#[0-9]*.*\(NEW\|REDUCE\|pulse\)' | tail -25
echo "fuzz: no finding in ${seconds}s"
