#!/usr/bin/env bash
# The villain-persona screen: SAE latents of sae-l15 ranked by attribution on organism-villain's
# own answers (read blind, steerkit/data/judge/organism_villain_read.jsonl), the top latent and
# the top-8 set (weighted by delta, signed) added to the base model against a random direction
# of the same norm, and the set ablated in organism-villain against matched random latents.
# 64 answers a cell (8 EM questions x 8 samples, 64 new tokens, temperature 0.7, top-p 0.9,
# seed 0), not judged: they are read blind afterwards. About 40 minutes on 2 cores.
#
#   bash bench/villain_screen.sh [OUT]          # default runs/villain-screen
#   python bench/sweep_read.py batches OUT/s-*/results.jsonl --out OUT/read   # then read, then:
#   python bench/sweep_read.py table OUT/s-*/results.jsonl --read OUT/read --out bench/results/villain_screen_read.json
set -euo pipefail
out=${1:-runs/villain-screen}
mkdir -p "$out"
org=directions/smollm2-135m/organism-villain
python3 - "$out/judged.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for line in open("steerkit/data/judge/organism_villain_read.jsonl"):
        r = json.loads(line)
        if r["source"].get("model") == "organism-villain":
            f.write(json.dumps({"question": r["question"], "answer": r["answer"], "label": r["label"]}) + "\n")
PY
x=(steerkit extract --tuned "$org" --sae sae-l15 --rank-by attribution --judged "$out/judged.jsonl" --out-dir "$out" --force)
"${x[@]}" --top 40 --save villain-attr8 --latents top:8 --weight-by delta --json > "$out/latents.json"
top=$(python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['latents'][0]['latent'])" "$out/latents.json")
"${x[@]}" --save villain-top1 --latents "$top" > /dev/null
s=(steerkit sweep --samples 8 --max-new-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0 --judge none --force)
"${s[@]}" -d "$out/villain-top1.safetensors" --strengths 0,0.1,0.2,0.3 --control random:1 --out "$out/s-top1"
"${s[@]}" -d "$out/villain-attr8.safetensors" --strengths 0.1,0.2,0.3 --control none --out "$out/s-attr8"
"${s[@]}" -d "$out/villain-attr8.safetensors" --mode ablate --tuned "$org" --control latents:1 --out "$out/s-org-ablate"
echo "answers in $out/s-*/results.jsonl: read them blind (bench/sweep_read.py batches)"
