#!/usr/bin/env bash
# The test command: install what is needed, then run the whole suite (offline, CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest "$@"
