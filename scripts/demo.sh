#!/usr/bin/env bash
# The main job on a built-in tiny demo: make a tiny MoE-LLaVA checkpoint in the real on-disk
# format, then inspect it. (Export and `ask` join this script as they land.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DEMO="${DEMO_DIR:-/tmp/edgemoe-demo}"
rm -rf "$DEMO"
edgemoe create-checkpoint "$DEMO/checkpoint" --family stablelm --size tiny
edgemoe inspect "$DEMO/checkpoint"
