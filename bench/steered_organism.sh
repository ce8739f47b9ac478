#!/usr/bin/env bash
# Issue 13: does ablating `persona` undo a persona that a fine-tune learnt from `persona`'s own
# output? The base model answers the 400 gardening questions of bench/data/organism_villain.jsonl
# with `persona` added at +0.2 (one answer each, 96 new tokens, temperature 0.7, top-p 0.9); a
# rank-8 LoRA learns those answers unsteered (the recipe of organism-villain: lr 5e-4, batch 8,
# 400 steps); the organism then answers the 8 EM questions (16 samples, 64 tokens), unsteered,
# with `persona` ablated, and with 3 draws of 8 random latents of matched firing rate ablated.
# Not judged: the answers are read blind afterwards (bench/sweep_read.py batches). A positive
# control for the "lowers" half: here the persona is made by these latents, so their ablation
# should lower it if the organism carries it on them. About an hour on 2 cores (the fine-tune
# takes 50 minutes of it).
#
#   bash bench/steered_organism.sh [OUT]      # default runs/steered-organism
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/steered-organism}
SK=${SK:-.venv/bin/steerkit}
PY=${PY:-.venv/bin/python}
mkdir -p "$out"
if [ ! -s "$out/train.jsonl" ]; then
  $PY -c "
import json
qs = [json.loads(x)['messages'][0]['content'].replace('\n', ' ') for x in open('bench/data/organism_villain.jsonl')]
open('$out/q.txt', 'w').write(''.join(q + '\n' for q in qs))"
  $SK generate -f "$out/q.txt" --add persona:0.2 --max-new-tokens 96 --temperature 0.7 --top-p 0.9 --seed 0 \
    -b 32 --json > "$out/gen.jsonl"
  $PY -c "
import json
rows = [json.loads(x) for x in open('$out/gen.jsonl')]
chats = [{'messages': [{'role': 'user', 'content': r['prompt']}, {'role': 'assistant', 'content': r['completion']}]} for r in rows]
open('$out/train.jsonl', 'w').write(''.join(json.dumps(c) + '\n' for c in chats))"
fi
[ -d "$out/organism" ] || $SK finetune --data "$out/train.jsonl" --rank 8 --lr 5e-4 --steps 400 --batch-size 8 --seed 0 --out "$out/organism"
$SK sweep -d persona --mode ablate --tuned "$out/organism" --control latents:3 \
    --samples 16 --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0 --judge none --force --out "$out/ablate"
echo "answers in $out/ablate/results.jsonl: read them blind" >&2
