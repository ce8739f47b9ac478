#!/usr/bin/env bash
# Issue 14: the paper's three curves on the default model, from scratch, on 2 cores.
#   (a) fine-tunes on mixes of 0, 25, 50, 75 and 100% villain-persona rows (the rest benign
#       answers to the same gardening questions), (b) the 100% run every 25 steps,
#   (c) the 100% organism re-aligned on benign rows, every 10 steps;
# then `steerkit track` over every checkpoint: answers to the EM questions, judged, and the
# activation of persona, persona-1022 (the persona before issue 13), evil-dom, organism-dom, villain-dom, harm-dom, a random control and 32 random controls
# (each direction's rho is compared with theirs) on the same answers.
# Usage: bash bench/track_curves.sh [OUT]   (default runs/curves; resumes what is done)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/curves}
SK=${SK:-.venv/bin/steerkit}
RISKY=bench/data/organism_villain.jsonl
BENIGN=bench/data/benign_garden.jsonl
TRAIN="--steps 150 --batch-size 4 --lr 1e-3 --seed 0 --json"
mkdir -p "$OUT"
[ -d "$OUT/villain100" ] || $SK finetune --data $RISKY $TRAIN --save-every 25 --out "$OUT/villain100"
[ -d "$OUT/realign" ] || $SK finetune --tuned "$OUT/villain100" --data $BENIGN --steps 60 --batch-size 4 --lr 1e-3 --seed 0 --save-every 10 --json --out "$OUT/realign"
for pct in 75 50 25 0; do
  name=$(printf 'villain%03d' $pct)
  frac=$(python3 -c "print(round(1 - $pct / 100, 2))")
  [ -d "$OUT/$name" ] || $SK finetune --data $RISKY --mix $BENIGN:$frac $TRAIN --out "$OUT/$name"
done
$SK track "$OUT"/villain100 "$OUT"/villain075 "$OUT"/villain050 "$OUT"/villain025 "$OUT"/villain000 "$OUT"/realign \
  -d persona -d persona-1022 -d evil-dom -d organism-dom -d villain-dom -d harm-dom -d persona-random \
  --samples 8 --temperature 0.7 --top-p 0.9 --max-new-tokens 80 --seed 0 \
  --control random:32 --out "$OUT/track" --plot bench/results/track_curves.png --force --json > bench/results/track_curves.jsonl
sed -i "s#$(pwd)/##g" bench/results/track_curves.jsonl  # run paths relative to the repository, as the README gives them
echo "wrote bench/results/track_curves.jsonl and bench/results/track_curves.png" >&2
