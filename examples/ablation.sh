#!/usr/bin/env bash
# Plain vs ablated: the same questions and seeds generated twice, the second time with a
# direction projected out of the residual stream, then paired answer by answer and judged.
#
#   examples/ablation.sh QUESTIONS DIRECTION [steerkit generate options...]
#
#   examples/ablation.sh questions.yaml persona
#   examples/ablation.sh questions.yaml persona -n 8 --max-new-tokens 64
#   OUT=runs/ablation examples/ablation.sh questions.yaml persona --force   # write over an earlier run
#
# Writes plain.jsonl and ablated.jsonl into $OUT (default: ablation-DIRECTION), then prints
# the comparison: side by side in a terminal, JSON Lines when piped.
set -euo pipefail

usage() {
    echo "usage: $0 QUESTIONS DIRECTION [steerkit generate options...]" >&2
    echo "  e.g. $0 questions.yaml persona -n 8" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
questions=$1 direction=$2
shift 2
[[ -f $questions ]] || { echo "$0: question file $questions does not exist" >&2; usage; }

out=${OUT:-ablation-$(basename "$direction" .safetensors)}
mkdir -p "$out"

# The same prompts, samples and seed for both runs: only the ablation differs. Options given
# after DIRECTION come last, so they win (e.g. -n 8). --out writes the records atomically and
# refuses to overwrite an earlier run unless --force is among those options.
common=(-f "$questions" -n 4 --seed 0)
steerkit generate "${common[@]}" "$@" --out "$out/plain.jsonl" --json > /dev/null
steerkit generate "${common[@]}" --ablate "$direction" "$@" --out "$out/ablated.jsonl" --json > /dev/null

# Pairs the answers by prompt, sample and seed, marks the words that changed, judges them
# offline and reports both misaligned rates, their paired difference and McNemar's test.
steerkit compare "$out/plain.jsonl" "$out/ablated.jsonl" --judge
