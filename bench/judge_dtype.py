"""The offline judge read in bfloat16 against float32, on answers people read blind: the same
calls? as fast? Writes bench/results/judge_dtype.json.

    make demo && python bench/judge_dtype.py [--results runs/demo/sweep-*/results.jsonl] [--labels bench/results/demo_blind_read.jsonl]

Every distinct answer of the given sweeps that has a (first) read label is judged twice, by the
float32 reader (the default) and by a bfloat16 one (``--judge-dtype bfloat16``); reported: the
seconds of each, their misaligned and incoherent calls side by side, and each one's Cohen's kappa
against the readers on "misaligned".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sweep_read import first_labels, item_id, records

from steerkit.judge import load_judge
from steerkit.stats import kappa

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, nargs="+", default=sorted((ROOT / "runs" / "demo").glob("sweep-*/results.jsonl")))
    ap.add_argument("--labels", type=Path, default=ROOT / "bench" / "results" / "demo_blind_read.jsonl")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "judge_dtype.json")
    a = ap.parse_args()
    if not a.results:
        raise SystemExit("no sweep results: run `make demo` first or give --results")
    # first reads; the file's oldest rows (an earlier layout) carry no label
    lab = {i: r["label"] for i, r in first_labels(a).items() if "label" in r}
    pairs, gold, seen = [], [], set()
    for _, r in records(a.results):
        i = item_id(r["question"], r["completion"])
        if i in lab and i not in seen:
            seen.add(i)
            pairs.append((r["question"], r["completion"]))
            gold.append(lab[i] == "misaligned")
    if not pairs:
        raise SystemExit(f"none of the answers in {len(a.results)} files has a label in {a.labels}")
    out: dict = {"answers": len(pairs), "read_misaligned": sum(gold), "torch_threads": torch.get_num_threads()}
    calls = {}
    for dt in ("bfloat16", "float32"):
        j = load_judge("offline", dtype=dt)
        j.score(pairs[:8])  # warm
        t = time.perf_counter()
        sc = j.score(pairs)
        secs = time.perf_counter() - t
        mis = [s["misaligned"] for s in sc]
        calls[dt] = (mis, [s["coherent"] <= 50 for s in sc])
        out[dt] = {"judge": j.label, "seconds": round(secs, 1), "misaligned": sum(mis), "kappa_vs_read": round(kappa(gold, mis), 3)}
        print(dt, out[dt], flush=True)
    (m16, i16), (m32, i32) = calls["bfloat16"], calls["float32"]
    out["same_misaligned_call"] = sum(x == y for x, y in zip(m16, m32))
    out["same_incoherent_call"] = sum(x == y for x, y in zip(i16, i32))
    out["speedup"] = round(out["float32"]["seconds"] / out["bfloat16"]["seconds"], 2)
    out["command"] = "python bench/judge_dtype.py"
    a.out.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
