#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, what scripts/bundle.sh packed:
#   bash bundle/run.sh [steps...]     steps: tests sanitize c demo bench (default: all)
#   MOEK_ONLY=permute bash bundle/run.sh ...   only the test, bench and example binaries whose name
#                                              contains that text (the C program always runs)
# Logs go to $OUT/run.log, step results to $OUT/results.json, benchmark JSON and the comparison table
# to $OUT/bench-*.json, $OUT/torch-*.json and $OUT/table.md. A summary table is printed last.
set -u
# NVLink multicast can take a shared host's GPUs down (shared/GPU.md): keep it off everywhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/moek-out}"
mkdir -p "$OUT"
# The binaries travel compressed (scripts/bundle.sh); unpack them beside the machine's /tmp.
bins=/tmp/moek-bundle
rm -rf "$bins" && mkdir -p "$bins" && tar -C "$bins" -xJf "$here/bins.tar.xz" || { echo "cannot unpack $here/bins.tar.xz" >&2; exit 2; }
log="$OUT/run.log"
export MOEK_REQUIRE_GPU=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests sanitize c demo bench)
summary=()
json=()
# wanted NAME: whether MOEK_ONLY (if set) selects this binary.
wanted() { [ -z "${MOEK_ONLY:-}" ] || [[ "$1" == *"$MOEK_ONLY"* ]]; }

# step NAME CMD...: runs CMD with its output appended to the log, records rc and seconds.
step() {
  local name="$1"; shift
  local start=$(date +%s.%N)
  echo "===== $name: $*" >> "$log"
  "$@" >> "$log" 2>&1
  local rc=$?
  local secs=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
  summary+=("$(printf '%-28s %-6s %8ss' "$name" "$([ $rc -eq 0 ] && echo ok || echo FAIL:$rc)" "$secs")")
  json+=("{\"step\":\"$name\",\"rc\":$rc,\"seconds\":$secs}")
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >> "$log" 2>&1
for s in "${steps[@]}"; do
  case "$s" in
    tests)
      for t in "$bins"/tests/*; do wanted "$(basename "$t")" && step "test:$(basename "$t")" "$t"; done ;;
    sanitize)
      for t in "$bins"/tests/*_gpu; do
        wanted "$(basename "$t")" || continue
        # compute-sanitizer serialises kernels, so ranks on several GPUs would wait on each other's flags
        # forever: expert parallelism is checked on one GPU only (one rank), and not across processes.
        filter=()
        case "$(basename "$t")" in
          ep_ipc_gpu) continue ;;
          ep_gpu) filter=(dispatch_and_combine_on_one_gpu) ;;
          ep_low_dim_gpu) filter=(low_dim_dispatch_and_combine_on_one_gpu) ;;
        esac
        step "memcheck:$(basename "$t")" compute-sanitizer --tool memcheck --error-exitcode 99 "$t" --test-threads=1 "${filter[@]}"
      done ;;
    c)
      step c_api_test "$bins/bin/c_api_test" ;;
    demo)
      for d in "$bins"/bin/*; do
        wanted "$(basename "$d")" || continue
        case "$(basename "$d")" in bench-*|c_api_test) ;; *) step "example:$(basename "$d")" "$d" ;; esac
      done ;;
    bench)
      for b in "$bins"/bin/bench-*; do
        name=$(basename "$b"); name=${name#bench-}
        wanted "$name" || continue
        MOEK_BENCH_JSON="$OUT/bench-$name.json" step "bench:$name" "$b" --bench
        if [ "$name" = ep ]; then
          # Several GPUs: NCCL's all_to_all_single with the same bytes (skipped with fewer than 2 GPUs).
          [ "$(nvidia-smi -L | wc -l)" -ge 2 ] && step "nccl:$name" bash -c "python3 '$here/compare_nccl.py' --ours '$OUT/bench-$name.json' --out '$OUT/nccl-$name.json' >> '$OUT/table.md'"
        else
          step "torch:$name" bash -c "python3 '$here/compare_torch.py' --suite $name --ours '$OUT/bench-$name.json' --out '$OUT/torch-$name.json' >> '$OUT/table.md'"
        fi
      done ;;
    *) echo "unknown step $s" >&2 ;;
  esac
done
(IFS=,; echo "[${json[*]}]") > "$OUT/results.json"
grep -E "test result:|passed, .* failed|ERROR SUMMARY|SKIPPED|FAIL" "$log" | sort | uniq -c | head -40
[ -f "$OUT/table.md" ] && cat "$OUT/table.md"
true
printf '%s\n' "${summary[@]}"
