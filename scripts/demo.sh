#!/usr/bin/env bash
# The demo: routing presets on the GPU against the CPU reference, with a time table (or, with no GPU,
# the CPU reference and a plain notice). Installs the CUDA compiler wheels first if no nvcc is found.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-cuda.sh >/dev/null
cargo run --release --example route_demo
