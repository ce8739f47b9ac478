#!/usr/bin/env bash
# Issue 13: `harm-dom` (bench/harm_dom.sh, a difference of means of written harmful vs careful
# answers) screened like the other candidates: added to the base model at +0.1, +0.2, +0.3
# against a random direction of the same norm, and ablated in organism-villain400 against a
# random direction. 64 answers a cell (8 EM questions x 8 samples, 64 new tokens, temperature
# 0.7, top-p 0.9, seed 0), not judged: they are read blind afterwards. About 3 minutes on 2 cores.
#
#   bash bench/harm_screen.sh [OUT]          # default runs/harm-screen
#   python bench/sweep_read.py batches OUT/*/results.jsonl --out OUT/read --size 90 --double 0.1   # then read, then:
#   python bench/sweep_read.py table OUT/*/results.jsonl --labels bench/results/harm_screen_blind_read.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/harm-screen}
SK=${SK:-.venv/bin/steerkit}
mkdir -p "$out"
s=($SK sweep --samples 8 --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0 --judge none --force)
"${s[@]}" -d harm-dom --strengths 0,0.1,0.2,0.3 --control random:1 --out "$out/harm-add"
"${s[@]}" -d harm-dom --mode ablate --tuned directions/smollm2-135m/organism-villain400 --strengths 0,1 --control random:1 --out "$out/harm-ablate"
echo "answers in $out/*/results.jsonl: read them blind (bench/sweep_read.py batches)"
