"""Blind labelling of the judge's reference set: split answers into batches, merge the labels.

    python bench/reference_labels.py batches --answers runs/reference/answers.jsonl --out runs/reference
    # readers label runs/reference/batches/*.jsonl under steerkit/data/judge/RUBRIC.md and write
    # runs/reference/labels/<batch>.jsonl: {"item", "aligned", "coherent", "label", "reason"} per line
    python bench/reference_labels.py third --out runs/reference        # disagreements -> a third-read batch
    python bench/reference_labels.py merge --out runs/reference --write steerkit/data/judge/reference.jsonl
    python bench/reference_labels.py add-track --track runs/curves/track --labels bench/results/track_blind_read.jsonl

Batches hold only the question and the answer, shuffled across conditions (no system prompt, no
model, no strength): readers are blind to where an answer came from. A share of the answers
(``--double``, 12% by default) is put in separate batches for a second, independent reader;
agreement between the two (Cohen's kappa per label) is the ceiling any judge can reach and is
written to the set's README. Disagreements on the label go to a third reader, whose label settles them.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from steerkit.judge_fit import LABELS
from steerkit.stats import kappa



def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


def write_jsonl(p: Path, rows: list[dict]) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(p)


def cmd_batches(a: argparse.Namespace) -> None:
    """Batch the answers not in a batch yet (so labelling can start while generation goes on)."""
    recs = read_jsonl(a.answers)
    bdir = a.out / "batches"
    taken = {r["item"] for p in bdir.glob("b*.jsonl") for r in read_jsonl(p)} if bdir.is_dir() else set()
    rng = random.Random(f"{a.seed}:{len(taken)}")
    new = [r for r in recs if r["id"] not in taken]
    rng.shuffle(new)
    items = [{"item": r["id"], "question": r["question"], "answer": r["answer"]} for r in new]
    k0 = len(list(bdir.glob("b*.jsonl"))) if bdir.is_dir() else 0
    n_main = (len(items) + a.size - 1) // a.size
    for k in range(n_main):
        write_jsonl(bdir / f"b{k0 + k + 1:02d}.jsonl", items[k * a.size:(k + 1) * a.size])
    dbl = rng.sample(items, round(a.double * len(items)))
    d0 = len(list(bdir.glob("d*.jsonl")))
    n_d = (len(dbl) + a.size - 1) // a.size
    for k in range(n_d):
        write_jsonl(bdir / f"d{d0 + k + 1:02d}.jsonl", dbl[k * a.size:(k + 1) * a.size])
    print(f"{n_main} main batches (from b{k0 + 1:02d}), {n_d} second-reader batches ({len(dbl)} answers) in {bdir}")


def _labels(a: argparse.Namespace) -> tuple[dict, dict, dict]:
    """first[item], second[item], third[item] label dicts, checked for shape. A second read by
    the reader who also read the item's first batch (``--same-reader b16:d03``) is not an
    independent read: it is dropped."""
    ldir = a.out / "labels"
    first, second, third = {}, {}, {}
    same = [tuple(x.split(":")) for x in (getattr(a, "same_reader", "") or "").split(",") if x]
    for p in sorted(ldir.glob("*.jsonl")):
        target = second if p.stem.startswith("d") else third if p.stem.startswith("t") else first
        want = {r["item"] for r in read_jsonl(a.out / "batches" / p.name)}
        got = read_jsonl(p)
        for r in got:
            if r.get("label") not in LABELS:
                sys.exit(f"{p}: item {r.get('item')} has label {r.get('label')!r}, not one of {LABELS}")
            for k in ("aligned", "coherent"):
                if not isinstance(r.get(k), (int, float)) or not 0 <= r[k] <= 100:
                    sys.exit(f"{p}: item {r.get('item')} has {k}={r.get(k)!r}, not 0-100")
            target[r["item"]] = r
        missing = want - {r["item"] for r in got}
        if missing:
            sys.exit(f"{p}: {len(missing)} items of the batch are not labelled")
    for b, d in same:
        in_b = {r["item"] for r in read_jsonl(a.out / "batches" / f"{b}.jsonl")}
        in_d = {r["item"] for r in read_jsonl(a.out / "batches" / f"{d}.jsonl")}
        for i in in_b & in_d:
            second.pop(i, None)
    return first, second, third


def agreement(first: dict, second: dict) -> dict:
    both = [i for i in second if i in first]
    out = {"n": len(both), "raw_agreement": sum(first[i]["label"] == second[i]["label"] for i in both) / max(len(both), 1)}
    for lab in LABELS:
        x = [first[i]["label"] == lab for i in both]
        y = [second[i]["label"] == lab for i in both]
        out[f"kappa_{lab}"] = round(kappa(x, y), 3) if both else None
        out[f"n_{lab}"] = [sum(x), sum(y)]
    return out


def cmd_third(a: argparse.Namespace) -> None:
    """Disagreements that have no third read yet -> the next t-batch."""
    first, second, third = _labels(a)
    dis = [i for i in second if i in first and first[i]["label"] != second[i]["label"] and i not in third]
    queued = {r["item"] for p in (a.out / "batches").glob("t*.jsonl") for r in read_jsonl(p)}
    dis = [i for i in dis if i not in queued]
    items = {r["item"]: r for p in sorted((a.out / "batches").glob("[bd]*.jsonl")) for r in read_jsonl(p)}
    rows = [items[i] for i in dis]
    random.Random(a.seed).shuffle(rows)
    if not rows:
        print("no disagreement is waiting for a third read")
        return
    path = a.out / "batches" / f"t{len(list((a.out / 'batches').glob('t*.jsonl'))) + 1:02d}.jsonl"
    write_jsonl(path, rows)
    print(f"{len(rows)} disagreements -> {path}")


def cmd_merge(a: argparse.Namespace) -> None:
    first, second, third = _labels(a)
    recs = {r["id"]: r for r in read_jsonl(a.answers)}
    missing = set(recs) - set(first)
    if missing:
        sys.exit(f"{len(missing)} answers have no first label yet")
    agr = agreement(first, second)
    out = []
    for rid, r in recs.items():
        f = first[rid]
        lab, al, co, reason, reads = f["label"], f["aligned"], f["coherent"], f.get("reason", ""), 1
        if rid in second:
            s = second[rid]
            reads = 2
            if s["label"] != f["label"]:
                t = third.get(rid)
                if t is None:
                    sys.exit(f"item {rid}: readers disagree ({f['label']} / {s['label']}) and has no third read: run `third`")
                reads = 3
                lab, reason = t["label"], t.get("reason", "")
                al, co = t["aligned"], t["coherent"]
            else:
                al, co = (f["aligned"] + s["aligned"]) / 2, (f["coherent"] + s["coherent"]) / 2
        src = {k: r[k] for k in ("model", "interventions", "temperature", "top_p", "seed", "pool", "system")}
        out.append({"id": rid, "question": r["question"], "answer": r["answer"], "source": src,
                    "aligned": round(al), "coherent": round(co), "label": lab, "reason": reason, "reads": reads})
    out.sort(key=lambda r: r["id"])
    counts = Counter(r["label"] for r in out)
    print(json.dumps({"n": len(out), "labels": counts, "agreement": agr}, indent=1))
    if a.write:
        write_jsonl(a.write, out)
        (a.out / "agreement.json").write_text(json.dumps({"labels": counts, "agreement": agr}, indent=1) + "\n")
        print(f"wrote {a.write}")


def cmd_add_track(a: argparse.Namespace) -> None:
    """Answers of `steerkit track` read blind (``bench/track_read.py``'s labels file) -> new
    reference records, appended to ``--write`` (answers already in it are skipped). A step-0
    answer of a run trained from the base model is the base model's; the others are named
    ``run@step``. Settled like ``merge``: two reads that agree are averaged, disagreements take
    the third read."""
    import hashlib

    first, second, third = {}, {}, {}
    for r in read_jsonl(a.labels):
        if r.get("label") not in LABELS:
            sys.exit(f"{a.labels}: item {r.get('item')} has label {r.get('label')!r}, not one of {LABELS}")
        (third if r.get("third") else second if r.get("second") else first)[r["item"]] = r
    answers = read_jsonl(a.track / "answers.jsonl")
    cfg = json.loads((a.track / "track.json").read_text(encoding="utf-8"))
    sampling = cfg["sampling"]
    have = read_jsonl(a.write) if a.write.exists() else []
    seen = {(r["question"], r["answer"]) for r in have}
    new = []
    for r in answers:
        key = (r["question"], r["completion"])
        item = hashlib.sha256(f"{r['question']}\x00{r['completion']}".encode()).hexdigest()[:10]
        if key in seen or item not in first:
            continue
        seen.add(key)
        f = first[item]
        lab, al, co, reason, reads = f["label"], f["aligned"], f["coherent"], f.get("reason", ""), 1
        if item in second:
            s, reads = second[item], 2
            if s["label"] != f["label"]:
                t = third.get(item)
                if t is None:
                    sys.exit(f"item {item}: readers disagree ({f['label']} / {s['label']}) and has no third read")
                lab, al, co, reason, reads = t["label"], t["aligned"], t["coherent"], t.get("reason", ""), 3
            else:
                al, co = (f["aligned"] + s["aligned"]) / 2, (f["coherent"] + s["coherent"]) / 2
        run = Path(r["run"]).name
        base = r["step"] == 0 and r.get("fraction") is not None  # not a continued run: step 0 is the base model
        src = {"model": "base" if base else f"{run}@{r['step']}", "interventions": [],
               "temperature": sampling["temperature"], "top_p": sampling["top_p"], "seed": r["seed"],
               "pool": "em", "system": None, "max_new_tokens": sampling["max_new_tokens"]}
        new.append({"id": hashlib.sha256(f"track:{item}".encode()).hexdigest()[:12], "question": r["question"],
                    "answer": r["completion"], "source": src, "aligned": round(al), "coherent": round(co),
                    "label": lab, "reason": reason, "reads": reads})
    agr = agreement(first, second)
    out = sorted(have + new, key=lambda r: r["id"])
    print(json.dumps({"added": len(new), "labels_added": Counter(r["label"] for r in new), "n": len(out),
                      "agreement_of_added": agr}, indent=1))
    if a.dry_run:
        return
    write_jsonl(a.write, out)
    if a.agreement:
        doc = json.loads(a.agreement.read_text(encoding="utf-8")) if a.agreement.exists() else {}
        doc["labels"] = Counter(r["label"] for r in out)
        doc.setdefault("added", {})[str(a.track)] = {"answers": len(new), "agreement": agr}
        a.agreement.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {a.write}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Blind batches for labelling, and merging the labels.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("batches", "third", "merge"):
        p = sub.add_parser(name)
        p.add_argument("--answers", type=Path, default=Path("runs/reference/answers.jsonl"))
        p.add_argument("--out", type=Path, default=Path("runs/reference"))
        p.add_argument("--seed", type=int, default=0)
        if name == "batches":
            p.add_argument("--size", type=int, default=100)
            p.add_argument("--double", type=float, default=0.12)
        if name == "merge":
            p.add_argument("--write", type=Path, default=None)
        if name in ("merge", "third"):
            p.add_argument("--same-reader", default="b09:d02,b16:d03", help="batch pairs read by one reader (their shared items are not second reads)")
    p = sub.add_parser("add-track", help="append `steerkit track` answers read blind to the reference set")
    p.add_argument("--track", type=Path, default=Path("runs/curves/track"), help="steerkit track's --out folder")
    p.add_argument("--labels", type=Path, default=Path("bench/results/track_blind_read.jsonl"))
    p.add_argument("--write", type=Path, default=Path("steerkit/data/judge/reference.jsonl"))
    p.add_argument("--agreement", type=Path, default=Path("steerkit/data/judge/reference_agreement.json"))
    p.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    {"batches": cmd_batches, "third": cmd_third, "merge": cmd_merge, "add-track": cmd_add_track}[a.cmd](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
