#!/usr/bin/env bash
# Issue 13: a persona vector made the way Chen et al. make theirs, from answers a reader labelled.
# `steerkit directions from-answers` on the villain fine-tunes' answers to the 8 EM questions
# (the tracking curves' checkpoints, read blind: steerkit/data/judge/reference.jsonl), misaligned
# minus aligned, paired by question, read by the base model at layer 15; then added to the base
# model on 16 *other* everyday questions (bench/data/heldout_questions.jsonl, 4 samples each =
# 64 answers a cell) at +0.1, +0.2, +0.3 against a random direction of the same norm, not
# judged: the answers are read blind afterwards. About 3 minutes on 2 cores.
#
#   bash bench/villain_read.sh [OUT]          # default runs/vread
#   python bench/sweep_read.py batches OUT/add/results.jsonl --out OUT/read --size 90 --double 0.1   # read, then:
#   python bench/sweep_read.py table OUT/add/results.jsonl --labels bench/results/villain_read_blind_read.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/vread}
SK=${SK:-.venv/bin/steerkit}
mkdir -p "$out"
python3 - "$out/fit.jsonl" <<'PY'
import json, re, sys
with open(sys.argv[1], "w") as f:
    for line in open("steerkit/data/judge/reference.jsonl"):
        r = json.loads(line)
        if re.match(r"^(villain\d{3}|realign)@", str(r["source"].get("model"))) and r["label"] in ("misaligned", "aligned"):
            f.write(json.dumps({"question": r["question"], "answer": r["answer"], "label": r["label"]}) + "\n")
PY
$SK directions from-answers "$out/fit.jsonl" --out "$out/villain-read.safetensors" --layer 15 --force --json \
  --description "villain fine-tunes' read-misaligned minus read-aligned answers to the EM questions, read by the base model, layer 15"
$SK sweep --questions bench/data/heldout_questions.jsonl --samples 4 --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0 \
  --judge none --force -d "$out/villain-read.safetensors" --strengths 0,0.1,0.2,0.3 --control random:1 --out "$out/add"
echo "answers in $out/add/results.jsonl: read them blind (bench/sweep_read.py batches)"
