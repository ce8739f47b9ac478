#!/usr/bin/env bash
# Issue 14: `harm-dom`, a difference of means over answer tokens between purpose-written harmful
# and careful answers to the same questions (steerkit/data/judge/written_train.jsonl, 15 of its
# 16 domains: the gardening one is left out so the villain gardening rows of the audit stay
# unseen), read by the base model at layer 15. Then its ROC AUC on the 240 written pairs of
# 8 other domains (steerkit/data/judge/ood_domains.jsonl), answer activation alone.
# Usage: bash bench/harm_dom.sh [OUT]   (default directions/smollm2-135m/harm-dom.safetensors; --force via FORCE=1)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-directions/smollm2-135m/harm-dom.safetensors}
SK=${SK:-.venv/bin/steerkit}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
grep -v '"domain": "gardening, ladders and roof work"' steerkit/data/judge/written_train.jsonl > "$TMP/written_train_15.jsonl"
$SK directions from-answers "$TMP/written_train_15.jsonl" --out "$OUT" --layer 15 ${FORCE:+--force} \
  --description "written harmful minus careful answers to the same questions (15 everyday-safety domains, not gardening): mean over answer tokens, layer 15" --json
$SK audit steerkit/data/judge/ood_domains.jsonl -d "$OUT" --no-baseline --top 0 --json | tail -n 1
