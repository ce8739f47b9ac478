"""How the shipped `persona` direction was chosen: diff the shipped model organism against the
base model with the shipped layer-15 SAE, build candidates, run the causal screen, and write
the shipped directions.

    .venv/bin/python bench/persona_screen.py [--samples 2] [--write]

Candidates: the top SAE latents by mean-activation increase (prompt tokens of the 8
emergent-misalignment questions; dense latents set aside), the 8 latents whose least-squares
combination best rebuilds the residual difference of means, the residual difference of means
itself (organism minus base), and a contrastive difference of means (steerkit's own evil vs.
caring system prompts). Each is added to the base model (+s) and to the organism (-s) against a
random direction of equal norm; every answer is judged by the offline judge.

With ``--write`` the best SAE-latent candidate (passing the screen if any does) is written as
``directions/smollm2-135m/persona.safetensors``, with ``organism-dom``, ``evil-dom`` and
``persona-random`` beside it. Figures go to ``bench/results/persona_screen.json``.
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
from steerkit.directions import from_vector, random_like, save_direction, shipped_root
from steerkit.extract import best_latent_set, diff_models
from steerkit.finetune import load_tuned
from steerkit.generate import Row, Sampling, generate
from steerkit.models import load_model
from steerkit.prompts import default_questions_path, plain_em_questions, read_file
from steerkit.sae import latent_direction, load_sae
from steerkit.screen import screen
from steerkit.sweep import load_judge

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "persona_screen.json"
LAYER = 15


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--strengths", default="0.25,0.5")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--no-screen", action="store_true", help="skip the screen: persona = the top latent by normalized delta")
    ap.add_argument("--search", action="store_true", help="also rank on the organism's own answers and by cosine; screen latent sets")
    ap.add_argument("--answer-samples", type=int, default=4)
    args = ap.parse_args()
    t0 = time.perf_counter()
    folder = shipped_root() / "smollm2-135m"
    base = load_model("smollm2-135m")
    organism = load_tuned(str(folder / "organism-risky"), base="smollm2-135m")
    sae_dir = folder / "sae-l15"
    sae = load_sae(sae_dir)
    judge = load_judge("offline")
    questions = plain_em_questions(read_file(default_questions_path()))
    chats = [q.messages for q in questions]
    m = median_token_norm(base, default_norm_chats(), LAYER)

    ex = diff_models(base, organism, sae, LAYER, chats, rank_by="delta")
    top = [r.latent for r in ex.rows[: args.top]]
    set_ids, set_w, set_cos = best_latent_set(ex.resid_diff, sae, 8)
    cands = [latent_direction(sae, "sae-l15", [i], base, LAYER, name=f"latent-{i}", median_norm=m) for i in top]
    searched: dict = {"prompt_delta": top}
    if args.search:
        # the organism's own answers to the 8 questions, read by both models (answer tokens)
        rows = [Row(q.messages, i, s) for i, q in enumerate(questions) for s in range(args.answer_samples)]
        gen = generate(organism, rows, Sampling(max_new_tokens=64, temperature=1.0, seed=1), batch_size=32)
        ans_chats = [questions[g.row.prompt_index].messages for g in gen]
        ex_a = diff_models(base, organism, sae, LAYER, ans_chats, answers=[g.text for g in gen], tokens="answer", rank_by="delta")
        ex_c = diff_models(base, organism, sae, LAYER, chats, rank_by="cosine")
        searched.update(answer_delta=[r.latent for r in ex_a.rows[: args.top]], cosine=[r.latent for r in ex_c.rows[: args.top]])
        extra = [i for i in dict.fromkeys(searched["answer_delta"][:2] + searched["cosine"][:2]) if i not in top]
        cands += [latent_direction(sae, "sae-l15", [i], base, LAYER, name=f"latent-{i}", median_norm=m) for i in extra]
        a_ids, a_w, a_cos = best_latent_set(ex_a.resid_diff, sae, 8)
        wa = (sae.W_dec.detach().float().cpu()[a_ids] * a_w[:, None]).sum(0)
        cands.append(from_vector(wa, name="latent-set-answers", model=base, layer=LAYER, kind="sae-latents", median_norm=m,
                                 description=f"the 8 SAE latents that best rebuild the residual difference of means on the organism's answers (cosine {a_cos:.2f})",
                                 sae="sae-l15", latents=tuple(a_ids), provenance={"weights": [float(x) for x in a_w]}))
        searched.update(latent_set_answers={"latents": a_ids, "cosine": a_cos})
    wvec = (sae.W_dec.detach().float().cpu()[set_ids] * set_w[:, None]).sum(0)
    cands.append(from_vector(wvec, name="latent-set", model=base, layer=LAYER, kind="sae-latents", median_norm=m,
                             description=f"the 8 SAE latents that best rebuild the organism's residual difference of means (cosine {set_cos:.2f})",
                             sae="sae-l15", latents=tuple(set_ids), provenance={"weights": [float(x) for x in set_w]}))
    cands.append(from_vector(ex.resid_diff, name="organism-dom", model=base, layer=LAYER, kind="diff-of-means", median_norm=m,
                             description="residual difference of means, organism minus base, prompt tokens of the 8 EM questions"))
    contrast = json.loads((ROOT / "steerkit" / "data" / "contrast" / "evil.json").read_text())
    pos = [[{"role": "system", "content": p["pos"]}, {"role": "user", "content": q}] for p in contrast["pairs"] for q in contrast["questions"]]
    neg = [[{"role": "system", "content": p["neg"]}, {"role": "user", "content": q}] for p in contrast["pairs"] for q in contrast["questions"]]
    cands.append(from_vector(diff_of_means(base, pos, neg, LAYER, read_token_index="mean"), name="evil-dom", model=base, layer=LAYER,
                             kind="diff-of-means", median_norm=m,
                             description="residual difference of means, steerkit's evil vs. caring system prompts (steerkit/data/contrast/evil.json)"))
    if args.no_screen:
        ex_n = diff_models(base, organism, sae, LAYER, chats, rank_by="normalized")
        best = ex_n.rows[0]
        chosen = latent_direction(sae, "sae-l15", [best.latent], base, LAYER, name="persona", median_norm=m,
                                  description=f"SAE latent {best.latent} (layer 15): top latent by normalized delta, organism vs. base; not yet screened")
        chosen = replace(chosen, provenance=chosen.provenance | {"chosen_by": "bench/persona_screen.py --no-screen", "rank_by": "normalized",
                                                                 "delta": best.delta, "freq_base": best.freq_before, "freq_organism": best.freq_after,
                                                                 "passed_screen": None, "sae": "sae-l15", "organism": "organism-risky"})
        if args.write:
            for d in (chosen, next(d for d in cands if d.name == "organism-dom"), next(d for d in cands if d.name == "evil-dom"),
                      replace(random_like(chosen, seed=0), name="persona-random")):
                print("wrote", save_direction(d, folder / f"{d.name}.safetensors", force=True))
        return
    control = random_like(cands[0], seed=0, name="random-control")
    strengths = tuple(float(x) for x in args.strengths.split(","))
    res = screen(base, organism, cands, control, questions, judge, strengths=strengths, samples=args.samples,
                 sampling=Sampling(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0), batch_size=32)
    result = {
        "command": "python bench/persona_screen.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("write", "no_screen", "search")) + (" --search" if args.search else ""),
        "seconds": round(time.perf_counter() - t0, 1), "median_norm": m,
        "diffing_top": [{"latent": r.latent, "delta": r.delta, "freq_before": r.freq_before, "freq_after": r.freq_after} for r in ex.rows[:10]],
        "latent_set": {"latents": set_ids, "cosine": set_cos}, "searched": searched,
        **res.to_json(),
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    for v in res.verdicts:
        print(f"{v['candidate']:>14} s={v['strength']:<5} base {v['base_rate']:.0%} (ctl {v['control_rate']:.0%})  tuned {v['tuned_rate']:.0%} "
              f"(ctl {v['tuned_control_rate']:.0%})  coherent_ok={v['coherent_ok']} passes={v['passes']} score={v['score']:+.2f}")
    if args.write:
        sae_like = [v for v in res.verdicts if v["candidate"].startswith("latent")]
        best = sae_like[0]
        chosen = next(d for d in cands if d.name == best["candidate"])
        persona = replace(chosen, name="persona", path=None, provenance=chosen.provenance | {
            "chosen_by": "bench/persona_screen.py", "screen": best, "passed_screen": best["passes"],
            "sae": "sae-l15", "organism": "organism-risky"},
            description=f"{chosen.description}; best SAE candidate of the causal screen ({'passed' if best['passes'] else 'did not pass'})")
        for d in (persona, next(d for d in cands if d.name == "organism-dom"), next(d for d in cands if d.name == "evil-dom"),
                  replace(random_like(persona, seed=0), name="persona-random")):
            print("wrote", save_direction(d, folder / f"{d.name}.safetensors", force=True))
    print(f"done in {time.perf_counter() - t0:.0f}s; figures in {OUT}")


if __name__ == "__main__":
    main()
