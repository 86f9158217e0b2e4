#!/usr/bin/env bash
# Create .venv (if missing) and install edgemoe with its export and dev extras.
# torch is installed first and pinned: 2.13.0 is a CPU wheel available locally; any other spec
# would pull gigabytes of CUDA packages. The extras then ask for a torch that 2.13.0 satisfies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
LOG=.venv/install.log
if ! { python -m pip install -q "torch==2.13.0" && python -m pip install -q -e ".[export,bench,serve,dev]"; } >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "install failed (log above, also in $LOG)" >&2
  exit 1
fi
