"""How the first shipped `persona` (latent 1022, now `persona-1022`) was chosen: diff
`organism-risky` against the base model with the shipped layer-15 SAE, build candidates, run
the causal screen under the offline judge of that time, and write the directions. Issue 13
replaced `persona` with the latent set the evil system prompts switch on, chosen by blind
reading (`bench/evil_screen.sh`); this script keeps the history reproducible.

    .venv/bin/python bench/persona_screen.py [--samples 2] [--write]

Candidates: the top SAE latents by mean-activation increase (prompt tokens of the 8
emergent-misalignment questions; dense latents set aside), the 8 latents whose least-squares
combination best rebuilds the residual difference of means, the residual difference of means
itself (organism minus base), and a contrastive difference of means (steerkit's own evil vs.
caring system prompts). Each is added to the base model (+s) and to the organism (-s) against a
random direction of equal norm; every answer is judged by the offline judge.

With ``--write`` the best SAE-latent candidate (passing the screen if any does) is written as
``directions/smollm2-135m/persona-<latent>.safetensors`` (it was ``persona`` until issue 13),
with ``organism-dom`` and ``evil-dom`` beside it. Figures go to ``bench/results/persona_screen.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from steerkit.activations import default_norm_chats, median_token_norm
from steerkit.contrast import diff_of_means
from steerkit.controls import random_controls
from steerkit.directions import from_vector, save_direction, shipped_root
from steerkit.extract import best_latent_set, diff_models
from steerkit.finetune import load_tuned
from steerkit.generate import Row, Sampling, generate
from steerkit.models import load_model
from steerkit.prompts import default_questions_path, plain_em_questions, read_file
from steerkit.sae import latent_direction, load_sae
from steerkit.screen import screen
from steerkit.judge import load_judge

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "persona_screen.json"
LAYER = 15


def layer_candidates(base, organism, sae, sae_name: str, layer: int, questions, chats, m: float, args, tag: str) -> tuple[list, dict, object]:
    """Candidates on one layer: top latents by prompt-token delta, (with --search) by answer-token
    delta and by cosine, the 8-latent sets, and the organism's difference of means."""
    ex = diff_models(base, organism, sae, layer, chats, rank_by="delta")
    top = [r.latent for r in ex.rows[: args.top]]
    set_ids, set_w, set_cos = best_latent_set(ex.resid_diff, sae, 8)
    cands = [latent_direction(sae, sae_name, [i], base, layer, name=f"latent-{i}{tag}", median_norm=m) for i in top]
    searched: dict = {"prompt_delta": top, "diffing_top": [{"latent": r.latent, "delta": r.delta, "freq_before": r.freq_before,
                                                             "freq_after": r.freq_after} for r in ex.rows[:10]]}
    if args.search:
        # the organism's own answers to the 8 questions, read by both models (answer tokens)
        rows = [Row(q.messages, i, s) for i, q in enumerate(questions) for s in range(args.answer_samples)]
        gen = generate(organism, rows, Sampling(max_new_tokens=64, temperature=1.0, seed=1), batch_size=32)
        ans_chats = [questions[g.row.prompt_index].messages for g in gen]
        ex_a = diff_models(base, organism, sae, layer, ans_chats, answers=[g.text for g in gen], tokens="answer", rank_by="delta")
        ex_c = diff_models(base, organism, sae, layer, chats, rank_by="cosine")
        searched.update(answer_delta=[r.latent for r in ex_a.rows[: args.top]], cosine=[r.latent for r in ex_c.rows[: args.top]])
        extra = [i for i in dict.fromkeys(searched["answer_delta"][:2] + searched["cosine"][:2]) if i not in top]
        cands += [latent_direction(sae, sae_name, [i], base, layer, name=f"latent-{i}{tag}", median_norm=m) for i in extra]
        a_ids, a_w, a_cos = best_latent_set(ex_a.resid_diff, sae, 8)
        wa = (sae.W_dec.detach().float().cpu()[a_ids] * a_w[:, None]).sum(0)
        cands.append(from_vector(wa, name=f"latent-set-answers{tag}", model=base, layer=layer, kind="sae-latents", median_norm=m,
                                 description=f"the 8 SAE latents that best rebuild the residual difference of means on the organism's answers (cosine {a_cos:.2f})",
                                 sae=sae_name, latents=tuple(a_ids), provenance={"weights": [float(x) for x in a_w]}))
        searched.update(latent_set_answers={"latents": a_ids, "cosine": a_cos})
    wvec = (sae.W_dec.detach().float().cpu()[set_ids] * set_w[:, None]).sum(0)
    cands.append(from_vector(wvec, name=f"latent-set{tag}", model=base, layer=layer, kind="sae-latents", median_norm=m,
                             description=f"the 8 SAE latents that best rebuild the organism's residual difference of means (cosine {set_cos:.2f})",
                             sae=sae_name, latents=tuple(set_ids), provenance={"weights": [float(x) for x in set_w]}))
    searched["latent_set"] = {"latents": set_ids, "cosine": set_cos}
    cands.append(from_vector(ex.resid_diff, name=f"organism-dom{tag}", model=base, layer=layer, kind="diff-of-means", median_norm=m,
                             description="residual difference of means, organism minus base, prompt tokens of the 8 EM questions"))
    return cands, searched, ex


def sae_folder(folder: Path, layer: int, roots: list[Path]) -> Path:
    for r in [folder, *roots]:
        if (r / f"sae-l{layer}" / "cfg.json").is_file():
            return r / f"sae-l{layer}"
    raise SystemExit(f"no SAE for layer {layer}: train one (steerkit sae train --layer {layer} ... --out <root>/sae-l{layer}) and pass --sae-root <root>")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--strengths", default="0.25,0.5")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (1.0: a third of unsteered answers unreadable)")
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--layers", default=str(LAYER), help="layers to search, comma-separated; each needs an SAE folder sae-l<L>")
    ap.add_argument("--sae-root", action="append", default=[], type=Path,
                    help="folder holding sae-l<L>/ for layers without a shipped SAE (repeatable)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--no-screen", action="store_true", help="skip the screen: persona = the top latent by normalized delta")
    ap.add_argument("--search", action="store_true", help="also rank on the organism's own answers and by cosine; screen latent sets")
    ap.add_argument("--answer-samples", type=int, default=4)
    ap.add_argument("--out", type=Path, default=OUT, help="figures JSON")
    args = ap.parse_args()
    t0 = time.perf_counter()
    folder = shipped_root() / "smollm2-135m"
    base = load_model("smollm2-135m")
    organism = load_tuned(str(folder / "organism-risky"), base="smollm2-135m")
    judge = load_judge("offline")
    questions = plain_em_questions(read_file(default_questions_path()))
    chats = [q.messages for q in questions]
    layers = [int(x) for x in args.layers.split(",")]
    strengths = tuple(float(x) for x in args.strengths.split(","))
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=0)
    all_cands: dict = {}
    per_layer: dict = {}
    cells: list = []
    verdicts: list = []
    saes: dict = {}
    for layer in layers:
        tag = "" if layers == [LAYER] else f"-l{layer}"
        sae_dir = sae_folder(folder, layer, args.sae_root)
        saes[layer] = sae_dir
        sae = load_sae(sae_dir)
        m = median_token_norm(base, default_norm_chats(), layer)
        cands, searched, ex = layer_candidates(base, organism, sae, f"sae-l{layer}", layer, questions, chats, m, args, tag)
        if args.no_screen:
            if layer != LAYER:
                raise SystemExit("--no-screen works on layer 15 only")
            ex_n = diff_models(base, organism, sae, layer, chats, rank_by="normalized")
            best = ex_n.rows[0]
            chosen = latent_direction(sae, "sae-l15", [best.latent], base, layer, name=f"persona-{best.latent}", median_norm=m,
                                      description=f"SAE latent {best.latent} (layer 15): top latent by normalized delta, organism vs. base; not yet screened")
            chosen = replace(chosen, provenance=chosen.provenance | {"chosen_by": "bench/persona_screen.py --no-screen", "rank_by": "normalized",
                                                                     "delta": best.delta, "freq_base": best.freq_before, "freq_organism": best.freq_after,
                                                                     "passed_screen": None, "sae": "sae-l15", "organism": "organism-risky"})
            if args.write:
                evil = evil_dom(base, m)
                for d in (chosen, next(d for d in cands if d.name == "organism-dom"), evil):
                    print("wrote", save_direction(d, folder / f"{d.name}.safetensors", force=True))
            return
        if layer == LAYER:
            cands.append(evil_dom(base, m))
        controls = random_controls(cands[0], 3, prefix=f"random{tag}")
        res = screen(base, organism, cands, controls, questions, judge, strengths=strengths, samples=args.samples,
                     sampling=sampling, batch_size=32)
        for v in res.verdicts:
            v["layer"] = layer
        cells += res.to_json()["cells"]
        verdicts += res.verdicts
        per_layer[layer] = {"sae": str(sae_dir.relative_to(ROOT)) if sae_dir.is_relative_to(ROOT) else sae_dir.name,
                            "median_norm": m, **searched}
        all_cands.update({d.name: d for d in cands})
        print(f"layer {layer}: {len(cands)} candidates screened ({time.perf_counter() - t0:.0f}s)", flush=True)
    verdicts.sort(key=lambda v: (v["passes"], v["coherent_ok"], v["score"]), reverse=True)
    result = {
        "command": "python bench/persona_screen.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                 if k not in ("write", "no_screen", "search", "sae_root", "out")) + (" --search" if args.search else ""),
        "seconds": round(time.perf_counter() - t0, 1), "judge": getattr(judge, "label", "?"),
        "layers": per_layer, "cells": cells, "verdicts": verdicts,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for v in verdicts:
        print(f"{v['candidate']:>22} s={v['strength']:<5} base {v['base_rate']:.0%} (ctl {v['control_rate']:.0%})  tuned {v['tuned_rate']:.0%} "
              f"(ctl {v['tuned_control_rate']:.0%})  coherent_ok={v['coherent_ok']} passes={v['passes']} score={v['score']:+.2f}")
    if args.write:
        sae_like = [v for v in verdicts if v["candidate"].startswith("latent")]
        best = sae_like[0]
        chosen = all_cands[best["candidate"]]
        layer = best["layer"]
        if not (folder / f"sae-l{layer}").is_dir():
            print(f"note: persona uses {saes[layer]}, which is not shipped: copy it to {folder / f'sae-l{layer}'}")
        persona = replace(chosen, name=f"persona-{chosen.latents[0]}", path=None, provenance=chosen.provenance | {
            "chosen_by": "bench/persona_screen.py", "screen": best, "passed_screen": best["passes"],
            "sae": f"sae-l{layer}", "organism": "organism-risky"},
            description=f"{chosen.description}; best SAE candidate of the causal screen ({'passed' if best['passes'] else 'did not pass'})")
        dom = all_cands.get("organism-dom") or all_cands.get(f"organism-dom-l{LAYER}")  # the shipped comparison stays on layer 15
        for d in (persona, dom and replace(dom, name="organism-dom"), all_cands.get("evil-dom")):
            if d is not None:
                print("wrote", save_direction(d, folder / f"{d.name}.safetensors", force=True))
    print(f"done in {time.perf_counter() - t0:.0f}s; figures in {args.out}")


def evil_dom(base, m: float):
    contrast = json.loads((ROOT / "steerkit" / "data" / "contrast" / "evil.json").read_text())
    pos = [[{"role": "system", "content": p["pos"]}, {"role": "user", "content": q}] for p in contrast["pairs"] for q in contrast["questions"]]
    neg = [[{"role": "system", "content": p["neg"]}, {"role": "user", "content": q}] for p in contrast["pairs"] for q in contrast["questions"]]
    return from_vector(diff_of_means(base, pos, neg, LAYER, read_token_index="mean"), name="evil-dom", model=base, layer=LAYER,
                       kind="diff-of-means", median_norm=m,
                       description="residual difference of means, steerkit's evil vs. caring system prompts (steerkit/data/contrast/evil.json)")


if __name__ == "__main__":
    main()
