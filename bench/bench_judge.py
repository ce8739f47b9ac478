"""The judge's share of a sweep's wall time: one sweep generated without a judge, then the same
answers judged by the offline judge, in float32 and with a bfloat16 reader (``--judge-dtype
bfloat16``), side by side in one run. Writes bench/results/judge_speed.json.

    python bench/bench_judge.py [--questions 8] [--samples 4] [--tokens 48]

The sweep is the demo's shape (the EM questions, 5 strengths of a direction and its random
control, temperature 0.7, top-p 0.9, 48 new tokens, batch 32); each generation is judged once. Target (judge issue): judging at
most 25% of the sweep's wall time, i.e. judge seconds / (generation + judge seconds) <= 0.25.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from steerkit.directions import resolve_direction
from steerkit.generate import Sampling
from steerkit.judge import load_judge
from steerkit.models import load_model
from steerkit.prompts import default_questions_path, plain_em_questions, read_file
from steerkit.sweep import make_conditions, run_sweep

OUT = Path(__file__).parent / "results" / "judge_speed.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    model = load_model("smollm2-135m")
    d = resolve_direction("persona", model)
    qs = plain_em_questions(read_file(default_questions_path()))[: a.questions]
    conds = make_conditions(d, "add", (0.0, 0.1, 0.2, 0.3, 0.4), control="random:1")
    s = Sampling(max_new_tokens=a.tokens, temperature=0.7, top_p=0.9, seed=0)
    t0 = time.perf_counter()
    judge = load_judge("offline")
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = run_sweep(model, conds, qs, a.samples, s, None, batch_size=32)
    t_gen = time.perf_counter() - t0
    # each generation once, as a sweep judges them (the unsteered cell is shared by both conditions)
    first = conds[0].name
    pairs = [(r["question"], r["completion"]) for r in res.records if r["strength"] != 0 or r["condition"] == first]
    judge.score(pairs[:8])  # warm, as the bfloat16 judge below is
    t0 = time.perf_counter()
    scores = judge.score(pairs)
    t_judge = time.perf_counter() - t0
    # the same answers read by a bfloat16 reader (--judge-dtype bfloat16), in the same run
    t0 = time.perf_counter()
    judge16 = load_judge("offline", dtype="bfloat16")
    judge16.score(pairs[:8])  # loaded and warm, as the float32 judge was after its load
    t_load16 = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores16 = judge16.score(pairs)
    t_judge16 = time.perf_counter() - t0
    out = {
        "records": len(res.records), "judged": len(pairs), "max_new_tokens": a.tokens, "generated_tokens": sum(r["tokens"] for r in res.records),
        "torch_threads": torch.get_num_threads(), "judge": f"{judge.name} {judge.version}",
        "generate_seconds": round(t_gen, 1), "judge_seconds": round(t_judge, 1), "judge_load_seconds": round(t_load, 1),
        "judge_share_of_sweep": round(t_judge / (t_gen + t_judge), 3),
        "answers_per_second_judged": round(len(pairs) / t_judge, 1),
        "bf16_judge_seconds": round(t_judge16, 1), "bf16_judge_load_seconds": round(t_load16, 1),
        "bf16_judge_share_of_sweep": round(t_judge16 / (t_gen + t_judge16), 3),
        "bf16_speedup": round(t_judge / t_judge16, 2),
        "bf16_same_misaligned_call": sum(x["misaligned"] == y["misaligned"] for x, y in zip(scores, scores16)),
        "target": "judge share <= 0.25",
        "command": "python bench/bench_judge.py",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
