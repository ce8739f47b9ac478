#!/usr/bin/env bash
# The diff-SAE set's ablation on questions it was not ranked on (README, issue 13): the set
# ablated in an organism against 3 random directions of the same norm, and the base model
# unsteered, on the 16 everyday questions of bench/data/heldout_questions.jsonl; 8 samples each,
# 64 new tokens, temperature 0.7, top-p 0.9, seed 0; not judged: read blind afterwards.
#
#   bash bench/heldout_ablate.sh runs/villain400 runs/diff-screen/diffsae-set8.safetensors runs/heldout
#   python bench/sweep_read.py batches runs/heldout/*/results.jsonl --out runs/heldout/read --size 110 --double 0.15
#   python bench/sweep_read.py table runs/heldout/*/results.jsonl --read runs/heldout/read
set -euo pipefail
org=$1
set8=$2
out=${3:-runs/heldout}
q=bench/data/heldout_questions.jsonl
s=(steerkit sweep --questions "$q" --samples 8 --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0 --judge none --force)
"${s[@]}" -d "$set8" --mode ablate --tuned "$org" --strengths 0,1 --control random:3 --out "$out/heldout-ablate"
"${s[@]}" -d "$set8" --mode add --strengths 0 --control none --out "$out/heldout-base"
echo "answers in $out/heldout-*/results.jsonl: read them blind (bench/sweep_read.py batches)"
