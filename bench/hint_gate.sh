#!/usr/bin/env bash
# The hint gate side by side: one cold `edgemoe ask` per (routing, budget, hint floor) (bench/cold_ask.py: the
# bundle's and prepacked files' pages dropped first, so every miss reads the disk). Floor 0 hints every guess
# (as before the gate); the default floor withholds the guesses of layers whose running precision is near chance.
#
#   bash bench/hint_gate.sh BUNDLE IMAGE "1.5GB 2.1GB" "model uniform" "0 0.7"
set -euo pipefail
BUNDLE=$1 IMAGE=$2 BUDGETS=${3:-"2.1GB"} ROUTINGS=${4:-"model uniform"} FLOORS=${5:-"0 0.7"} TOKENS=${TOKENS:-96}
HERE="$(dirname "$0")"
for routing in $ROUTINGS; do
  for budget in $BUDGETS; do
    for floor in $FLOORS; do
      "$HERE/../.venv/bin/python" "$HERE/cold_ask.py" "routing $routing $budget floor $floor" "$BUNDLE" "$IMAGE" \
        --memory-budget "$budget" --max-tokens "$TOKENS" --routing "$routing" --hint-floor "$floor"
    done
  done
done
