#!/usr/bin/env bash
# The dcp_trainer demo: N ranks train and crash, M ranks resume from what they
# committed and check the result bit for bit.
# usage: demo.sh LAUNCHER TRAINER N M
set -euo pipefail
launcher=$1 trainer=$2 n=$3 m=$4
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$launcher" -n "$n" --timeout 240 "$trainer" "$dir" train
echo "committed: $(cd "$dir" && for d in step_*; do [ -e "$d/.metadata" ] && printf '%s ' "$d"; done)"
"$launcher" -n "$m" --timeout 240 "$trainer" "$dir" resume
