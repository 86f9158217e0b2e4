#!/usr/bin/env bash
# Reproduce edgemoe's memory-budget benchmark on this machine, from nothing:
#   1. a full-size StableLM-1.6B-4e-shaped MoE-LLaVA checkpoint (random weights, the real format);
#   2. two bundles: int4 experts, and auto (per-expert precision chosen by measurement);
#   3. a sweep of expert budgets x policies on each, each run a fresh process, against the measured
#      physical limit; the peers (torch fp32/bf16 resident, accelerate disk offload, all-resident)
#      on the int4 bundle, in the same run, on the same checkpoint, image, question and tokens;
#   4. JSON + plot per bundle under bench/results/.
# Nothing is rebuilt that already exists under $WORK. Needs ~12 GB free RAM for the fp32 peer and
# ~25 GB of disk (checkpoint 6 GB, bundles, accelerate's 6 GB bf16 weight folder).
#
# Knobs (environment): FAMILY (stablelm | deepseek-vl2-tiny | any create-checkpoint family), WORK,
# RESULTS, SIZE (full | tiny, to try the recipe in a minute), TOKENS, EXPERT_BUDGETS, POLICIES,
# EXPERT_STORES (mapped,sessions: both ways of paging side by side), MEMORY_BUDGETS (sizes; adds a
# memory-budget sweep), PRECISIONS, PEERS (0/1), IMAGE_SIZE (WxH of the synthetic image, e.g. 640x480:
# a 2x2 tile grid for DeepSeek-VL2; default the bench's own 480x360).
# DeepSeek-VL2-Tiny as published in the README:
#   FAMILY=deepseek-vl2-tiny TOKENS=64 EXPERT_BUDGETS=100%,50%,25% POLICIES=lru PRECISIONS=int4 \
#   IMAGE_SIZE=640x480 MEMORY_BUDGETS=2GB,2.4GB,2.7GB,3GB bash bench/recipe.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate

FAMILY=${FAMILY:-stablelm}
SIZE=${SIZE:-full}
WORK=${WORK:-$HOME/.cache/edgemoe-bench/$SIZE}
RESULTS=${RESULTS:-bench/results}
TOKENS=${TOKENS:-96}
EXPERT_BUDGETS=${EXPERT_BUDGETS:-100%,75%,50%,25%}
POLICIES=${POLICIES:-lru,lfu,edgemoe}
EXPERT_STORES=${EXPERT_STORES:-auto}
PRECISIONS=${PRECISIONS:-int4 auto}
PEERS=${PEERS:-1}
HOST=$(hostname -s 2>/dev/null || echo host)
CKPT=$WORK/$FAMILY-$SIZE
mkdir -p "$WORK" "$RESULTS"

if [ ! -f "$CKPT/config.json" ]; then
  edgemoe create-checkpoint "$CKPT" --family "$FAMILY" --size "$SIZE" --seed 0
fi
IMAGE_ARGS=()
if [ -n "${IMAGE_SIZE:-}" ]; then
  IMAGE=$WORK/image-$IMAGE_SIZE.png
  python -c "import sys; from pathlib import Path; from edgemoe.bench.prompt import synthetic_image; \
w, h = map(int, sys.argv[2].split('x')); synthetic_image(Path(sys.argv[1]), (w, h))" "$IMAGE" "$IMAGE_SIZE"
  IMAGE_ARGS=(--image "$IMAGE")
fi

first=1
for precision in $PRECISIONS; do
  bundle=$WORK/$FAMILY-bundle-$precision
  if [ ! -f "$bundle/manifest.json" ]; then
    edgemoe export "$CKPT" -o "$bundle" --precision "$precision"
  fi
  args=(--expert-budgets "$EXPERT_BUDGETS" --policies "$POLICIES" --expert-stores "$EXPERT_STORES" --tokens "$TOKENS"
        "${IMAGE_ARGS[@]}")
  if [ "$PEERS" = 1 ] && [ $first = 1 ]; then  # the peers do not depend on the bundle: measure them once
    args+=(--peers --checkpoint "$CKPT" --offload-dir "$WORK/accelerate-bf16")
  fi
  out=$RESULTS/$FAMILY-$SIZE-$precision-$HOST
  # A failed run exits 1 after the report is written: keep going to the next bundle.
  edgemoe bench "$bundle" "${args[@]}" --out "$out.json" --plot "$out.png" || echo "some runs failed: see $out.json"
  if [ -n "${MEMORY_BUDGETS:-}" ]; then
    edgemoe bench "$bundle" --memory-budgets "$MEMORY_BUDGETS" --policies "$POLICIES" --tokens "$TOKENS" "${IMAGE_ARGS[@]}" \
      --out "$out-memory.json" --plot "$out-memory.png" || echo "some runs failed: see $out-memory.json"
  fi
  first=0
done
echo "results in $RESULTS"
