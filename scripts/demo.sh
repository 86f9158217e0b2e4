#!/usr/bin/env bash
# The main job on a built-in tiny demo, on a fresh machine: make a tiny checkpoint in the real
# on-disk format, export it to an int4 bundle, inspect it, then ask a question about an image
# while the expert cache holds only 60% of the experts (the rest are paged in from disk as needed;
# DeepSeek-VL2's fused layers need one layer's experts at once, half of them in the tiny checkpoint).
#   bash scripts/demo.sh                      # MoE-LLaVA (StableLM layout)
#   bash scripts/demo.sh deepseek-vl2-tiny    # DeepSeek-VL2 (64-expert layout shrunk, tiled image)
set -euo pipefail
FAMILY="${1:-stablelm}"
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
DEMO="${DEMO_DIR:-/tmp/edgemoe-demo}"
rm -rf "$DEMO" && mkdir -p "$DEMO"
edgemoe create-checkpoint "$DEMO/checkpoint" --family "$FAMILY" --size tiny
edgemoe export "$DEMO/checkpoint" -o "$DEMO/bundle" --precision int4
edgemoe inspect "$DEMO/bundle"
python - "$DEMO/image.png" <<'PY'
import sys
from PIL import Image, ImageDraw
img = Image.new("RGB", (320, 240), (40, 90, 160))
ImageDraw.Draw(img).ellipse((100, 60, 220, 180), fill=(230, 200, 40))
img.save(sys.argv[1])
PY
edgemoe ask "$DEMO/bundle" "What is in the image?" --image "$DEMO/image.png" --expert-budget 60% --max-tokens 16
