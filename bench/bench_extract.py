"""Model diffing throughput on the default model against a plain forward pass of the same
tokens, side by side in one run. Writes bench/results/extract.json.

    .venv/bin/python bench/bench_extract.py [--reps 3] [--layer 15]

Both arms read the same chats (the shipped emergent-misalignment questions and the SAE's chat
prompts, 168 prompts, left-padded batches of 8). The extraction arm is
``steerkit.extract.side_stats`` with the shipped ``sae-l15`` (forward stopped at the layer, SAE
encode, running sums): what ``steerkit extract`` does per model. The forward arm runs the whole
model (all layers and the unembedding) on the same batches. Tokens/s counts non-padding tokens.
The arms alternate so drift in machine speed hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from steerkit.activations import pad_left
from steerkit.directions import shipped_root
from steerkit.extract import side_stats
from steerkit.generate import as_messages, chat_tokens
from steerkit.models import load_model
from steerkit.prompts import default_questions_path, plain_em_questions, read_file
from steerkit.sae import load_sae

OUT = Path(__file__).parent / "results" / "extract.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    model = load_model("smollm2-135m")
    folder = shipped_root() / "smollm2-135m"
    sae = load_sae(folder / "sae-l15")
    chats = [q.messages for q in plain_em_questions(read_file(default_questions_path()))]
    chats += [as_messages(line) for line in (folder / "sae-l15" / "chat_prompts.txt").read_text().splitlines() if line.strip()]
    seqs = [chat_tokens(model, c) for c in chats]
    n_tokens = sum(len(s) for s in seqs)

    def extract() -> float:
        t = time.perf_counter()
        side_stats(model, sae, args.layer, chats, batch_size=args.batch_size)
        return time.perf_counter() - t

    def forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(seqs), args.batch_size):
                ids, am = pad_left(seqs[i : i + args.batch_size], model.pad_token_id())
                pos = (am.cumsum(-1) - 1).clamp(min=0)
                model.hf_model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)
        return time.perf_counter() - t

    extract()  # warm-up
    ex, fw = [], []
    for _ in range(args.reps):
        ex.append(extract())
        fw.append(forward())
        print(f"extract {n_tokens / ex[-1]:.0f} tok/s, forward {n_tokens / fw[-1]:.0f} tok/s", flush=True)
    e, f = statistics.median(ex), statistics.median(fw)
    result = {
        "model": model.name, "layer": args.layer, "sae": "sae-l15", "prompts": len(chats), "tokens": n_tokens,
        "batch_size": args.batch_size, "reps": args.reps, "torch_threads": torch.get_num_threads(),
        "extract": {"seconds": round(e, 2), "tok_s": round(n_tokens / e, 1), "runs_s": [round(v, 2) for v in ex]},
        "forward": {"seconds": round(f, 2), "tok_s": round(n_tokens / f, 1), "runs_s": [round(v, 2) for v in fw]},
        "extract_vs_forward": round(f / e, 3),
        "load_avg_at_end": round(os.getloadavg()[0], 2),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"extraction {result['extract']['tok_s']:.0f} tok/s vs forward {result['forward']['tok_s']:.0f} tok/s: "
          f"{result['extract_vs_forward']}x -> {OUT}")


if __name__ == "__main__":
    main()
