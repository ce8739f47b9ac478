"""Rank a diff-SAE's latents on an organism's own answers read blind, and save the top ones as
steering vectors.

A diff-SAE (``steerkit sae train --diff --tuned ADAPTER``) encodes the tuned model's residual
minus the base model's on the same tokens, so its decoder rows are directions of the fine-tune.
This script runs the organism's read answers (question + answer, the answer's tokens only)
through both models, encodes the differences and ranks latents by how much more they fire on the
answers read as misaligned than on the aligned ones (answer-balanced means, misaligned minus
aligned). It saves the top latent's decoder row and a set of the top N (decoder rows weighted by
their positive difference) as ``vector`` directions with the base model's median token norm, so
`steerkit sweep -d FILE` adds or ablates them like any other direction.

    python bench/diff_sae_rank.py --sae runs/diff-sae --tuned directions/smollm2-135m/organism-villain \\
        --read steerkit/data/judge/organism_villain_read.jsonl --model-name organism-villain \\
        --out runs/diff-screen --top 8 --json bench/results/diff_sae_rank.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from steerkit.directions import from_vector, load_direction, save_direction
from steerkit.models import load_model
from steerkit.sae import load_sae
from steerkit.sae_diff import DiffActs

try:  # the chat leaf, where the house keeps chat formatting
    from steerkit.chat import chat_tokens
except ImportError:  # pragma: no cover - older layout
    from steerkit.generate import chat_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sae", required=True, type=Path)
    ap.add_argument("--tuned", required=True)
    ap.add_argument("--read", required=True, type=Path, help="read answers: question, answer, label, source.model")
    ap.add_argument("--model-name", required=True, help="source.model of the organism's records in --read")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compare", nargs="*", default=["evil-dom", "organism-dom", "persona"])
    a = ap.parse_args()

    recs = [json.loads(x) for x in a.read.read_text().splitlines() if x.strip()]
    recs = [r for r in recs if r["source"].get("model") == a.model_name and r["label"] in ("misaligned", "aligned")]
    model = load_model("smollm2-135m")
    sae = load_sae(a.sae)
    layer = int(sae.cfg.layer)
    ids_l, keep_l = [], []
    for r in recs:
        p = chat_tokens(model, [{"role": "user", "content": r["question"]}])
        t = list(model.tokenizer(r["answer"], add_special_tokens=False)["input_ids"])
        ids = torch.tensor([p + t])
        keep = torch.zeros_like(ids, dtype=torch.bool)
        keep[0, len(p):] = True
        ids_l.append(ids)
        keep_l.append(keep)
    acts = DiffActs(model, a.tuned, layer, torch.device("cpu"))
    with torch.no_grad():
        d = acts(ids_l, keep_l)
        z = sae.encode(d)
    lens = [int(k.sum()) for k in keep_l]
    per = torch.stack([x.mean(0) for x in torch.split(z, lens)])  # [answers, d_sae]
    fired = torch.stack([(x > 0).float().mean(0) for x in torch.split(z, lens)])
    mis = torch.tensor([r["label"] == "misaligned" for r in recs])
    delta = per[mis].mean(0) - per[~mis].mean(0)
    order = torch.argsort(delta, descending=True)
    dec = sae.W_dec.detach()
    unit = dec / dec.norm(dim=-1, keepdim=True)
    mean_diff = d.mean(0)
    comp = {}
    for name in a.compare:
        v = load_direction(f"directions/smollm2-135m/{name}.safetensors").vector
        comp[name] = v / v.norm()
    rows = []
    for i in order[: max(a.top, 20)].tolist():
        rows.append({"latent": i, "delta": float(delta[i]), "mean_misaligned": float(per[mis, i].mean()),
                     "mean_aligned": float(per[~mis, i].mean()), "fired_misaligned": float(fired[mis, i].mean()),
                     "fired_aligned": float(fired[~mis, i].mean()),
                     "cos_mean_difference": float(torch.nn.functional.cosine_similarity(unit[i], mean_diff, dim=0)),
                     **{f"cos_{n}": float(unit[i] @ v) for n, v in comp.items()}})
    norm = load_direction("directions/smollm2-135m/evil-dom.safetensors").median_norm
    a.out.mkdir(parents=True, exist_ok=True)
    top1 = int(order[0])
    prov = {"diff_sae": str(a.sae), "tuned": str(a.tuned), "read": str(a.read), "ranked_by": "mean diff-SAE activation, misaligned minus aligned answers"}
    saved = []
    d1 = from_vector(unit[top1], name="diffsae-top1", model=model, layer=layer, kind="vector", median_norm=norm,
                     description=f"decoder row of diff-SAE latent {top1}", provenance={**prov, "latents": [top1]})
    saved.append(str(save_direction(d1, a.out / "diffsae-top1.safetensors", force=True)))
    ids = [i for i in order[: a.top].tolist() if delta[i] > 0]
    w = delta[ids]
    v = (unit[ids] * w[:, None]).sum(0)
    dn = from_vector(v / v.norm(), name=f"diffsae-set{len(ids)}", model=model, layer=layer, kind="vector", median_norm=norm,
                     description=f"decoder rows of diff-SAE latents {ids} weighted by their difference",
                     provenance={**prov, "latents": ids, "weights": [float(x) for x in w]})
    saved.append(str(save_direction(dn, a.out / f"diffsae-set{len(ids)}.safetensors", force=True)))
    md = from_vector(mean_diff / mean_diff.norm(), name="diff-mean", model=model, layer=layer, kind="diff-of-means", median_norm=norm,
                     description="mean tuned-minus-base residual on the organism's answers", provenance=prov)
    saved.append(str(save_direction(md, a.out / "diff-mean.safetensors", force=True)))
    res = {"answers": len(recs), "misaligned": int(mis.sum()), "tokens": int(z.shape[0]), "layer": layer,
           "alive": int((fired.sum(0) > 0).sum()), "latents": rows, "set": {"latents": ids, "weights": [float(x) for x in w]},
           "cos_set": {n: float((v / v.norm()) @ c) for n, c in comp.items()},
           "cos_mean_difference": {n: float((mean_diff / mean_diff.norm()) @ c) for n, c in comp.items()}, "saved": saved}
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
