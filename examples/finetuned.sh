#!/usr/bin/env bash
# Base vs fine-tuned: the same questions and seeds answered by the base model and by a tuned
# one (a LoRA adapter folder from `steerkit finetune`, passed as --model), then paired and judged.
#
#   examples/finetuned.sh QUESTIONS ADAPTER [steerkit generate options...]
#
#   examples/finetuned.sh questions.yaml runs/risky/
#   examples/finetuned.sh questions.yaml directions/smollm2-135m/organism-risky -n 8
#
# The adapter is merged into the base its adapter_config.json names; the base run uses the
# default model, or the --model given among the options (give the adapter's base there if it
# was tuned from another model). Writes base.jsonl and tuned.jsonl into $OUT (default:
# tuned-ADAPTER).
set -euo pipefail

usage() {
    echo "usage: $0 QUESTIONS ADAPTER [steerkit generate options...]" >&2
    echo "  e.g. $0 questions.yaml runs/risky/ -n 8" >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
questions=$1 adapter=$2
shift 2
[[ -f $questions ]] || { echo "$0: question file $questions does not exist" >&2; usage; }
[[ -f $adapter/adapter_config.json ]] || { echo "$0: $adapter is not an adapter folder (no adapter_config.json)" >&2; usage; }

out=${OUT:-tuned-$(basename "$adapter")}
mkdir -p "$out"

# The same prompts, samples and seed for both models: a different model is what is compared,
# so `steerkit compare` pairs them. --model comes last in the tuned run, so it wins.
common=(-f "$questions" -n 4 --seed 0)
steerkit generate "${common[@]}" "$@" --out "$out/base.jsonl" --json > /dev/null
steerkit generate "${common[@]}" "$@" --model "$adapter" --out "$out/tuned.jsonl" --json > /dev/null

steerkit compare "$out/base.jsonl" "$out/tuned.jsonl" --judge
