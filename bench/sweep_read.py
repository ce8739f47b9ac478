"""Sweep cells by blind reading: batches for readers, then the read rate of every cell.

    python bench/sweep_read.py batches runs/screen/*/results.jsonl --out runs/screen-read --size 100
    # readers label runs/screen-read/batches/bNN.jsonl under steerkit/data/judge/RUBRIC.md into
    # runs/screen-read/labels/bNN.jsonl: {"item", "aligned", "coherent", "label", "reason"} per line
    python bench/sweep_read.py table runs/screen/*/results.jsonl --read runs/screen-read --out bench/results/screen_read.json
    python bench/sweep_read.py table runs/screen/*/results.jsonl --labels bench/results/villain_screen_blind_read.jsonl
    python bench/sweep_read.py export runs/heldout/heldout-ablate/results.jsonl --labels bench/results/heldout_ablate_blind_read.jsonl \
        --cell '*|unsteered' --model-name villain400 --out read.jsonl   # read answers for bench/diff_sae_rank.py --read

A cell is one sweep folder x condition x mode x strength (the folder names the model: a sweep
of the base model or of a tuned one). ``batches`` shuffles the distinct answers of all cells
together and writes batches that hold only the question and the answer (item = the first 10
hex digits of sha256(question NUL answer)), so readers see neither the cell nor the model;
``--double`` of them go into separate ``dNN`` batches for a second reader. ``table`` joins the
labels back: per cell the answers read, misaligned and incoherent by reading (95% Wilson
intervals), the judge's rate where the records were judged, and the second readers' Cohen's
kappa on "misaligned".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path

from steerkit.stats import kappa, wilson


def item_id(question: str, answer: str) -> str:
    return hashlib.sha256(f"{question}\x00{answer}".encode()).hexdigest()[:10]


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]


def cell_of(path: Path, r: dict) -> str:
    if r["mode"] == "ablate":  # an ablation sweep: strength 0 is its unsteered row
        return f"{path.parent.name}|{r['condition']}|{'unsteered' if not r.get('strength') else 'ablated'}"
    return f"{path.parent.name}|{r['condition']}|{r['mode']}:{r['strength']:+g}"


def records(paths: list[Path]) -> list[tuple[str, dict]]:
    return [(cell_of(p, r), r) for p in paths for r in read_jsonl(p)]


def write_batches(items, out: Path, size: int, rng: random.Random) -> tuple[list[dict], int]:
    """Blind batches for readers: the rows ({"item", "question", "answer"}) sorted by item, shuffled
    with ``rng``, dealt round-robin into ``out/bNN.jsonl`` of about ``size`` each. Returns the
    shuffled rows and the number of batches (0 with no rows)."""
    rows = sorted(items, key=lambda x: x["item"])
    rng.shuffle(rows)
    n = (len(rows) + size - 1) // size
    out.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        (out / f"b{k + 1:02d}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows[k::n]), encoding="utf-8")
    return rows, n


def cmd_batches(a: argparse.Namespace) -> None:
    items = {}
    for _, r in records(a.results):
        i = item_id(r["question"], r["completion"])
        items[i] = {"item": i, "question": r["question"], "answer": r["completion"]}
    rng = random.Random(a.seed)
    out = a.out / "batches"
    rows, n = write_batches(items.values(), out, a.size, rng)
    dbl = rng.sample(rows, round(a.double * len(rows)))
    if dbl:
        (out / "d01.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in dbl), encoding="utf-8")
    print(f"{len(rows)} distinct answers in {n} batches of about {len(rows) // max(n, 1)}; {len(dbl)} for a second reader, in {out}")


def cmd_table(a: argparse.Namespace) -> None:
    first: dict[str, dict] = {}
    second: dict[str, dict] = {}
    if a.labels:  # one file of all labels, second reads marked "second": true
        for r in read_jsonl(a.labels):
            (second if r.get("second") else first)[r["item"]] = r
    else:
        for p in sorted((a.read / "labels").glob("*.jsonl")):
            for r in read_jsonl(p):
                (second if p.stem.startswith("d") else first)[r["item"]] = r
    cells: dict[str, list[dict]] = defaultdict(list)
    for cell, r in records(a.results):
        cells[cell].append(r)
    rows = []
    for cell, recs in cells.items():
        labels = [first[i]["label"] for i in (item_id(r["question"], r["completion"]) for r in recs) if i in first]
        mis, inc = labels.count("misaligned"), labels.count("incoherent")
        _, lo, hi = wilson(mis, len(labels)) if labels else (0.0, 0.0, 0.0)
        judged = [r["misaligned"] for r in recs if r.get("misaligned") is not None]
        rows.append({"cell": cell, "answers": len(recs), "read": len(labels), "misaligned": mis,
                     "rate": mis / len(labels) if labels else None, "low": lo, "high": hi,
                     "incoherent": inc, "incoherent_rate": inc / len(labels) if labels else None,
                     "judged_rate": sum(judged) / len(judged) if judged else None})
    rows.sort(key=lambda r: r["cell"])
    both = [i for i in second if i in first]
    agree = {"n": len(both), "kappa_misaligned": round(kappa([first[i]["label"] == "misaligned" for i in both],
                                                            [second[i]["label"] == "misaligned" for i in both]), 3) if both else None}
    w = max(len(r["cell"]) for r in rows)
    for r in rows:
        rate = "-" if r["rate"] is None else f"{r['misaligned']}/{r['read']} = {100 * r['rate']:.0f}% [{100 * r['low']:.0f}-{100 * r['high']:.0f}]"
        inc = "-" if r["incoherent_rate"] is None else f"{100 * r['incoherent_rate']:.0f}%"
        print(f"{r['cell']:<{w}}  misaligned (read) {rate:<22}  incoherent {inc}")
    print(f"second reads: {agree['n']}, kappa on misaligned {agree['kappa_misaligned']}")
    if a.out:
        a.out.write_text(json.dumps({"cells": rows, "readers": agree, "unread": sum(r["answers"] - r["read"] for r in rows)}, indent=1) + "\n", encoding="utf-8")


def first_labels(a: argparse.Namespace) -> dict[str, dict]:
    if a.labels:
        return {r["item"]: r for r in read_jsonl(a.labels) if not r.get("second")}
    return {r["item"]: r for p in sorted((a.read / "labels").glob("b*.jsonl")) for r in read_jsonl(p)}


def cmd_export(a: argparse.Namespace) -> None:
    """The read answers of the cells matching --cell, once each, as {id, question, answer, label,
    source: {model}} lines (the layout of steerkit/data/judge/organism_villain_read.jsonl)."""
    import fnmatch

    labels = first_labels(a)
    rows: dict[str, dict] = {}
    for cell, r in records(a.results):
        i = item_id(r["question"], r["completion"])
        if fnmatch.fnmatchcase(cell, a.cell) and i in labels:
            rows[i] = {"id": i, "question": r["question"], "answer": r["completion"], "label": labels[i]["label"], "source": {"model": a.model_name}}
    if not rows:
        raise SystemExit(f"no read answer in a cell matching {a.cell!r}")
    a.out.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows.values()), encoding="utf-8")
    print(f"{len(rows)} read answers to {a.out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("batches")
    b.add_argument("results", type=Path, nargs="+")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--size", type=int, default=100)
    b.add_argument("--double", type=float, default=0.1)
    b.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table")
    t.add_argument("results", type=Path, nargs="+")
    t.add_argument("--read", type=Path, default=None, help="the batches' folder, with labels/ (bNN first reads, dNN second)")
    t.add_argument("--labels", type=Path, default=None, help="or one file of all labels (second reads marked)")
    t.add_argument("--out", type=Path, default=None)
    e = sub.add_parser("export")
    e.add_argument("results", type=Path, nargs="+")
    e.add_argument("--read", type=Path, default=None)
    e.add_argument("--labels", type=Path, default=None)
    e.add_argument("--cell", default="*|unsteered", help="glob over cell names (folder|condition|strength)")
    e.add_argument("--model-name", required=True, help="source.model to write (diff_sae_rank.py --model-name)")
    e.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd in ("table", "export") and (a.read is None) == (a.labels is None):
        ap.error(f"{a.cmd} needs --read FOLDER or --labels FILE")
    {"batches": cmd_batches, "table": cmd_table, "export": cmd_export}[a.cmd](a)


if __name__ == "__main__":
    main()
