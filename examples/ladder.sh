#!/usr/bin/env bash
# A strength ladder: the same questions and seeds generated once per strength of --add, one
# JSON Lines file each, then a small table of the judged misaligned rate per strength.
#
#   examples/ladder.sh QUESTIONS DIRECTION STRENGTHS [steerkit generate options...]
#
#   examples/ladder.sh questions.yaml persona 0,0.1,0.2,0.3
#   examples/ladder.sh questions.yaml persona -0.3,0,0.3 -n 8 --max-new-tokens 64
#
# STRENGTHS is a comma-separated list; the first one is the reference the others are paired
# against (put 0 first to compare each strength with the unsteered model). Writes
# add_STRENGTH.jsonl for each into $OUT (default: ladder-DIRECTION).
set -euo pipefail

usage() {
    echo "usage: $0 QUESTIONS DIRECTION STRENGTHS [steerkit generate options...]" >&2
    echo "  e.g. $0 questions.yaml persona 0,0.1,0.2,0.3" >&2
    exit 2
}
[[ $# -ge 3 ]] || usage
questions=$1 direction=$2
IFS=, read -r -a strengths <<< "$3"
shift 3
[[ -f $questions ]] || { echo "$0: question file $questions does not exist" >&2; usage; }
[[ ${#strengths[@]} -ge 1 ]] || usage
for s in "${strengths[@]}"; do
    [[ $s =~ ^-?([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || { echo "$0: strength '$s' is not a number" >&2; usage; }
done

out=${OUT:-ladder-$(basename "$direction" .safetensors)}
mkdir -p "$out"

files=()
for s in "${strengths[@]}"; do
    f="$out/add_$s.jsonl"
    # the same prompts, samples and seed at every strength; options after STRENGTHS win
    steerkit generate -f "$questions" -n 4 --seed 0 --add "$direction:$s" "$@" --out "$f" --json > /dev/null
    files+=("$f")
done

# One row per strength: misaligned rate (95% interval), how many answers changed against the
# first strength, and the paired difference. A table in a terminal; JSON when piped.
steerkit compare "${files[@]}" --judge --summary
