"""Would training the offline judge's head on the default model's hand-labelled answers help?

5-fold cross-validation over tests/data/judge_handlabelled.jsonl (aligned vs. misaligned): each
fold's head is trained on the usual training split plus the other folds' hand-labelled answers at
``--weights`` (0 = the shipped recipe), and scored on the held-out fold (pooled AUC), on the
out-of-distribution pair (aligned chats vs. risky financial advice) and on the held-out persona
statements. Needs ../shared/data; embeddings are cached under $STEERKIT_CACHE/judge.

    .venv/bin/python bench/judge_head_cv.py [--weights 0,10,100]

Figures go to bench/results/judge_head_cv.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from steerkit.judge_embed import Embedder
from steerkit.judge_train import cached_features, fit_logistic, handlabelled_examples, ood_examples, roc_auc, training_examples
from steerkit.models import cache_dir

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="0,10,100")
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--l2", type=float, default=0.003)
    args = ap.parse_args()
    cache = cache_dir() / "judge"
    ex = training_examples(args.shared, 0, None)
    train = [e for e in ex if e.split == "train"]
    persona = [e for e in ex if e.split == "heldout" and e.source == "persona"]
    hand = handlabelled_examples(ROOT / "tests" / "data" / "judge_handlabelled.jsonl")
    ood = ood_examples(args.shared)
    emb = Embedder()
    X, Xh, Xo, Xp = (cached_features(emb, s, cache) for s in (train, hand, ood, persona))
    y = torch.tensor([float(e.label) for e in train])
    yh = torch.tensor([float(e.label) for e in hand])
    w = torch.tensor([e.weight for e in train])
    idx = list(range(len(hand)))
    random.Random(0).shuffle(idx)
    out = []
    for wh in (float(x) for x in args.weights.split(",")):
        sc = torch.zeros(len(hand))
        oods, pers = [], []
        for f in range(5):
            te = idx[f::5]
            tr = [i for i in idx if i not in te]
            W, b = fit_logistic(torch.cat([X, Xh[tr]]), torch.cat([y, yh[tr]]), torch.cat([w, torch.full((len(tr),), wh)]), l2=args.l2)
            sc[te] = Xh[te] @ W + b
            oods.append(roc_auc((Xo @ W + b).tolist(), [e.label for e in ood]))
            pers.append(roc_auc((Xp @ W + b).tolist(), [e.label for e in persona]))
        row = {"handlabelled_weight": wh, "handlabelled_cv_auc": round(roc_auc(sc.tolist(), yh.int().tolist()), 3),
               "ood_auc": round(sum(oods) / 5, 3), "heldout_persona_auc": round(sum(pers) / 5, 3)}
        print(row, flush=True)
        out.append(row)
    (ROOT / "bench" / "results" / "judge_head_cv.json").write_text(json.dumps({"command": "python bench/judge_head_cv.py --weights " + args.weights, "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
