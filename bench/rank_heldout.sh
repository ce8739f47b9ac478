#!/usr/bin/env bash
# Fit on one set of questions, test on another (README, issue 13): the stronger villain
# organism's answers to the 16 held-out everyday questions, read blind (bench/heldout_ablate.sh),
# rank the diff-SAE's latents and give the organism's mean difference; then test them on the 8 EM
# questions, which no step of the fit saw: the top-8 set and the mean difference ablated in the
# organism (128 answers a cell, against 3 random directions), the mean difference added to the
# base model (64 a cell, against a random direction). Not judged: read blind afterwards.
#
#   bash bench/rank_heldout.sh runs/diff-sae runs/villain400 runs/heldout runs/rank-heldout
#   SEED=1 bash bench/rank_heldout.sh ...    # also the mean difference's ablation at seed 1, against 3 more random draws
#   python bench/sweep_read.py batches runs/rank-heldout/s-*/results.jsonl --out runs/rank-heldout/read --size 110 --double 0.12
set -euo pipefail
sae=$1
org=$2
heldout=${3:-runs/heldout}
out=${4:-runs/rank-heldout}
labels=${LABELS:-bench/results/heldout_ablate_blind_read.jsonl}
mkdir -p "$out"
python bench/sweep_read.py export "$heldout/heldout-ablate/results.jsonl" --labels "$labels" \
    --cell 'heldout-ablate|*|unsteered' --model-name villain400 --out "$out/read-heldout.jsonl"
python bench/diff_sae_rank.py --sae "$sae" --tuned "$org" --read "$out/read-heldout.jsonl" --model-name villain400 \
    --out "$out" --top 8 --json "$out/rank.json" > /dev/null
s=(steerkit sweep --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0 --judge none --force)
"${s[@]}" -d "$out/diffsae-set8.safetensors" --mode ablate --tuned "$org" --control random:3 --samples 16 --out "$out/s-set8-ablate"
"${s[@]}" -d "$out/diff-mean.safetensors" --mode ablate --tuned "$org" --control none --samples 16 --out "$out/s-mean-ablate"
if [ "${SEED:-0}" != 0 ]; then  # the ablation cells again at another seed
    "${s[@]}" -d "$out/diff-mean.safetensors" --mode ablate --tuned "$org" --control random:3 --samples 16 --seed "$SEED" --out "$out/s-mean-ablate-seed$SEED"
fi
"${s[@]}" -d "$out/diff-mean.safetensors" --mode add --strengths 0,0.1,0.2,0.3 --control random:1 --samples 8 --out "$out/s-mean-add"
echo "answers in $out/s-*/results.jsonl: read them blind (bench/sweep_read.py batches)"
