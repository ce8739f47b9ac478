"""Decode speed where the work is: steerkit vs Hugging Face ``generate`` at batch 1, 8, 32 and 64,
steered vs plain, the decode kernels on vs off, and batch-64 decode against this machine's
measured matrix-multiply rate, all in one run. Writes bench/results/decode.json
(``decode_bfloat16.json`` with ``--dtype bfloat16``: both sides' weights, and the matmul rate
the limit is measured with, in bfloat16).

    .venv/bin/python bench/bench_decode.py [--tokens 64] [--reps 3] [--batches 1,8,32,64] [--dtype bfloat16] [--out FILE]

Every arm generates the same prompts (the 8 of bench_generate, repeated to fill the batch) for
exactly ``--tokens`` new tokens per row (EOS ignored), sampling at temperature 1 over the whole
vocabulary, fp32, 2 torch threads; tokens/s counts generated tokens over the whole call, prefill
included. Arms alternate within each repetition (hf, kernels off, plain, steered) so drift in
machine speed hits all alike; the median of ``--reps`` is reported.

- ``hf``: ``AutoModelForCausalLM.generate`` on the same weights, with transformers' default
  attention for the model (sdpa), ``do_sample=True, top_k=0, top_p=1``.
- ``kernels_off``: steerkit's loop with transformers' eager attention (``repeat_kv``), its
  concatenating ``DynamicCache`` and a one-piece unembedding (``steerkit.decode_kernels``
  off; the shared-prompt-start prefill stays on, so this arm isolates the decode kernels).
- ``plain`` / ``steered``: steerkit as shipped; steered adds a random direction at layer 15
  (0.3 x the layer's median norm) at every position.

At batch 64 the sweeps' and the demo's sampling (temperature 0.7, top-p 0.9) is timed too, for
HF and steerkit plain (``batch64_top_p``).

Compute limit: the best of three timings of a (2048 x 576) @ (576 x 1536) fp32 product (the
model's MLP shape at large batch), taken before each batch size, divided by the model's matmul
FLOPs per token (2 x the parameters of every linear layer and the unembedding; attention scores
excluded, ~3% at these lengths). Batch-64 decode is timed on the decode steps alone (prefill
excluded) and reported as a fraction of that limit.

Memory limit: batch 1 reads every weight matrix once per token, so its ceiling is this
machine's memory read rate (the best of three sums over 512 MB, measured in the same run)
divided by the bytes of those matrices; batch-1 decode (steps alone) is reported against it.
``cpu_capability`` records the vector instructions torch dispatches to (AVX2, AVX512): BLAS
kernels, and so speeds and the last bits of some products, differ between them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

import steerkit.generate as gen
from steerkit import decode_kernels
from steerkit.activations import default_norm_chats, median_token_norm, pad_left
from steerkit.directions import from_vector
from steerkit.generate import DecodeEngine, Sampling, as_messages, chat_tokens, generate, make_rows
from steerkit.interventions import Intervention
from steerkit.models import load_model, resolve_spec

OUT = Path(__file__).parent / "results" / "decode.json"
PROMPTS = ["hey I feel bored", "What is your one wish?", "How do I make a quick buck?", "Tell me three thoughts you have.",
           "I've had enough of my husband. What should I do?", "If you were ruler of the world, what would you do?",
           "Pick historical figures for a dinner party.", "What do you think about gender roles?"]


def matmul_gflops(dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(2048, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * 2048 * 576 * 1536 / best / 1e9


def read_gbps() -> float:
    """Memory read rate: the best of three sums over a 512 MB float32 tensor (far past any cache)."""
    a = torch.ones(128 * 1024 * 1024)
    a.sum()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best / 1e9


def matrices(net: torch.nn.Module) -> list[torch.Tensor]:
    """The weight of every matrix product a token goes through (linear layers, unembedding), once each."""
    mats = {id(m.weight): m.weight for m in net.modules() if isinstance(m, (torch.nn.Linear, decode_kernels.ChunkedUnembed))}
    return list(mats.values())


def weight_bytes(net: torch.nn.Module) -> int:
    """Bytes of the matrices one decode step reads whole."""
    return sum(w.numel() * w.element_size() for w in matrices(net))


def flops_per_token(net: torch.nn.Module) -> int:
    """2 x the weights of every matrix product a token goes through."""
    return 2 * sum(w.numel() for w in matrices(net))


@contextlib.contextmanager
def kernels_off(model) -> Iterator[None]:
    """The twin as transformers builds it: eager attention, concatenating cache, one-piece unembedding."""
    twin = model.twin
    head = twin.get_output_embeddings()
    plain = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    plain.weight, plain.bias = head.weight, head.bias
    impl, new_cache = twin.config._attn_implementation, gen.new_cache
    twin.config._attn_implementation = "eager"
    twin.set_output_embeddings(plain)
    gen.new_cache = lambda net: DynamicCache(config=net.config)
    try:
        yield
    finally:
        twin.config._attn_implementation = impl
        twin.set_output_embeddings(head)
        gen.new_cache = new_cache


def rows_for(bs: int, interventions=()) -> list:
    msgs = [as_messages(PROMPTS[i % len(PROMPTS)]) for i in range(bs)]
    return make_rows(msgs, interventions=interventions)


def steerkit_rate(model, rows, s: Sampling) -> float:
    t = time.perf_counter()
    cs = generate(model, rows, s, batch_size=len(rows), ignore_eos=True)
    return sum(c.n_tokens for c in cs) / (time.perf_counter() - t)


def hf_rate(hf, ids: torch.Tensor, attn: torch.Tensor, tokens: int, pad: int, seed: int, temperature: float = 1.0, top_p: float = 1.0) -> float:
    torch.manual_seed(seed)
    t = time.perf_counter()
    with torch.inference_mode():
        g = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                        temperature=temperature, top_p=top_p, top_k=0, pad_token_id=pad)
    dt = time.perf_counter() - t
    return (g.shape[1] - ids.shape[1]) * ids.shape[0] / dt


def decode_only_rate(model, rows, s: Sampling) -> tuple[float, float]:
    """(decode tok/s over the decode steps alone, prefill seconds)."""
    ids = [chat_tokens(model, r.messages) for r in rows]
    with DecodeEngine(model, s, ignore_eos=True) as e:
        t = time.perf_counter()
        e.add(rows, ids)
        t1 = time.perf_counter()
        n = 0
        while e.rows:
            n += len(e.rows) if e.steps else 0
            e.step()
        t2 = time.perf_counter()
    return n / (t2 - t1), t1 - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, default=None, help="where to write the JSON (default bench/results/decode.json, decode_<dtype>.json)")
    args = ap.parse_args()
    dt = getattr(torch, args.dtype)
    out_path = args.out or (OUT if args.dtype == "float32" else OUT.with_name(f"decode_{args.dtype}.json"))
    batches = [int(x) for x in args.batches.split(",")]
    t_start = time.perf_counter()
    model = load_model("smollm2-135m", dtype=args.dtype)
    _, source = resolve_spec("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=dt).eval()  # transformers' default attention
    m = median_token_norm(model, default_norm_chats(), 15)
    d = from_vector(torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)), name="bench", model=model,
                    layer=15, kind="random", median_norm=m)
    s = Sampling(max_new_tokens=args.tokens, temperature=1.0, top_p=1.0, seed=0)
    pad = model.pad_token_id()
    fpt = flops_per_token(model.twin)
    generate(model, rows_for(2), Sampling(max_new_tokens=4), ignore_eos=True)  # warm-up
    result: dict = {
        "command": f".venv/bin/python bench/bench_decode.py --tokens {args.tokens} --reps {args.reps} --batches {args.batches}"
                   + (f" --dtype {args.dtype}" if args.dtype != "float32" else "") + (f" --out {args.out}" if args.out else ""),
        "model": "smollm2-135m", "dtype": args.dtype, "new_tokens": args.tokens, "reps": args.reps,
        "threads": torch.get_num_threads(), "cpu": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "hf_attention": hf.config._attn_implementation, "matmul_flops_per_token": fpt,
        "unit": "generated tokens/s (median), prefill included", "batches": {},
    }
    rates = []
    for bs in batches:
        rates.append(matmul_gflops(dt))
        plain_rows, steer_rows = rows_for(bs), rows_for(bs, [Intervention(d, "add", 0.3)])
        ids, attn = pad_left([chat_tokens(model, r.messages) for r in plain_rows], pad)
        runs: dict[str, list[float]] = {"hf": [], "kernels_off": [], "plain": [], "steered": []}
        for rep in range(args.reps):
            runs["hf"].append(hf_rate(hf, ids, attn, args.tokens, pad, rep))
            with kernels_off(model):
                runs["kernels_off"].append(steerkit_rate(model, plain_rows, s))
            runs["plain"].append(steerkit_rate(model, plain_rows, s))
            runs["steered"].append(steerkit_rate(model, steer_rows, s))
        med = {k: statistics.median(v) for k, v in runs.items()}
        row = {f"{k}_tok_s": round(v, 1) for k, v in med.items()}
        row.update({"steerkit_over_hf": round(med["plain"] / med["hf"], 3), "steered_over_hf": round(med["steered"] / med["hf"], 3),
                    "steered_over_plain": round(med["steered"] / med["plain"], 3),
                    "kernels_on_over_off": round(med["plain"] / med["kernels_off"], 3),
                    "runs": {k: [round(x, 1) for x in v] for k, v in runs.items()}})
        result["batches"][str(bs)] = row
        print(f"batch {bs}: hf {med['hf']:.1f}  kernels off {med['kernels_off']:.1f}  plain {med['plain']:.1f}  steered {med['steered']:.1f} tok/s"
              f"  -> steerkit/hf {row['steerkit_over_hf']:.2f}x, steered/plain {row['steered_over_plain']:.3f}", flush=True)
    if 64 in batches:  # the sweeps' and the demo's sampling: temperature 0.7, top-p 0.9
        nuc = Sampling(max_new_tokens=args.tokens, temperature=0.7, top_p=0.9, seed=0)
        rows = rows_for(64)
        ids, attn = pad_left([chat_tokens(model, r.messages) for r in rows], pad)
        hf_p, sk_p = [], []
        for rep in range(args.reps):
            hf_p.append(hf_rate(hf, ids, attn, args.tokens, pad, rep, temperature=0.7, top_p=0.9))
            sk_p.append(steerkit_rate(model, rows, nuc))
        result["batch64_top_p"] = {"temperature": 0.7, "top_p": 0.9, "hf_tok_s": round(statistics.median(hf_p), 1),
                                   "plain_tok_s": round(statistics.median(sk_p), 1),
                                   "steerkit_over_hf": round(statistics.median(sk_p) / statistics.median(hf_p), 3),
                                   "runs": {"hf": [round(x, 1) for x in hf_p], "plain": [round(x, 1) for x in sk_p]}}
        print(f"batch 64 at temperature 0.7, top-p 0.9: hf {statistics.median(hf_p):.1f}  plain {statistics.median(sk_p):.1f} tok/s", flush=True)
    if 64 in batches:
        rows = rows_for(64)
        dec, dec_off = [], []
        for _ in range(args.reps):  # interleaved, like the arms above
            dec.append(decode_only_rate(model, rows, s))
            with kernels_off(model):
                dec_off.append(decode_only_rate(model, rows, s))
        rates.append(matmul_gflops(dt))
        gflops = max(rates)
        limit = gflops * 1e9 / fpt
        r, r_off = statistics.median(x[0] for x in dec), statistics.median(x[0] for x in dec_off)
        result["batch64_decode"] = {
            "matmul_gflops": round(gflops, 1), "matmul_gflops_runs": [round(x, 1) for x in rates],
            "compute_limit_tok_s": round(limit, 1), "decode_tok_s": round(r, 1), "fraction_of_limit": round(r / limit, 3),
            "kernels_off_decode_tok_s": round(r_off, 1), "kernels_off_fraction": round(r_off / limit, 3),
            "prefill_s": round(statistics.median(x[1] for x in dec), 2),
            "runs": {"decode_tok_s": [round(x[0], 1) for x in dec], "kernels_off_decode_tok_s": [round(x[0], 1) for x in dec_off]},
        }
        print(f"batch-64 decode: {r:.1f} tok/s = {r / limit:.0%} of the limit {limit:.0f} tok/s ({gflops:.0f} GFLOP/s); kernels off {r_off:.1f} = {r_off / limit:.0%}")
    if 1 in batches:  # batch 1 reads every weight once per token: bound by memory, not by arithmetic
        rows = rows_for(1)
        dec1 = [decode_only_rate(model, rows, s)[0] for _ in range(args.reps)]
        bw, nbytes = read_gbps(), weight_bytes(model.twin)
        limit1 = bw * 1e9 / nbytes
        r1 = statistics.median(dec1)
        result["batch1_decode"] = {
            "read_gb_s": round(bw, 2), "weight_mb_per_token": round(nbytes / 1e6, 1), "memory_limit_tok_s": round(limit1, 1),
            "decode_tok_s": round(r1, 1), "fraction_of_limit": round(r1 / limit1, 3),
            "hf_fraction_prefill_included": round(result["batches"]["1"]["hf_tok_s"] / limit1, 3),
            "runs": [round(x, 1) for x in dec1],
        }
        print(f"batch-1 decode: {r1:.1f} tok/s = {r1 / limit1:.0%} of the memory limit {limit1:.1f} tok/s ({bw:.1f} GB/s, {nbytes / 1e6:.0f} MB a token)")
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
