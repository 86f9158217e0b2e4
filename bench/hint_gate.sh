#!/usr/bin/env bash
# The hint gate side by side: one cold `edgemoe ask` per (routing, budget, hint floor), the bundle's and
# prepacked files' pages dropped first so every miss reads the disk. Floor 0 hints every guess (as before
# the gate); the default floor withholds the guesses of layers whose running precision is near chance.
#
#   bash bench/hint_gate.sh BUNDLE IMAGE "1.5GB 2.1GB" "model uniform" "0 0.7"
set -euo pipefail
BUNDLE=$1 IMAGE=$2 BUDGETS=${3:-"2.1GB"} ROUTINGS=${4:-"model uniform"} FLOORS=${5:-"0 0.7"} TOKENS=${TOKENS:-96}
PY="$(dirname "$0")/../.venv/bin/python"
for routing in $ROUTINGS; do
  for budget in $BUDGETS; do
    for floor in $FLOORS; do
      "$PY" -c "import sys
from edgemoe.offload.footprint import model_files
from edgemoe.page_cache import drop_cached
for f in model_files(sys.argv[1]): drop_cached(f)" "$BUNDLE"
      "$PY" -m edgemoe.cli ask "$BUNDLE" "Describe this image in detail." --image "$IMAGE" --memory-budget "$budget" \
        --max-tokens "$TOKENS" --routing "$routing" --hint-floor "$floor" --json 2>/dev/null | "$PY" -c "import json, sys
d = json.load(sys.stdin); s = d['stats']; n = len(d['token_ids']) - 1
print(f\"routing $routing $budget floor $floor: {s['decode_tokens_per_s']:.2f} tok/s, disk {s['decode_disk_read_bytes'] / n / 1e6:.1f} MB/token, \"
      f\"hits {s['cache_hits']} misses {s['cache_misses']}, in time {s['prefetched_in_time']}, late {s['prefetched_late']}, \"
      f\"withheld {s['hints_withheld']}, P {s['prediction_precision']:.2f}, TTFT {s['time_to_first_token_s']:.1f} s\")"
    done
  done
done
