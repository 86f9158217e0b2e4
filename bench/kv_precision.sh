#!/usr/bin/env bash
# The KV cache's precision side by side: two bundles exported from one checkpoint that differ only in
# `--kv-cache` (fp32 and fp16), alternated in one run. For each: the minimum memory budget the runtime
# names (asked with a budget far too small, so it refuses with the minimum and its parts), then one cold ask
# (bench/cold_ask.py: the bundle's and prepacked pages dropped first) fully resident and at each budget.
#
#   bash bench/kv_precision.sh BUNDLE_KV32 BUNDLE_KV16 IMAGE "2.1GB"
set -uo pipefail
KV32=$1 KV16=$2 IMAGE=$3 BUDGETS=${4:-"2.1GB"} TOKENS=${TOKENS:-96}
HERE="$(dirname "$0")"
PY="$HERE/../.venv/bin/python"
for bundle in "$KV32" "$KV16"; do
  echo "$bundle minimum: $("$PY" -m edgemoe.cli ask "$bundle" "Describe this image in detail." --image "$IMAGE" \
    --memory-budget 100MB --max-tokens 2 2>&1 | grep -o 'the baseline takes.*')"
done
for setting in resident $BUDGETS; do
  for bundle in "$KV32" "$KV16"; do
    opts=(--max-tokens "$TOKENS")
    [ "$setting" != resident ] && opts+=(--memory-budget "$setting")
    "$PY" "$HERE/cold_ask.py" "$(basename "$bundle") $setting" "$bundle" "$IMAGE" "${opts[@]}"
  done
done
