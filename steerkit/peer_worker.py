"""Runs inside the peer venv (transformers 4, steering-vectors, repeng): never imports steerkit.

Usage: ``python peer_worker.py task.json answer.json``; :func:`steerkit.peers.run_peer` writes
the task. Tasks: ``sv_train`` (steering-vectors difference of means), ``sv_generate`` (greedy
tokens with a steering-vectors vector added), ``repeng_import`` (repeng's ControlVector.import_gguf),
``bench`` (steered generation tokens/s for steering-vectors and repeng). Token ids come from
steerkit, so both sides see the same prompts.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings

import torch


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM

    # transformers 5 writes rope settings as `rope_parameters`, which transformers 4 ignores
    # (it would silently fall back to rope_theta 10000): translate them back
    cfg = json.load(open(f"{model_dir}/config.json"))
    kw = {}
    rp = cfg.get("rope_parameters")
    if rp and "rope_theta" not in cfg:
        kw["rope_theta"] = rp["rope_theta"]
        if rp.get("rope_type", "default") != "default":
            kw["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager", **kw)
    assert m.config.rope_theta == (rp or cfg).get("rope_theta", m.config.rope_theta)
    return m.eval()


def _tokenizer(model_dir: str):
    """From tokenizer.json: transformers 5 writes a tokenizer_class transformers 4 lacks."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=f"{model_dir}/tokenizer.json")
    if tok.pad_token is None:
        tok.pad_token = tok.convert_ids_to_tokens(0)
    return tok


def _batch(ids_list, pad: int):
    T = max(len(s) for s in ids_list)
    ids = torch.full((len(ids_list), T), pad, dtype=torch.long)
    am = torch.zeros((len(ids_list), T), dtype=torch.long)
    for b, s in enumerate(ids_list):
        ids[b, T - len(s) :] = torch.tensor(s)
        am[b, T - len(s) :] = 1
    return ids, am


def sv_train(t):
    from steering_vectors import train_steering_vector
    from steering_vectors.aggregators import mean_aggregator

    model, tok = _load(t["model_dir"]), _tokenizer(t["model_dir"])
    sv = train_steering_vector(
        model, tok, list(zip(t["positive"], t["negative"])), layers=[t["layer"]],
        read_token_index=t["read_token_index"], aggregator=mean_aggregator(), batch_size=1,
    )
    return {"vector": sv.layer_activations[t["layer"]].float().tolist()}


def _sv(t, scale=1.0):
    from steering_vectors import SteeringVector

    return SteeringVector({t["layer"]: torch.tensor(t["vector"]) * scale}, "decoder_block")


@torch.inference_mode()
def sv_generate(t):
    model = _load(t["model_dir"])
    sv = _sv(t)
    out = []
    for ids in t["prompts"]:
        x = torch.tensor([ids])
        with sv.apply(model, min_token_index=t["min_token_index"]):
            g = model.generate(
                input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=t["max_new_tokens"], do_sample=False,
                use_cache=t["use_cache"], eos_token_id=t["eos"], pad_token_id=t["pad"],
            )
        out.append(g[0, x.shape[1] :].tolist())
    return {"tokens": out}


def repeng_import(t):
    from repeng import ControlVector

    cv = ControlVector.import_gguf(t["path"])
    return {"model_hint": cv.model_type, "directions": {str(k): [float(x) for x in v] for k, v in cv.directions.items()}}


@torch.inference_mode()
def bench(t):
    """tokens/s: steering-vectors and repeng, same vector, prompts, lengths, batch sizes."""
    import numpy as np
    from repeng import ControlModel, ControlVector

    torch.manual_seed(0)
    model = _load(t["model_dir"])
    n_new, pad, reps = t["max_new_tokens"], t["pad"], t["repeats"]

    def gen(m, ids_list):
        ids, am = _batch(ids_list, pad)
        g = m.generate(input_ids=ids, attention_mask=am, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=pad)
        return (g.shape[1] - ids.shape[1]) * g.shape[0]

    def timed(fn):
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            n = fn()
            rates.append(n / (time.perf_counter() - t0))
        return statistics.median(rates)

    res = {}
    vec = torch.tensor(t["vector"])
    for bs in t["batch_sizes"]:
        rows = t["prompts"][:bs]
        sv = _sv(t)

        def run_sv():
            with sv.apply(model, min_token_index=0):
                return gen(model, rows)

        gen(model, rows)  # warm-up
        res[f"steering-vectors/bs{bs}"] = timed(run_sv)
    # sweep: one strength at a time, batch 1
    sweep_prompt = [t["prompts"][0]]

    def sv_sweep():
        n = 0
        for s in t["strengths"]:
            with _sv(t, s).apply(model, min_token_index=0):
                n += gen(model, sweep_prompt)
        return n

    res["steering-vectors/sweep8"] = timed(sv_sweep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = ControlModel(model, [t["layer"]])
        cv = ControlVector(model_type=model.config.model_type, directions={t["layer"]: vec.numpy().astype(np.float32)})
        for bs in t["batch_sizes"]:
            rows = t["prompts"][:bs]

            def run_rp():
                cm.set_control(cv, 1.0)
                return gen(cm, rows)

            gen(cm, rows)
            res[f"repeng/bs{bs}"] = timed(run_rp)

        def rp_sweep():
            n = 0
            for s in t["strengths"]:
                cm.set_control(cv, s)
                n += gen(cm, sweep_prompt)
            return n

        res["repeng/sweep8"] = timed(rp_sweep)
        cm.reset()
    import repeng
    import steering_vectors
    import transformers

    res["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "steering-vectors": getattr(steering_vectors, "__version__", "0.12.2"), "repeng": getattr(repeng, "__version__", "0.4.0")}
    return res


def main() -> None:
    task = json.load(open(sys.argv[1]))
    ans = {"sv_train": sv_train, "sv_generate": sv_generate, "repeng_import": repeng_import, "bench": bench}[task["task"]](task)
    with open(sys.argv[2], "w") as f:
        json.dump(ans, f)


if __name__ == "__main__":
    main()
