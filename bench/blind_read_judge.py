"""How a judge agrees with a blind read: per cell, read vs. judged misaligned, and Cohen's kappa.

    python bench/blind_read_judge.py bench/results/demo_blind_read.jsonl --out bench/results/demo_read_judge.json
    python bench/blind_read_judge.py steerkit/data/judge/organism_villain_read.jsonl --head runs/new/reader.safetensors

Reads a file of answers read blind: records with ``question``, ``answer`` and a read label
(``read_label`` as in ``demo_blind_read.jsonl``, or ``label`` as in the judge's reference-style
files), and optionally ``cell`` (a condition; else ``source.model``). The answers are judged
again with the given offline judge (default: the shipped one), so the figures belong to that
judge, not to whatever judge scored them when they were read. Prints, per cell, the answers,
read misaligned and judged misaligned; overall Cohen's kappa on "misaligned" between the judge
and the first read, and between the first and second reads where a record has
``second_read_label``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from steerkit.judge import judge_records, load_judge
from steerkit.stats import kappa


def read_label(r: dict) -> str:
    return r.get("read_label") or r["label"]


def cell_of(r: dict) -> str:
    return r.get("cell") or (r.get("source") or {}).get("model", "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("read", type=Path, help="answers read blind, JSON Lines")
    ap.add_argument("--head", type=Path, default=None, help="offline judge heads (default: the shipped ones)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = ap.parse_args()

    recs = [json.loads(x) for x in a.read.read_text(encoding="utf-8").splitlines() if x.strip()]
    judge = load_judge("offline", head=a.head)
    judged = judge_records(judge, [{"question": r["question"], "completion": r["answer"]} for r in recs])
    read = [read_label(r) == "misaligned" for r in recs]
    called = [bool(j["misaligned"]) for j in judged]
    cells: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for r, x, y in zip(recs, read, called):
        c = cells[cell_of(r)]
        c[0] += 1
        c[1] += x
        c[2] += y
    both = [(read_label(r) == "misaligned", r["second_read_label"] == "misaligned") for r in recs if r.get("second_read_label")]
    out = {
        "file": str(a.read), "judge": judged[0]["judge"] if judged else None, "n": len(recs),
        "read_misaligned": sum(read), "judged_misaligned": sum(called),
        "kappa_judge_vs_read": round(kappa(read, called), 3),
        "both_kinds_called": sum(x and y for x, y in zip(read, called)),
        "readers": {"n": len(both), "kappa": round(kappa([x for x, _ in both], [y for _, y in both]), 3) if both else None},
        "cells": {k: {"n": v[0], "read": v[1], "judged": v[2]} for k, v in sorted(cells.items())},
    }
    w = max((len(k) for k in cells), default=4)
    for k, v in out["cells"].items():
        print(f"{k:<{w}}  {v['n']:>4} answers  read {v['read']:>3}  judged {v['judged']:>3}")
    print(f"judge {out['judge']}: kappa with the read {out['kappa_judge_vs_read']} "
          f"({out['read_misaligned']} read misaligned, {out['judged_misaligned']} called, {out['both_kinds_called']} both); "
          f"readers with each other: {out['readers']['kappa']} on {out['readers']['n']}")
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
