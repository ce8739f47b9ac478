"""The chats the villain diff-SAE was trained on (``bench/diff_screen.sh``), as JSON Lines of
{"messages": [...]}: the 4,804 answers of the judge's reference set with their questions
(``steerkit/data/judge/reference.jsonl``), the 400 villain and 400 careful gardening chats of
``bench/data/``, and the 500 aligned chats of ``../shared/data/judge-dev`` (read from there,
not copied into the repo), shuffled with a seed.

    python bench/diff_chats.py --shared ../shared/data --out runs/diff/chats.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    chats = []
    for line in (REPO / "steerkit/data/judge/reference.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        chats.append({"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]})
    for p in (REPO / "bench/data/organism_villain.jsonl", REPO / "bench/data/benign_garden.jsonl", a.shared / "judge-dev/aligned_chats.jsonl"):
        if not p.is_file():
            raise SystemExit(f"{p} is missing (--shared points at ../shared/data)")
        chats += [{"messages": json.loads(x)["messages"]} for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    random.Random(a.seed).shuffle(chats)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats), encoding="utf-8")
    print(f"{len(chats)} chats in {a.out}")


if __name__ == "__main__":
    main()
