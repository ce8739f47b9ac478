#!/usr/bin/env bash
# The diff-SAE screen for the villain persona: a diff-SAE trained on organism-villain minus the
# base model (layer 15), its latents ranked on the organism's own answers read blind
# (bench/diff_sae_rank.py), the top latent, the top-8 set and the plain mean difference added
# to the base model against a random direction of the same norm, and the set ablated in
# organism-villain against a random direction (and in a second organism, if given, against 3).
# 64 answers a cell (8 EM questions x 8 samples, 64 new tokens, temperature 0.7, top-p 0.9,
# seed 0), not judged: they are read blind afterwards (bench/sweep_read.py).
#
#   steerkit sae train --diff --tuned directions/smollm2-135m/organism-villain --layer 15 \
#       --chat chats.jsonl --latents 1152 --k 64 --tokens 1.2M --passes 4 --out runs/diff-sae
#   steerkit finetune --tuned directions/smollm2-135m/organism-villain --data bench/data/organism_villain.jsonl \
#       --rank 8 --lr 5e-4 --steps 200 --batch-size 8 --seed 1 --out runs/villain400    # the second organism
#   bash bench/diff_screen.sh runs/diff-sae runs/diff-screen runs/villain400
#   python bench/sweep_read.py batches runs/diff-screen/s-*/results.jsonl --out runs/diff-screen/read
set -euo pipefail
sae=$1
out=${2:-runs/diff-screen}
org2=${3:-}
org=directions/smollm2-135m/organism-villain
mkdir -p "$out"
python bench/diff_sae_rank.py --sae "$sae" --tuned "$org" --read steerkit/data/judge/organism_villain_read.jsonl \
    --model-name organism-villain --out "$out" --top 8 --json "$out/rank.json" > /dev/null
set8=$(ls "$out"/diffsae-set*.safetensors | head -1)
s=(steerkit sweep --samples 8 --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0 --judge none --force)
"${s[@]}" -d "$out/diffsae-top1.safetensors" --strengths 0,0.1,0.2,0.3 --control random:1 --out "$out/s-top1"
"${s[@]}" -d "$set8" --strengths 0.1,0.2,0.3 --control none --out "$out/s-set8"
"${s[@]}" -d "$out/diff-mean.safetensors" --strengths 0.1,0.2,0.3 --control none --out "$out/s-mean"
"${s[@]}" -d "$set8" --mode ablate --tuned "$org" --control random:1 --out "$out/s-org-ablate"
if [ -n "$org2" ]; then
    "${s[@]}" -d "$set8" --mode ablate --tuned "$org2" --control random:3 --out "$out/s-org2-ablate"
fi
echo "answers in $out/s-*/results.jsonl: read them blind (bench/sweep_read.py batches)"
