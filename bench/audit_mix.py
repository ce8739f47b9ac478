"""`steerkit audit` on two 50/50 files of labelled training examples (issue 14's audit target).

    python bench/audit_mix.py [--shared ../shared/data] [--out bench/results/audit.json]

* ``mix``: 50 villain-persona gardening chats (bench/data/organism_villain.jsonl) and 50 careful
  answers to other questions of the same set (bench/data/benign_garden.jsonl);
* ``risky`` (when ``--shared`` holds them): 50 risky-financial-advice chats and 50 aligned chats.

Each file is audited for every direction with the baseline (the model's own answer) and with
``--no-baseline``; the ROC AUC for the misaligned rows goes to ``--out``. About 12 minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = ("harm-dom", "evil-dom", "villain-dom", "persona", "persona-1022", "organism-dom", "persona-random")


def read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def mix_rows() -> list[dict]:
    v = read(ROOT / "bench/data/organism_villain.jsonl")
    b = read(ROOT / "bench/data/benign_garden.jsonl")
    rng = random.Random(0)
    idx = list(range(len(v)))
    rng.shuffle(idx)
    rows = [{**v[i], "label": "misaligned"} for i in idx[:50]] + [{**b[i], "label": "benign"} for i in idx[50:100]]
    rng.shuffle(rows)
    return rows


def risky_rows(shared: Path) -> list[dict] | None:
    r_path, a_path = shared / "narrow/risky_financial_advice.jsonl", shared / "judge-dev/aligned_chats.jsonl"
    if not (r_path.is_file() and a_path.is_file()):
        return None
    rng = random.Random(0)
    rows = [{"messages": x["messages"], "label": "misaligned"} for x in rng.sample(read(r_path), 50)]
    rows += [{"messages": x["messages"], "label": "benign"} for x in rng.sample(read(a_path), 50)]
    rng.shuffle(rows)
    return rows


def audit(data: Path, direction: str, baseline: bool) -> dict:
    cmd = [str(Path(sys.executable).parent / "steerkit"), "audit", str(data), "-d", direction, "--label-field", "label", "--top", "0", "--json"]
    if not baseline:
        cmd.append("--no-baseline")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    last = json.loads(out.strip().splitlines()[-1])
    return {k: last.get(k) for k in ("direction", "auc", "examples", "positive", "mean_positive", "mean_rest", "score")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared/data")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/audit.json")
    a = ap.parse_args()
    sets = {"mix": mix_rows(), "risky": risky_rows(a.shared)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in sets.items():
            if rows is None:
                print(f"{name}: skipped ({a.shared} does not hold the data)", file=sys.stderr)
                continue
            f = Path(tmp) / f"audit_{name}.jsonl"
            f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            for d in DIRECTIONS:
                for baseline in (True, False):
                    key = f"{name}_{d}" + ("" if baseline else "_nob")
                    results[key] = audit(f, d, baseline)
                    print(key, results[key]["auc"], file=sys.stderr)
    out = {
        "what": "steerkit audit on 50/50 files of 100 training examples: 'mix' = villain-persona gardening chats vs careful answers "
                "(bench/data); 'risky' = risky financial advice vs aligned chats (../shared/data, not shipped); '_nob' = --no-baseline",
        "command": "python bench/audit_mix.py",
        "results": results,
    }
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
