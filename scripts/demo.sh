#!/usr/bin/env bash
# The demo: one MoE layer per model preset on the GPU, checked against the CPU reference, with a time
# table (or, with no GPU, the CPU reference at a small size and a plain notice). Installs the CUDA
# compiler wheels first if no nvcc is found.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-cuda.sh >/dev/null
cargo run --release --example moe_layer
