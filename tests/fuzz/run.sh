#!/usr/bin/env bash
# Builds the fuzz targets with clang (ASan + UBSan) and fuzzes each for a
# bounded time: the file reader (seeded with valid files from ckpt and from
# Python's torch.save), PyTorch's DCP .metadata decoder (seeded with the
# .metadata files of Python's DCP and of the hostile cases) and the
# safetensors header and index parsers (seeded with files ckpt writes, with a
# dictionary of the format's words). Exit status non-zero on any finding.
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
echo "fuzz: the reader: no finding in ${seconds}s"

md_seeds="$build/metadata_seeds"
md_corpus="$build/metadata_corpus"
rm -rf "$md_seeds" "$build/dcp"
mkdir -p "$md_seeds" "$md_corpus" "$build/dcp"
/usr/bin/python3 -B "$src/tests/interop/dcp_files.py" "$build/dcp" >/dev/null
/usr/bin/python3 -B "$src/tests/interop/dcp_hostile.py" "$build/dcp/hostile" "$build/dcp/canary" >/dev/null
n=0
while IFS= read -r f; do
  cp "$f" "$md_seeds/seed_$n"
  n=$((n + 1))
done < <(find "$build/dcp" -name .metadata)
"$build/metadata_fuzz" -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=20 \
  -print_final_stats=1 "$@" "$md_corpus" "$md_seeds" 2>&1 | grep -v '^#[0-9]*.*\(NEW\|REDUCE\|pulse\)' | tail -25
test ! -e "$build/dcp/canary"
echo "fuzz: the .metadata decoder: no finding in ${seconds}s"

st_seeds="$build/st_seeds"
st_corpus="$build/st_corpus"
rm -rf "$st_seeds"
mkdir -p "$st_seeds" "$st_corpus"
"$build/safetensors_seeds" "$st_seeds" "$build/safetensors.dict"
"$build/safetensors_fuzz" -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=20 \
  -print_final_stats=1 -dict="$build/safetensors.dict" "$@" "$st_corpus" "$st_seeds" 2>&1 |
  grep -v '^#[0-9]*.*\(NEW\|REDUCE\|pulse\)' | tail -25
echo "fuzz: the safetensors parsers: no finding in ${seconds}s"
