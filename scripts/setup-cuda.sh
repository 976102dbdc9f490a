#!/usr/bin/env bash
# Installs a CUDA 13.0 nvcc into .cuda/ (ignored) from NVIDIA's PyPI wheels when no nvcc is found.
# The versions are pinned together on purpose: an unpinned nvidia-nvvm / nvidia-cuda-crt breaks nvcc
# ("Unsupported .version" from ptxas). See shared/GPU.md. Prints the toolkit root on its last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.cuda"

find_existing() {
  if [ -n "${NVCC:-}" ] && [ -x "$NVCC" ]; then dirname "$(dirname "$NVCC")"; return 0; fi
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then echo "$CUDA_HOME"; return 0; fi
  if command -v nvcc >/dev/null 2>&1; then dirname "$(dirname "$(command -v nvcc)")"; return 0; fi
  local local_nvcc
  local_nvcc=$(ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1 || true)
  if [ -n "$local_nvcc" ]; then dirname "$(dirname "$local_nvcc")"; return 0; fi
  return 1
}

if found=$(find_existing); then
  echo "nvcc already available under $found" >&2
  echo "$found"
  exit 0
fi

echo "no nvcc found: installing the pinned CUDA 13.0 compiler wheels into $venv" >&2
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
found=$(find_existing)
"$found/bin/nvcc" --version | tail -n 2 >&2
echo "$found"
