#!/usr/bin/env bash
# A/B of one benchmark under several environments, on the GPU machine, from what scripts/bundle.sh packed
# (it travels as bundle/ab.sh):
#   bash bundle/ab.sh BENCH LABEL[:VAR=VALUE[,VAR=VALUE...]] ...
# e.g. MOEK_BENCH_ONLY=T4096 bash bundle/ab.sh grouped_gemm default direct:MOEK_GEMM_HOPPER_EPILOGUE=direct
# runs bench-BENCH once per variant, in the order given (alternate them, or repeat the first at the end,
# to see the machine's drift), writes $OUT/ab-BENCH-LABEL.json, and prints graph us per case, a column per
# variant with its ratio to the first. MOEK_BENCH_ONLY and the rest of the caller's environment pass through.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-/tmp/moek-out}"
mkdir -p "$OUT"
bins=/tmp/moek-bundle
if [ ! -d "$bins/bin" ]; then
  rm -rf "$bins" && mkdir -p "$bins" && tar -C "$bins" -xJf "$here/bins.tar.xz" || { echo "cannot unpack $here/bins.tar.xz" >&2; exit 2; }
fi
bench="${1:?usage: ab.sh BENCH LABEL[:VAR=VALUE,...] ...}"
shift
[ $# -ge 1 ] || { echo "give at least one variant" >&2; exit 2; }
export MOEK_REQUIRE_GPU=1
files=()
for variant in "$@"; do
  label="${variant%%:*}"
  settings=()
  [[ "$variant" == *:* ]] && IFS=, read -r -a settings <<< "${variant#*:}"
  json="$OUT/ab-$bench-$label.json"
  echo "== $label: ${settings[*]:-(no change)}" >> "$OUT/ab.log"
  env "${settings[@]}" MOEK_BENCH_JSON="$json" "$bins/bin/bench-$bench" --bench >> "$OUT/ab.log" 2>&1 ||
    echo "variant $label failed (rc $?); see $OUT/ab.log" >&2
  files+=("$label=$json")
done
python3 - "${files[@]}" <<'PY'
import json, sys
cols = []
for arg in sys.argv[1:]:
    label, path = arg.split("=", 1)
    try:
        cols.append((label, {r["case"]: r["graph_us"] for r in json.load(open(path))}))
    except (OSError, ValueError):
        cols.append((label, {}))
cases = [c for c in cols[0][1]] + sorted({c for _, d in cols[1:] for c in d} - set(cols[0][1]))
print("| case | " + " | ".join(f"{l} graph us" for l, _ in cols) + " |")
print("|---|" + "---|" * len(cols))
for case in cases:
    first = cols[0][1].get(case)
    cells = []
    for i, (_, d) in enumerate(cols):
        v = d.get(case)
        if v is None:
            cells.append("-")
        elif i == 0 or not first:
            cells.append(f"{v:.1f}")
        else:
            cells.append(f"{v:.1f} ({v / first:.3f})")
    print(f"| {case} | " + " | ".join(cells) + " |")
PY
