#!/usr/bin/env bash
# One cold `edgemoe ask` under --memory-budget, its footprint sampled from outside every 50 ms with this
# machine's prepacked cache watched too (a first run's twins and temporary files count from the moment
# they exist). Run it after `rm -rf ~/.cache/edgemoe/prepacked` to measure a first run on a machine.
#
#   bash bench/watched_ask.sh BUNDLE BUDGET IMAGE OUTDIR [edgemoe ask options...]
#
# Writes OUTDIR/ask.json (the answer and its stats), OUTDIR/watch.log (each new peak, then a JSON line
# with the peak footprint, its page-cache part and the peak RSS) and prints the exit status and wall time.
set -u
BUNDLE=$1; BUDGET=$2; IMAGE=$3; OUT=$4; shift 4
HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${EDGEMOE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/edgemoe}/prepacked"
mkdir -p "$OUT" "$CACHE"
python - "$BUNDLE" <<'PY'
import sys
from edgemoe.offload.footprint import model_files
from edgemoe.page_cache import drop_cached
for path in model_files(sys.argv[1]):
    drop_cached(path)
PY
START=$(date +%s.%N)
python -m edgemoe.cli ask "$BUNDLE" "Describe this image in detail." --image "$IMAGE" --memory-budget "$BUDGET" \
  --json "$@" > "$OUT/ask.json" 2> "$OUT/ask.err" &
PID=$!
python "$HERE/footprint_watch.py" "$PID" "$BUNDLE" --interval 0.05 --also-under "$CACHE" > "$OUT/watch.log" 2>&1
wait "$PID"; RC=$?
END=$(date +%s.%N)
echo "rc=$RC wall=$(python -c "print(round($END - $START, 1))") s"
tail -1 "$OUT/watch.log"
exit "$RC"
