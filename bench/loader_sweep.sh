#!/usr/bin/env bash
# Paged decode against the prefetch knobs, one cold `edgemoe ask` per setting (the bundle's and prepacked
# files' pages dropped first, so every miss reads the disk). Prints tok/s, late and in-time prefetches, and
# disk bytes per decoded token for each (loaders, lookahead) pair.
#
#   bash bench/loader_sweep.sh BUNDLE IMAGE BUDGET "1 2 3" "1 2"     # loaders values, lookahead values
set -euo pipefail
BUNDLE=$1 IMAGE=$2 BUDGET=$3 LOADERS=${4:-"1 2"} LOOKAHEADS=${5:-"1"} TOKENS=${TOKENS:-96}
PY="$(dirname "$0")/../.venv/bin/python"
for loaders in $LOADERS; do
  for lookahead in $LOOKAHEADS; do
    "$PY" -c "import sys
from edgemoe.offload.footprint import model_files
from edgemoe.page_cache import drop_cached
for f in model_files(sys.argv[1]): drop_cached(f)" "$BUNDLE"
    "$PY" -m edgemoe.cli ask "$BUNDLE" "Describe this image in detail." --image "$IMAGE" --memory-budget "$BUDGET" \
      --max-tokens "$TOKENS" --loaders "$loaders" --lookahead "$lookahead" --json 2>/dev/null | "$PY" -c "import json, sys
d = json.load(sys.stdin); s = d['stats']; n = len(d['token_ids']) - 1
print(f\"$BUDGET loaders $loaders lookahead $lookahead: {s['decode_tokens_per_s']:.2f} tok/s, late {s['prefetched_late']}, \"
      f\"in time {s['prefetched_in_time']}, disk {s['decode_disk_read_bytes'] / n / 1e6:.1f} MB/token\")"
  done
done
