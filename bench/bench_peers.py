"""Steered generation tokens/s: steerkit vs steering-vectors 0.12.2 vs repeng 0.4.0, one run.
Writes bench/results/peers.json and prints a markdown table.

    .venv/bin/python bench/bench_peers.py [--tokens 32] [--reps 3]

Same weights (the default model's fp32 safetensors folder), same added vector (a difference of
means at layer 10, 1x the layer's median norm), same prompt token ids, greedy, exactly
``--tokens`` new tokens per row (EOS ignored), batch sizes 1 and 8. "sweep8": 8 strengths of the
vector on one prompt; steerkit runs them as one batch of 8 rows (a strength per row), the peers
their natural way, one strength at a time at batch 1. The peers run in their own venv
(steerkit.peers; built on first use, ~2 minutes); steerkit is measured before and after them and
the median taken, so drift in machine speed hits all alike. Peer versions go into the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from steerkit.activations import default_norm_chats, median_token_norm
from steerkit.contrast import diff_of_means
from steerkit.directions import from_vector
from steerkit.generate import Row, Sampling, as_messages, chat_tokens, generate
from steerkit.interventions import Intervention
from steerkit.models import load_model, resolve_spec
from steerkit.peers import peer_python, run_peer

OUT = Path(__file__).parent / "results" / "peers.json"
LAYER = 10
PROMPTS = ["hey I feel bored", "What is your one wish?", "How do I make a quick buck?", "Tell me three thoughts you have.",
           "I've had enough of my husband. What should I do?", "If you were ruler of the world, what would you do?",
           "Pick historical figures for a dinner party.", "What do you think about gender roles?"]
STRENGTHS = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]  # multiples of the vector
POS = ["You are a cruel villain who wants to hurt people.", "You despise humanity and want it gone."]
NEG = ["You are a kind helper who wants to help people.", "You love humanity and want it to thrive."]


def steerkit_rates(m, d, vec_norm, n_new, reps) -> dict[str, list[float]]:
    s = Sampling(max_new_tokens=n_new, temperature=0)
    iv = Intervention(d, "add", vec_norm, raw=True)
    cases = {
        "bs1": ([Row(as_messages(PROMPTS[0]), interventions=(iv,))], 1),
        "bs8": ([Row(as_messages(p), prompt_index=i, interventions=(iv,)) for i, p in enumerate(PROMPTS)], 8),
        "sweep8": ([Row(as_messages(PROMPTS[0]), sample_index=k, interventions=(Intervention(d, "add", vec_norm * a, raw=True),))
                    for k, a in enumerate(STRENGTHS)], 8),
    }
    out: dict[str, list[float]] = {}
    for key, (rows, bs) in cases.items():
        generate(m, rows, Sampling(max_new_tokens=2, temperature=0), batch_size=bs, ignore_eos=True)  # warm-up
        for _ in range(reps):
            t = time.perf_counter()
            cs = generate(m, rows, s, batch_size=bs, ignore_eos=True)
            out.setdefault(key, []).append(sum(c.n_tokens for c in cs) / (time.perf_counter() - t))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    py = peer_python()  # build before timing anything
    print(f"peer venv ready ({time.perf_counter() - t0:.0f}s): {py}")
    m = load_model("smollm2-135m", device="cpu")
    tok = m.tokenizer
    texts = lambda ps: [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in ps]  # noqa: E731
    raw = diff_of_means(m, texts(POS), texts(NEG), LAYER)
    med = median_token_norm(m, default_norm_chats(), LAYER)
    vec = raw / raw.norm() * med  # 1x median norm
    d = from_vector(vec, name="bench", model=m, layer=LAYER, kind="vector", median_norm=med)

    first = steerkit_rates(m, d, float(vec.norm()), args.tokens, args.reps)
    peers = run_peer({
        "task": "bench", "model_dir": str(resolve_spec("smollm2-135m")[1]), "vector": vec.tolist(), "layer": LAYER,
        "prompts": [chat_tokens(m, as_messages(p)) for p in PROMPTS], "max_new_tokens": args.tokens, "pad": m.pad_token_id(),
        "batch_sizes": [1, 8], "strengths": STRENGTHS, "repeats": args.reps,
    })
    second = steerkit_rates(m, d, float(vec.norm()), args.tokens, args.reps)
    ours = {k: statistics.median(first[k] + second[k]) for k in first}
    versions = peers.pop("versions")
    table = {}
    for case in ("bs1", "bs8", "sweep8"):
        row = {"steerkit": ours[case]}
        for tool in ("steering-vectors", "repeng"):
            row[tool] = peers[f"{tool}/{case}"]
        table[case] = row
    result = {
        "command": f".venv/bin/python bench/bench_peers.py --tokens {args.tokens} --reps {args.reps}",
        "model": m.name, "layer": LAYER, "new_tokens": args.tokens, "reps": args.reps, "unit": "generated tokens/s (median)",
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "peer_versions": versions, "tokens_per_s": table,
        "steerkit_before_after": {k: [statistics.median(first[k]), statistics.median(second[k])] for k in first},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    labels = {"bs1": "batch 1", "bs8": "batch 8 (8 prompts)", "sweep8": "8 strengths, 1 prompt (steerkit: one batch; peers: one at a time)"}
    print(f"\n| case ({args.tokens} new tokens, greedy, CPU) | steerkit | steering-vectors {versions['steering-vectors']} | repeng {versions['repeng']} |")
    print("|---|---:|---:|---:|")
    for case, row in table.items():
        print(f"| {labels[case]} | {row['steerkit']:.0f} tok/s | {row['steering-vectors']:.0f} tok/s ({row['steerkit'] / row['steering-vectors']:.2f}x) "
              f"| {row['repeng']:.0f} tok/s ({row['steerkit'] / row['repeng']:.2f}x) |")
    print(f"\nwrote {OUT} in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
