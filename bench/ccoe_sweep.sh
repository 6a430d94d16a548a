#!/bin/bash
# CCoE depth sweep on one skill: an expert of L own top layers of SmolLM2 (30 layers) for each L,
# trained as bench/ccoe.py trains its experts, scored on the skill's first 100 test questions.
# The L = 8 expert is bench/ccoe.py's (run it first, default work dir runs/ccoe).
# Usage: bench/ccoe_sweep.sh SKILL STEPS [WORK=runs/ccoe-sweep] [LAYERS="2 4 15"]
set -euo pipefail
cd "$(dirname "$0")/.."
S=${1:?skill: arith, lists or units}; STEPS=${2:?training steps, e.g. 150 for arith, 60 for lists and units}
W=${3:-runs/ccoe-sweep}; LAYERS=${4:-2 4 15}
mkdir -p "$W"
for L in $LAYERS; do
  [ -f "$W/$S-L$L/config.json" ] || .venv/bin/collab ccoe train --base zoo:smollm2-135m-instruct --skill "$S" --layers "$L" \
    --out "$W/$S-L$L" --steps "$STEPS" --batch-size 8 --lr 3e-4 --examples 1000 --max-tokens 64 --quiet
done
{
  echo "experts:"
  echo "  smol: {ref: zoo:smollm2-135m-instruct}"
  echo "systems:"
  echo "  L8: {type: ccoe, base: smol, branches: {$S: $(realpath --relative-to="$W" runs/ccoe/experts/$S)}}"
  for L in $LAYERS; do echo "  L$L: {type: ccoe, base: smol, branches: {$S: $S-L$L}}"; done
} > "$W/spec-$S.yaml"
for SYS in $LAYERS 8; do
  .venv/bin/collab eval "$W/spec-$S.yaml" --system "L$SYS" --bench "skill:$S" --limit 100 --out "$W/eval-$S-L$SYS"
done
