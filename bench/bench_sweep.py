"""A strength sweep batched across strengths against the same sweep run one strength at a time,
on the default model, side by side in one run. Writes bench/results/sweep.json.

    nice -n 10 .venv/bin/python bench/bench_sweep.py [--questions 4] [--samples 2] [--tokens 32] [--reps 1]

Both arms make the same records (same questions, samples, seeds, 9 strengths, a random
control): the batched arm is ``run_sweep`` (``--batch-size`` rows per forward pass, rows of
different strengths and conditions mixed, the strength-0 answer shared by both conditions);
the other runs ``run_sweep`` once per (condition, strength), its rows batched together (what a
loop over strengths does). No judge: this measures generation. Arms alternate per repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from steerkit.activations import default_norm_chats, median_token_norm
from steerkit.directions import Direction
from steerkit.generate import Sampling
from steerkit.models import load_model
from steerkit.prompts import default_questions_path, plain_em_questions, read_file
from steerkit.sweep import Condition, make_conditions, parse_strengths, record_key, run_sweep

OUT = Path(__file__).parent / "results" / "sweep.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--strengths", default="-0.6:0.6:9")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    model = load_model("smollm2-135m")
    layer = 15
    m = median_token_norm(model, default_norm_chats(), layer)
    g = torch.Generator().manual_seed(1234)  # not the control's seed
    d = Direction(name="bench", vector=torch.randn(model.d_model, generator=g), model=model.name, layer=layer,
                  hook_name=model.hook_name(layer), kind="random", median_norm=m)
    qs = plain_em_questions(read_file(default_questions_path()))[: args.questions]
    grid = parse_strengths(args.strengths)
    conds = make_conditions(d, "add", grid, control="random")
    s = Sampling(max_new_tokens=args.tokens, temperature=1.0, seed=0)
    run_sweep(model, conds[:1], qs[:1], 1, Sampling(max_new_tokens=4), None)  # warm-up

    def batched() -> tuple[float, int, dict]:
        t = time.perf_counter()
        r = run_sweep(model, conds, qs, args.samples, s, None, batch_size=args.batch_size)
        dt = time.perf_counter() - t
        # tokens generated: shared strength-0 answers count once
        gen = sum(rec["tokens"] for rec in r.records if not (rec["strength"] == 0 and rec["control"]))
        return dt, gen, {record_key(x): x["completion"] for x in r.records}

    def one_at_a_time() -> tuple[float, int, dict]:
        t = time.perf_counter()
        comps, gen = {}, 0
        for c in conds:
            for st in c.strengths:
                one = Condition(c.name, c.direction, c.mode, (st,), c.control)
                r = run_sweep(model, [one], qs, args.samples, s, None, batch_size=args.batch_size)
                gen += sum(rec["tokens"] for rec in r.records)
                comps.update({record_key(x): x["completion"] for x in r.records})
        return time.perf_counter() - t, gen, comps

    runs: dict[str, list[dict]] = {"batched": [], "one_strength_at_a_time": []}
    same = None
    for _ in range(args.reps):
        for name, fn in (("batched", batched), ("one_strength_at_a_time", one_at_a_time)):
            dt, gen, comps = fn()
            runs[name].append({"seconds": round(dt, 2), "tokens": gen, "tok_s": round(gen / dt, 2), "comps": comps})
            print(f"{name}: {dt:.1f} s, {gen} tokens, {gen / dt:.1f} tok/s", flush=True)
        a, b = runs["batched"][-1]["comps"], runs["one_strength_at_a_time"][-1]["comps"]
        same = sum(a[k] == b[k] for k in a) / len(a)
    rows = len(qs) * args.samples * len(grid) * len(conds)
    result: dict = {
        "model": model.name, "layer": layer, "questions": len(qs), "samples": args.samples, "strengths": list(grid),
        "conditions": [c.name for c in conds], "records": rows, "max_new_tokens": args.tokens, "temperature": 1.0,
        "batch_size": args.batch_size, "reps": args.reps, "torch_threads": torch.get_num_threads(),
        "load_avg_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews both arms
    }
    for name, rs in runs.items():
        result[name] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "tokens": rs[-1]["tokens"],
            "tok_s": statistics.median(r["tok_s"] for r in rs),
            "runs_s": [r["seconds"] for r in rs],
        }
    bt, st = result["batched"], result["one_strength_at_a_time"]
    result["speedup_wall"] = round(st["seconds"] / bt["seconds"], 3)
    result["ratio_tok_s"] = round(bt["tok_s"] / st["tok_s"], 3)
    result["identical_completions"] = round(same or 0.0, 3)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wall-clock speedup {result['speedup_wall']}x, tok/s ratio {result['ratio_tok_s']}x, "
          f"identical completions {result['identical_completions']:.0%} -> {OUT}")


if __name__ == "__main__":
    main()
