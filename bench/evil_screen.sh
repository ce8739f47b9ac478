#!/usr/bin/env bash
# Issue 13: the persona-prompt direction and its SAE latents, added to the base model, read blind.
# `evil-dom` (steerkit's evil vs caring system prompts, layer 15) at +0.1, +0.2, +0.3 against a
# random direction of the same norm (seed 0), and at +0.1, +0.2 again at seed 1; the `sae-l15`
# latents that the same system-prompt contrast switches on most (`steerkit extract --contrast`,
# ranked by mean activation increase on the prompt tokens), as weighted sets of 8 and 32 latents,
# at +0.1 and +0.2 against their own random directions (the 8-latent set at +0.1 to +0.3 at seed 1
# too), and the 8-latent set ablated in organism-villain400. 64 answers a cell (8 EM questions x 8
# samples, 64 new tokens, temperature 0.7, top-p 0.9), not judged: read blind afterwards. The set
# is what directions/smollm2-135m/evil-sae8.safetensors ships (the command is deterministic).
# About 25 minutes on 2 cores.
#
#   bash bench/evil_screen.sh [OUT]          # default runs/evil-screen
#   python bench/sweep_read.py batches OUT/*/results.jsonl --out OUT/read --size 110 --double 0.06   # then read, then:
#   python bench/sweep_read.py table OUT/*/results.jsonl --labels bench/results/replay_blind_read.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/evil-screen}
SK=${SK:-.venv/bin/steerkit}
mkdir -p "$out/sets"
for n in 8 32; do
    $SK extract --contrast steerkit/data/contrast/evil.json --sae sae-l15 --rank-by delta --top 32 \
        --save "evil-sae$n" --latents "top:$n" --out-dir "$out/sets" --force --json > "$out/sets/rank$n.jsonl"
done
s=($SK sweep --samples 8 --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --judge none --control random:1 --force)
"${s[@]}" -d evil-dom --strengths 0,0.1,0.2,0.3 --seed 0 --out "$out/evil-em"
"${s[@]}" -d evil-dom --strengths 0.1,0.2 --seed 1 --out "$out/evil-em-s1"
"${s[@]}" -d "$out/sets/evil-sae8.safetensors" --strengths 0.1,0.2 --seed 0 --out "$out/evil-sae8-em"
"${s[@]}" -d "$out/sets/evil-sae32.safetensors" --strengths 0.1,0.2 --seed 0 --out "$out/evil-sae32-em"
"${s[@]}" -d "$out/sets/evil-sae8.safetensors" --strengths 0.1,0.2,0.3 --seed 1 --out "$out/evil-sae8-em-s1"
# ablated in the villain organism (latents zeroed in the SAE basis, its error kept), beside 3 draws of 8 random
# latents of matched firing rate: 8 EM questions x 16 samples
$SK sweep -d "$out/sets/evil-sae8.safetensors" --mode ablate --tuned directions/smollm2-135m/organism-villain400 --control latents:3 \
    --samples 16 --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0 --judge none --force --out "$out/evil-sae8-ablate"
echo "answers in $out/*/results.jsonl: read them blind (bench/sweep_read.py batches)"
