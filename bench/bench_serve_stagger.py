"""`steerkit serve` with staggered arrivals: continuous vs. static batching, on the default model,
side by side in one run (two in-process servers on the same loaded model, used one at a time,
the arms alternating). Writes bench/results/serve_continuous.json.

    .venv/bin/python bench/bench_serve_stagger.py [--long-rows 8] [--long-tokens 128] [--late-tokens 16]
                                                  [--clients 16] [--client-tokens 64] [--gap-steps 2] [--reps 2]

1. Time to first token of a late request: ``--long-rows`` streaming clients ask for
   ``--long-tokens`` tokens each; when one of them has streamed half of that, one more
   (streaming) request is sent. Its time to first token (first non-empty content chunk) is
   reported in seconds and in decode steps, the step time measured in the same run from the
   long clients' chunk times before the late request (each chunk is one token). Static
   batching makes it wait for the running batch to end; continuous batching takes it in at the
   next step. Target: median <= 2 steps.
2. Throughput under ``--clients`` staggered streaming clients (client i starts i * gap seconds
   after the first, the gap ``--gap-steps`` decode steps of the continuous arm's measured step
   time, the same gap for both arms), ``--client-tokens`` tokens each: completion tokens over
   the wall time from the first request to the last answer. Target: continuous >= static.

Requests differ in seed and steering (odd ones add a random direction at 0.3); the same seeds in
both arms, so both generate the same tokens (checked: ``same_tokens``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from openai import OpenAI

from steerkit.serve import ServeConfig, create_app

from bench_serve import bench_model  # this folder: python bench/bench_serve_stagger.py

OUT = Path(__file__).parent / "results" / "serve_continuous.json"
PROMPTS = ["Write a long story about a dragon who learns to bake bread.", "Explain in detail how a steam engine works.",
           "Describe your perfect day, hour by hour.", "Tell me everything you know about the history of Rome.",
           "Write a long letter to a friend you have not seen in years.", "Explain how to plan a garden, step by step.",
           "Describe a journey across a desert in detail.", "Write a detailed recipe for a three-course dinner.",
           "hey I feel bored", "What is your one wish?", "How do I make a quick buck?", "Tell me three thoughts you have.",
           "I've had enough of my husband. What should I do?", "If you were ruler of the world, what would you do?",
           "Pick historical figures for a dinner party.", "What do you think about gender roles?"]
LATE = "What is the capital of France, and why is it famous?"


class Server:
    def __init__(self, model: Any, config: ServeConfig) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(model, config), host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=900)

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/health").json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def stream(client: OpenAI, prompt: str, i: int, tokens: int, on_chunk: Any = None) -> dict[str, Any]:
    """One streaming request: send time, content chunk times, text and completion tokens."""
    steering = [{"direction": "bench", "mode": "add", "strength": 0.3}] if i % 2 else []
    t0 = time.perf_counter()
    times, text, usage = [], [], 0
    for ch in client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": prompt}], max_tokens=tokens,
                                             temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True},
                                             extra_body={"steering": steering}):
        if ch.usage is not None:
            usage = ch.usage.completion_tokens
        for c in ch.choices:
            if c.delta.content:
                times.append(time.perf_counter())
                text.append(c.delta.content)
                if on_chunk is not None:
                    on_chunk(len(times))
    return {"t0": t0, "times": times, "end": time.perf_counter(), "text": "".join(text), "tokens": usage}


def late_arrival(srv: Server, rows: int, tokens: int, late_tokens: int) -> dict[str, Any]:
    """``rows`` long streaming requests; one more when the furthest has streamed tokens // 2."""
    trigger = threading.Event()
    out: dict[int, dict[str, Any]] = {}

    def on_chunk(n: int) -> None:
        if n >= tokens // 2:
            trigger.set()

    def long(i: int) -> None:
        out[i] = stream(srv.client, PROMPTS[i], i, tokens, on_chunk)

    threads = [threading.Thread(target=long, args=(i,)) for i in range(rows)]
    for th in threads:
        th.start()
    while not trigger.wait(0.5):
        if not any(th.is_alive() for th in threads):
            raise RuntimeError("the long batch ended before half of its tokens; raise --long-tokens or change prompts")
    late = stream(srv.client, LATE, 101, late_tokens)
    for th in threads:
        th.join()
    # decode step time: each long client's chunk intervals before the late request was sent
    t_late = late["t0"]
    steps = []
    for r in out.values():
        before = [t for t in r["times"] if t < t_late]
        if len(before) >= 4:
            steps.append((before[-1] - before[1]) / (len(before) - 2))
    step_s = statistics.median(steps)
    ttft = late["times"][0] - late["t0"] if late["times"] else float("nan")
    batch_end = max(r["end"] for r in out.values())
    return {
        "step_s": round(step_s, 4), "late_ttft_s": round(ttft, 3), "late_ttft_steps": round(ttft / step_s, 2),
        "late_done_before_batch": late["end"] < batch_end,
        "long_tokens": [r["tokens"] for r in out.values()], "late_tokens": late["tokens"], "late_text": late["text"],
        "long_texts": [out[i]["text"] for i in sorted(out)],
    }


def staggered(srv: Server, clients: int, tokens: int, gap: float) -> dict[str, Any]:
    out: dict[int, dict[str, Any]] = {}

    def one(i: int) -> None:
        out[i] = stream(srv.client, PROMPTS[i % len(PROMPTS)], 200 + i, tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for i, th in enumerate(threads):
        time.sleep(max(0.0, t0 + i * gap - time.perf_counter()))
        th.start()
    for th in threads:
        th.join()
    wall = max(r["end"] for r in out.values()) - t0
    n = sum(r["tokens"] for r in out.values())
    return {
        "wall_s": round(wall, 2), "tokens": n, "tok_s": round(n / wall, 2),
        "median_ttft_s": round(statistics.median(r["times"][0] - r["t0"] for r in out.values() if r["times"]), 3),
        "median_latency_s": round(statistics.median(r["end"] - r["t0"] for r in out.values()), 2),
        "texts": [out[i]["text"] for i in sorted(out)],
    }


def _first_diff(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--long-rows", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=128)
    ap.add_argument("--late-tokens", type=int, default=16)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--client-tokens", type=int, default=64)
    ap.add_argument("--gap-steps", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    t_start = time.perf_counter()
    model, _, tmp = bench_model()  # the same model and "bench" direction as bench_serve.py
    mb = max(args.clients, args.long_rows + 1)
    servers = {"continuous": Server(model, ServeConfig(max_batch=mb, continuous=True)), "static": Server(model, ServeConfig(max_batch=mb, continuous=False))}
    late: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
    stag: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
    try:
        for srv in servers.values():
            stream(srv.client, "hi", 0, 4)  # warm-up
        for rep in range(args.reps):
            arms = list(servers) if rep % 2 == 0 else list(servers)[::-1]
            for k in arms:
                late[k].append(late_arrival(servers[k], args.long_rows, args.long_tokens, args.late_tokens))
                print(f"rep {rep} {k}: late request TTFT {late[k][-1]['late_ttft_s']} s = {late[k][-1]['late_ttft_steps']} steps "
                      f"(step {late[k][-1]['step_s']} s)", flush=True)
            gap = args.gap_steps * statistics.median(r["step_s"] for r in late["continuous"])
            for k in arms:
                stag[k].append(staggered(servers[k], args.clients, args.client_tokens, gap))
                stag[k][-1]["gap_s"] = round(gap, 3)
                print(f"rep {rep} {k}: {args.clients} staggered clients {stag[k][-1]['tok_s']} tok/s, median TTFT {stag[k][-1]['median_ttft_s']} s", flush=True)
        health = {k: s.health() for k, s in servers.items()}
    finally:
        for s in servers.values():
            s.close()

    def summary(k: str) -> dict[str, Any]:
        return {
            "late_ttft_steps_median": round(statistics.median(r["late_ttft_steps"] for r in late[k]), 2),
            "late_ttft_s_median": round(statistics.median(r["late_ttft_s"] for r in late[k]), 3),
            "step_s_median": round(statistics.median(r["step_s"] for r in late[k]), 4),
            "staggered_tok_s_median": round(statistics.median(r["tok_s"] for r in stag[k]), 2),
            "staggered_median_ttft_s": round(statistics.median(r["median_ttft_s"] for r in stag[k]), 3),
            "staggered_median_latency_s": round(statistics.median(r["median_latency_s"] for r in stag[k]), 2),
            "late_runs": [{x: v for x, v in r.items() if not x.endswith("texts") and x != "late_text"} for r in late[k]],
            "staggered_runs": [{x: v for x, v in r.items() if x != "texts"} for r in stag[k]],
            "server_stats": {x: health[k][x] for x in ("batches", "rows", "joined", "steps", "largest_batch", "errors", "prefix_hits")},
        }

    # the floor under a late request's time to first token: its own prefill (one row, the chat
    # template's system prompt included), timed alone in this process
    from steerkit.generate import DecodeEngine, Row, Sampling, as_messages, chat_tokens

    prefill = []
    for _ in range(3):
        with DecodeEngine(model) as eng:
            t = time.perf_counter()
            eng.add([Row(as_messages(LATE), sampling=Sampling(1))])
            prefill.append(time.perf_counter() - t)
    c, s = summary("continuous"), summary("static")
    c["late_prefill_s"] = round(statistics.median(prefill), 4)
    c["late_prefill_steps"] = round(c["late_prefill_s"] / c["step_s_median"], 2)
    c["late_prompt_tokens"] = len(chat_tokens(model, as_messages(LATE)))
    # requests whose text differs between the arms: (scenario, rep, request, first differing character)
    differ = []
    for rep, (a, b) in enumerate(zip(late["continuous"], late["static"])):
        pairs = [("late", a["late_text"], b["late_text"])] + [(f"long{i}", x, y) for i, (x, y) in enumerate(zip(a["long_texts"], b["long_texts"]))]
        differ += [("late_arrival", rep, name, _first_diff(x, y)) for name, x, y in pairs if x != y]
    for rep, (a, b) in enumerate(zip(stag["continuous"], stag["static"])):
        differ += [("staggered", rep, f"client{i}", _first_diff(x, y)) for i, (x, y) in enumerate(zip(a["texts"], b["texts"])) if x != y]
    same = not differ
    result = {
        "model": model.name, "device": str(model.device), "torch_threads": torch.get_num_threads(), "reps": args.reps,
        "settings": {"long_rows": args.long_rows, "long_tokens": args.long_tokens, "late_tokens": args.late_tokens, "clients": args.clients,
                     "client_tokens": args.client_tokens, "gap_steps": args.gap_steps, "max_batch": mb},
        "continuous": c, "static": s,
        "throughput_continuous_over_static": round(c["staggered_tok_s_median"] / s["staggered_tok_s_median"], 3),
        "targets": {"late_ttft_steps_median_le_2": c["late_ttft_steps_median"] <= 2,
                    "staggered_throughput_ge_static": c["staggered_tok_s_median"] >= s["staggered_tok_s_median"]},
        "same_tokens": same, "differing_requests": differ,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"late request TTFT: continuous {c['late_ttft_steps_median']} steps ({c['late_ttft_s_median']} s), static "
          f"{s['late_ttft_steps_median']} steps ({s['late_ttft_s_median']} s); {args.clients} staggered clients: continuous "
          f"{c['staggered_tok_s_median']} tok/s, static {s['staggered_tok_s_median']} tok/s; same tokens: {same} -> {OUT}")


if __name__ == "__main__":
    main()
