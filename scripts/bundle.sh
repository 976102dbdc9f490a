#!/usr/bin/env bash
# Builds release test, bench and example binaries and the C API test program here, and packs them with
# the runner into bundle/ (ignored) to carry to the GPU machine, where `bash bundle/run.sh` runs them.
# The device tool carries at most 64 MiB: the script fails if the bundle is larger.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup-cuda.sh >/dev/null
export MOEK_REQUIRE_CUDA=1
# The H200 needs sm_90a only; both targets in five binaries would not fit the 64 MiB the tool carries.
# MOEK_CUDA_ARCHS=90a,80 (and fewer binaries) bundles the sm_80 path for a forced run.
export MOEK_CUDA_ARCHS="${MOEK_CUDA_ARCHS:-90a}"
rm -rf bundle
mkdir -p bundle/tests bundle/bin

# Executables of the test and bench targets, from cargo's own build messages. The bindings test needs
# libclang and no GPU, so it stays behind.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"][0] in ("test", "bench"):
        print(m["target"]["kind"][0], m["target"]["name"], m["executable"])
'
}
cargo test --release --no-run --message-format=json 2>/dev/null | executables | while read -r kind name exe; do
  [ "$name" = bindings ] && continue
  cp "$exe" "bundle/tests/$name"
done
cargo bench --no-run --message-format=json 2>/dev/null | executables | while read -r kind name exe; do
  [ "$kind" = bench ] && cp "$exe" "bundle/bin/bench-$name"
done
cargo build --release --examples
for ex in examples/*.rs; do
  name=$(basename "$ex" .rs)
  cp "target/release/examples/$name" "bundle/bin/$name"
done
tests/c/run.sh --release --build-only "$root/bundle/bin/c_api_test"
strip bundle/tests/* bundle/bin/*
# Every binary links every kernel: compressed, they shrink about 8x (run.sh unpacks them).
XZ_OPT="-T0 -6" tar -C bundle -cJf bundle/bins.tar.xz tests bin
tar -tJf bundle/bins.tar.xz | sed 's/^/  /'
rm -rf bundle/tests bundle/bin
cp scripts/run-bundle.sh bundle/run.sh
cp scripts/bench-ab.sh bundle/ab.sh
cp benches/compare_torch.py benches/compare_nccl.py bundle/
size=$(du -sm bundle | cut -f1)
echo "bundle/: ${size} MiB"
if [ "$size" -gt 60 ]; then
  echo "bundle/ is ${size} MiB: over the 64 MiB the device tool carries" >&2
  exit 1
fi
