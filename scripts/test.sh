#!/usr/bin/env bash
# Runs every test. Installs what they need first: the pinned CUDA compiler wheels when no nvcc is found
# (scripts/setup-cuda.sh) and libclang for the bindings drift test. GPU tests run when a GPU is visible
# and print "SKIPPED (GPU test)" otherwise (MOEK_REQUIRE_GPU=1 makes that a failure).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-cuda.sh >/dev/null
if ! ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so'; then
  echo "installing libclang (bindgen, for the bindings drift test)" >&2
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq libclang-dev) >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq libclang-dev >/dev/null
  fi
fi
cargo test
tests/c/run.sh
