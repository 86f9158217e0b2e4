#!/usr/bin/env bash
# Paged decode against the prefetch knobs, one cold `edgemoe ask` per setting (bench/cold_ask.py: the bundle's
# and prepacked files' pages dropped first, so every miss reads the disk). Prints tok/s, late and in-time
# prefetches, and disk bytes per decoded token for each (loaders, lookahead) pair.
#
#   bash bench/loader_sweep.sh BUNDLE IMAGE BUDGET "1 2 3" "1 2"     # loaders values, lookahead values
set -euo pipefail
BUNDLE=$1 IMAGE=$2 BUDGET=$3 LOADERS=${4:-"1 2"} LOOKAHEADS=${5:-"1"} TOKENS=${TOKENS:-96}
HERE="$(dirname "$0")"
for loaders in $LOADERS; do
  for lookahead in $LOOKAHEADS; do
    "$HERE/../.venv/bin/python" "$HERE/cold_ask.py" "$BUDGET loaders $loaders lookahead $lookahead" "$BUNDLE" "$IMAGE" \
      --memory-budget "$BUDGET" --max-tokens "$TOKENS" --loaders "$loaders" --lookahead "$lookahead"
  done
done
