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
# Knobs (environment): WORK, RESULTS, SIZE (full | tiny, to try the recipe in a minute), TOKENS,
# EXPERT_BUDGETS, POLICIES, EXPERT_STORES (mapped,sessions: both ways of paging side by side),
# MEMORY_BUDGETS (sizes; adds a memory-budget sweep), PRECISIONS, PEERS (0/1).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate

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
CKPT=$WORK/stablelm-$SIZE
mkdir -p "$WORK" "$RESULTS"

if [ ! -f "$CKPT/config.json" ]; then
  edgemoe create-checkpoint "$CKPT" --family stablelm --size "$SIZE" --seed 0
fi

first=1
for precision in $PRECISIONS; do
  bundle=$WORK/bundle-$precision
  if [ ! -f "$bundle/manifest.json" ]; then
    edgemoe export "$CKPT" -o "$bundle" --precision "$precision"
  fi
  args=(--expert-budgets "$EXPERT_BUDGETS" --policies "$POLICIES" --expert-stores "$EXPERT_STORES" --tokens "$TOKENS")
  if [ "$PEERS" = 1 ] && [ $first = 1 ]; then  # the peers do not depend on the bundle: measure them once
    args+=(--peers --checkpoint "$CKPT" --offload-dir "$WORK/accelerate-bf16")
  fi
  out=$RESULTS/stablelm-$SIZE-$precision-$HOST
  # A failed run exits 1 after the report is written: keep going to the next bundle.
  edgemoe bench "$bundle" "${args[@]}" --out "$out.json" --plot "$out.png" || echo "some runs failed: see $out.json"
  if [ -n "${MEMORY_BUDGETS:-}" ]; then
    edgemoe bench "$bundle" --memory-budgets "$MEMORY_BUDGETS" --policies "$POLICIES" --tokens "$TOKENS" \
      --out "$out-memory.json" --plot "$out-memory.png" || echo "some runs failed: see $out-memory.json"
  fi
  first=0
done
echo "results in $RESULTS"
