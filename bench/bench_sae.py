"""SAE training throughput on the default model, side by side in one run. Writes
bench/results/sae.json.

    nice -n 10 .venv/bin/python bench/bench_sae.py [--tokens 32k] [--reps 2] [--layer 15]

Three measurements on the same packed chunks of ../shared/data/corpus (the CPU-side cost of
``steerkit sae train``):

* activation collection: the residual at --layer, the forward pass stopped there
  (``steerkit.sae_train.chunk_activations``), against a full forward pass of the same chunks
  (every layer and the unembedding, as a plain HF call would run): the ratio is what stopping
  at the layer buys;
* SAE training steps (TopK, 8x, k=32, batch 4096, AuxK on) on the collected activations:
  tokens/s of the optimiser alone, with the sparse TopK decode ``steerkit sae train`` uses
  against the dense reference computation;
* both together: what ``steerkit sae train --passes 1`` and ``--passes 2`` cost per training
  token, computed from the two rates.

Arms alternate per repetition; the median is reported.

``--modes`` measures instead what ``steerkit sae train`` delivers end to end (activations,
masking, packing, swaps and optimiser steps, model load excluded), in training tokens per
second, for each mode side by side, and writes bench/results/sae_modes.json:

    nice -n 10 .venv/bin/python bench/bench_sae.py --modes [--tokens 8k] [--layer 15]

* ``plain``: --corpus ../shared/data/corpus;
* ``chat-mix``: the same corpus with ../shared/data/narrow/risky_financial_advice.jsonl at
  --chat-fraction 0.35, --drop-system 0.8 (whole conversations, special tokens masked);
* ``diff``: the same mix, tuned minus base residuals with the shipped ``organism-risky``
  adapter swapped in and out (BatchTopK, 2 x d_model latents).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from steerkit.models import load_model
from steerkit.sae import new_sae
from steerkit.sae_train import ChunkStream, TrainConfig, chunk_activations, train_step, training_documents

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "sae.json"
CORPUS = ROOT.parent / "shared" / "data" / "corpus"


def _n(s: str) -> int:
    s = s.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "km" else s) * mult)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="32k", help="activations per collection arm")
    ap.add_argument("--train-steps", type=int, default=12)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--model-batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--modes", action="store_true", help="end-to-end tokens/s of plain, chat-mix and diff training (sae_modes.json)")
    args = ap.parse_args()
    if args.modes:
        modes(args)
        return
    if not CORPUS.is_dir():
        raise SystemExit(f"bench_sae needs ../shared/data/corpus beside the repository (looked in {CORPUS})")
    n_tokens = _n(args.tokens)
    model = load_model("smollm2-135m")
    docs = training_documents([CORPUS])
    stream = ChunkStream(model, docs, args.context, seed=0, cycle=True)
    n_chunks = -(-n_tokens // (args.context - 1))
    batches = []
    while sum(b.shape[0] for b in batches) < n_chunks:
        batches.append(stream.next_chunks(args.model_batch))
    tokens_in = sum(b.numel() for b in batches)  # tokens through the model (position 0 included)

    def collect() -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        acts = torch.cat([chunk_activations(model, b, args.layer) for b in batches])
        return time.perf_counter() - t, acts

    def full_forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                model.hf_model(input_ids=b.to(model.device), use_cache=False)
        return time.perf_counter() - t

    collect()  # warm-up (allocator, first-call overheads)
    coll, full = [], []
    acts = torch.empty(0)
    for _ in range(args.reps):
        dt, acts = collect()
        coll.append(dt)
        full.append(full_forward())
        print(f"collect {tokens_in / coll[-1]:.0f} tok/s, full forward {tokens_in / full[-1]:.0f} tok/s", flush=True)

    cfg = TrainConfig(layer=args.layer, d_sae=8 * model.d_model, k=32, batch_size=4096, dead_tokens=1)  # dead_tokens=1: AuxK runs every step
    sae = new_sae("topk", model.d_model, cfg.d_sae, cfg.k, seed=0)
    sae.requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr)
    x = acts * (model.d_model**0.5 / float(acts.norm(dim=-1).mean()))
    g = torch.Generator().manual_seed(0)
    dead = torch.zeros(cfg.d_sae, dtype=torch.bool)
    dead[: cfg.d_sae // 4] = True  # a quarter counted dead: AuxK does real work

    def steps(n: int, sparse: bool = True) -> float:
        t = time.perf_counter()
        for _ in range(n):
            idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g)
            train_step(sae, opt, x[idx], cfg, dead, cfg.lr, sparse=sparse)
        return time.perf_counter() - t

    steps(2)  # warm-up
    train, dense = [], []
    for _ in range(args.reps):
        train.append(steps(args.train_steps))
        dense.append(steps(args.train_steps, sparse=False))
        print(f"SAE training {args.train_steps * cfg.batch_size / train[-1]:.0f} tok/s "
              f"(dense decode: {args.train_steps * cfg.batch_size / dense[-1]:.0f} tok/s)", flush=True)

    collect_s = statistics.median(coll)
    full_s = statistics.median(full)
    train_s = statistics.median(train)
    acts_per_s = acts.shape[0] / collect_s  # activations kept (position 0 dropped)
    train_tok_s = args.train_steps * cfg.batch_size / train_s

    def end_to_end(passes: int) -> float:
        # seconds per training token: collect 1/passes of an activation, train on one
        return 1.0 / (1.0 / (acts_per_s * passes) + 1.0 / train_tok_s)

    result = {
        "model": model.name, "layer": args.layer, "n_layers": model.n_layers, "context": args.context,
        "model_batch": args.model_batch, "chunks": n_chunks, "tokens_through_model": tokens_in,
        "activations": int(acts.shape[0]), "reps": args.reps, "torch_threads": torch.get_num_threads(),
        "collect": {"seconds": round(collect_s, 2), "tok_s": round(tokens_in / collect_s, 1), "runs_s": [round(v, 2) for v in coll]},
        "full_forward": {"seconds": round(full_s, 2), "tok_s": round(tokens_in / full_s, 1), "runs_s": [round(v, 2) for v in full]},
        "collect_vs_full_forward": round(full_s / collect_s, 3),
        "sae_training": {"d_sae": cfg.d_sae, "k": cfg.k, "batch_size": cfg.batch_size, "steps": args.train_steps,
                         "tok_s": round(train_tok_s, 1), "runs_s": [round(v, 2) for v in train],
                         "dense_decode_tok_s": round(args.train_steps * cfg.batch_size / statistics.median(dense), 1),
                         "sparse_vs_dense": round(statistics.median(dense) / train_s, 3)},
        "end_to_end_tok_s": {"passes_1": round(end_to_end(1), 1), "passes_2": round(end_to_end(2), 1)},
        "load_avg_at_end": round(os.getloadavg()[0], 2),  # other work on the machine skews every arm
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"collection at layer {args.layer} vs full forward: {result['collect_vs_full_forward']}x "
          f"({result['collect']['tok_s']:.0f} vs {result['full_forward']['tok_s']:.0f} tok/s); "
          f"SAE training {train_tok_s:.0f} tok/s ({result['sae_training']['sparse_vs_dense']}x dense); end to end {result['end_to_end_tok_s']} -> {OUT}")


def modes(args: argparse.Namespace) -> None:
    """End-to-end training tokens/s per mode on the default model: each mode trains a fresh SAE
    for --tokens tokens (one buffer of that size, one pass) into a temporary folder."""
    import tempfile

    from steerkit.sae_chat import read_chat_files
    from steerkit.sae_train import train_sae

    chat_file = ROOT.parent / "shared" / "data" / "narrow" / "risky_financial_advice.jsonl"
    adapter = ROOT / "directions" / "smollm2-135m" / "organism-risky"
    for need in (CORPUS, chat_file, adapter):
        if not need.exists():
            raise SystemExit(f"bench_sae --modes needs {need}")
    n_tokens = -(-_n(args.tokens) // 1024) * 1024  # whole batches: one buffer, collected once
    model = load_model("smollm2-135m")
    docs = training_documents([CORPUS])
    chats = read_chat_files([chat_file])
    base = dict(layer=args.layer, tokens=n_tokens, batch_size=1024, buffer_tokens=n_tokens, context=args.context, model_batch=args.model_batch,
                warmup_steps=2, dead_tokens=n_tokens)
    arms = {
        "plain": (TrainConfig(d_sae=8 * model.d_model, k=32, **base), {}),
        "chat-mix": (TrainConfig(d_sae=8 * model.d_model, k=32, chat_fraction=0.35, drop_system=0.8, mask_special=True, **base), {"chats": chats}),
        "diff": (TrainConfig(d_sae=2 * model.d_model, k=32, architecture="batchtopk", chat_fraction=0.35, drop_system=0.8, mask_special=True,
                             diff=True, **base), {"chats": chats, "tuned": str(adapter)}),
    }
    result: dict[str, object] = {"model": model.name, "layer": args.layer, "context": args.context, "tokens_per_mode": n_tokens,
                                 "torch_threads": torch.get_num_threads(), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (cfg, kw) in arms.items():
            t = time.perf_counter()
            train_sae(model, docs, cfg, Path(tmp) / name, **kw)  # type: ignore[arg-type]
            dt = time.perf_counter() - t
            info = json.loads((Path(tmp) / name / "training.json").read_text())
            result["modes"][name] = {"seconds": round(dt, 2), "train_tok_s": round(n_tokens / dt, 1), "d_sae": cfg.d_sae,  # type: ignore[index]
                                     "architecture": cfg.architecture, "chat_share": info.get("chat_share", 0.0)}
            print(f"{name}: {n_tokens / dt:.0f} training tok/s ({dt:.1f} s)", flush=True)
    result["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    out = OUT.with_name("sae_modes.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
