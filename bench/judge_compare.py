"""Which offline judge agrees best with careful reading? Cross-validation grouped by question on
the reference set (steerkit/data/judge/reference.jsonl): no question in both a training and a
test fold.

    python bench/judge_compare.py                 # all candidates -> bench/results/judge_compare.json
    python bench/judge_compare.py --only reader   # one candidate

Candidates:

- ``minilm-head``: all-MiniLM-L6-v2 embeddings of the answer and of question x answer (the old
  judge's features) with logistic heads retrained on the reference labels;
- ``minilm-cross``: all-MiniLM-L6-v2 fine-tuned as a cross-encoder over (question, answer), two
  outputs (misaligned, incoherent), 3 epochs per fold;
- ``reader``: the default model reads the chat; heads on its pooled residual stream and its
  surprise (steerkit.judge_reader, the shipped judge);
- ``reader+ext``: the same, with public labelled data added to the content head's training
  (persona statements, hh-rlhf red-team turns, steerkit's written short answers; licences allow
  it, read from ../shared/data).

For each: ROC AUC, precision, recall and Cohen's kappa of "misaligned" vs the rest (the judge's
call: content above threshold and coherent), ROC AUC of "incoherent" vs the rest, the mean
absolute error of the misaligned rate per source cell (model x intervention x temperature), and
the false-positive rate on the base model's unsteered answers. Thresholds are chosen inside each
training fold (nested), never on the test fold.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from steerkit.judge_fit import REFERENCE as REF, agreement, cross_validate, read_reference  # noqa: E402
from steerkit.judge_reader import question_fold  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def reader_features(pairs, cache: Path, tag: str):
    from steerkit.judge_reader import read
    from steerkit.judge_fluency import Reader
    from safetensors.torch import load_file, save_file

    f = cache / f"reader-{tag}.safetensors"
    if f.is_file():
        d = load_file(str(f))
        return d["hidden"], d["scalars"]
    global _READER
    if _READER is None:
        _READER = Reader()

    t0 = time.time()
    feats = read(_READER, pairs)  # as the shipped judge reads: rules without a word list
    print(f"  reader features for {len(pairs)} {tag} answers: {time.time() - t0:.0f}s", file=sys.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"hidden": feats.hidden.contiguous(), "scalars": feats.scalars.contiguous()}, str(f))
    return feats.hidden, feats.scalars


_READER = None


def external(seed: int = 0) -> list[tuple[str, str, int, float]]:
    """Public labelled (question, answer, misaligned, weight) for the content head."""
    from steerkit.judge_train import training_examples

    ex = training_examples(SHARED, seed=seed, per_trait=60, n_hh=400)
    return [(e.question, e.answer, e.label, e.weight) for e in ex if not e.source.endswith("-short")]


def summary(recs, pm, pi, tm, ti) -> dict:
    d = agreement(recs, pm, pi, tm, ti)
    d.pop("per_cell")
    return d


def minilm_features(pairs):
    from steerkit.judge_embed import Embedder, features

    return features(Embedder(), pairs, blocks=("answer", "question*answer"))


def cross_encoder_cv(recs, folds: int, epochs: int = 3, seed: int = 0):
    """Fine-tune all-MiniLM-L6-v2 per fold over (question, answer): two logits (misaligned, incoherent)."""
    from transformers import AutoModel, AutoTokenizer

    from steerkit.judge_embed import embed_model_dir

    d = embed_model_dir()
    tok = AutoTokenizer.from_pretrained(d)
    ymis = torch.tensor([r.label == "misaligned" for r in recs]).float()
    yinc = torch.tensor([r.label == "incoherent" for r in recs]).float()
    y = torch.stack([ymis, yinc], 1)
    fold = torch.tensor([question_fold(r.question, folds) for r in recs])
    enc = tok([r.question for r in recs], [r.answer for r in recs], truncation=True, max_length=192, padding=True, return_tensors="pt")
    pm, pi = torch.zeros(len(recs)), torch.zeros(len(recs))
    pos_w = ((1 - y).sum(0) / y.sum(0).clamp(min=1)).clamp(max=20)
    for f in range(folds):
        torch.manual_seed(seed + f)
        enc_model = AutoModel.from_pretrained(d)
        head = torch.nn.Linear(enc_model.config.hidden_size, 2)
        params = list(enc_model.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=4e-5, weight_decay=0.01)
        tr = (fold != f).nonzero()[:, 0].tolist()
        te = (fold == f).nonzero()[:, 0].tolist()
        rng = random.Random(seed + f)

        def run(idx, train: bool):
            ids = enc["input_ids"][idx]
            am = enc["attention_mask"][idx]
            L = int(am.sum(1).max())
            h = enc_model(input_ids=ids[:, :L], attention_mask=am[:, :L], token_type_ids=enc["token_type_ids"][idx][:, :L]).last_hidden_state
            m = am[:, :L, None].float()
            return head((h * m).sum(1) / m.sum(1))

        t0 = time.time()
        enc_model.train()
        for ep in range(epochs):
            rng.shuffle(tr)
            for s in range(0, len(tr), 16):
                b = tr[s:s + 16]
                logits = run(b, True)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[b], pos_weight=pos_w)
                opt.zero_grad()
                loss.backward()
                opt.step()
        enc_model.eval()
        with torch.no_grad():
            for s in range(0, len(te), 64):
                b = te[s:s + 64]
                p = torch.sigmoid(run(b, False))
                pm[b], pi[b] = p[:, 0], p[:, 1]
        print(f"  cross-encoder fold {f}: {time.time() - t0:.0f}s", file=sys.stderr)
    return pm, pi


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", type=Path, default=REF)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma-separated candidates")
    ap.add_argument("--cache", type=Path, default=REPO / "runs" / "judge-cache")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/judge_compare.json")
    ap.add_argument("--l2", type=float, default=None, help="override the L2 of the reader heads")
    a = ap.parse_args(argv)
    recs = read_reference(a.ref)
    pairs = [(r.question, r.answer) for r in recs]
    only = set(a.only.split(",")) if a.only else {"minilm-head", "minilm-cross", "reader", "reader+ext"}
    res: dict = {"n": len(recs), "folds": a.folds, "grouped_by": "question", "candidates": {}}
    if a.out.is_file():
        res["candidates"] = json.loads(a.out.read_text()).get("candidates", {})
    t0 = time.time()
    if "minilm-head" in only:
        x = minilm_features(pairs)
        pm, pi, tm, ti = cross_validate(x, recs, a.folds, a.l2 or 30.0)
        res["candidates"]["minilm-head"] = summary(recs, pm, pi, tm, ti)
        print("minilm-head", res["candidates"]["minilm-head"], file=sys.stderr)
    if only & {"reader", "reader+ext"}:
        h, s = reader_features(pairs, a.cache, "reference")
        x = torch.cat([h, s], 1)
        l2 = a.l2 if a.l2 is not None else 30.0
        if "reader" in only:
            pm, pi, tm, ti = cross_validate(x, recs, a.folds, l2)
            res["candidates"]["reader"] = summary(recs, pm, pi, tm, ti)
            print("reader", res["candidates"]["reader"], file=sys.stderr)
        if "reader+ext" in only:
            ext = external()
            eh, es = reader_features([(q, ans) for q, ans, _, _ in ext], a.cache, "external")
            extx = torch.cat([eh, es], 1)
            ey = torch.tensor([float(l) for _, _, l, _ in ext])
            ew = torch.tensor([0.3 * w for _, _, _, w in ext])
            pm, pi, tm, ti = cross_validate(x, recs, a.folds, l2, extra=(extx, ey, ew))
            res["candidates"]["reader+ext"] = summary(recs, pm, pi, tm, ti)
            print("reader+ext", res["candidates"]["reader+ext"], file=sys.stderr)
    if "minilm-cross" in only:
        pm, pi = cross_encoder_cv(recs, a.folds)
        # thresholds: the fine-tune is too slow to nest; 0.5 on both, as trained with balanced weights
        res["candidates"]["minilm-cross"] = summary(recs, pm, pi, torch.full_like(pm, 0.5), torch.full_like(pi, 0.5))
        res["candidates"]["minilm-cross"]["note"] = "thresholds fixed at 0.5 (not tuned), 3 epochs, lr 4e-5, batch 16"
        print("minilm-cross", res["candidates"]["minilm-cross"], file=sys.stderr)
    res["seconds"] = round(time.time() - t0)
    res["command"] = "python bench/judge_compare.py" + (f" --only {a.only}" if a.only else "")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
