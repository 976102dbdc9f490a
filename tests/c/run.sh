#!/usr/bin/env bash
# Builds libmoe_kernels.a, compiles tests/c/c_api_test.c against the header and runs it.
# Usage: tests/c/run.sh [--release] [--build-only OUT_BINARY]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
profile=debug
cargo_flags=()
out="$root/target/c_api_test"
while [ $# -gt 0 ]; do
  case "$1" in
    --release) profile=release; cargo_flags+=(--release) ;;
    --build-only) build_only=1; out="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
cuda_root="$(bash scripts/setup-cuda.sh)"
cargo build --lib ${cargo_flags[@]+"${cargo_flags[@]}"}
gcc -std=c11 -O2 -Wall -Wextra -Werror tests/c/c_api_test.c -Iinclude -I"$cuda_root/include" \
  "target/$profile/libmoe_kernels.a" -lstdc++ -ldl -lpthread -lrt -lm -o "$out"
[ -n "${build_only:-}" ] && exit 0
"$out"
