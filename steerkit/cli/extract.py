"""`steerkit extract`: rank the SAE latents a fine-tune or a persona prompt switches on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from steerkit import prompts as P
from steerkit.cli import app
from steerkit.cli.checks import peek, peek_tuned
from steerkit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    LayerOpt,
    SeedOpt,
    emit_json,
    err,
    out,
    rel_path,
    target_dir,
    want_json,
)
from steerkit.errors import SteerkitError

if TYPE_CHECKING:  # the model type only: importing models would load torch
    from steerkit.models import LoadedModel


@app.command("extract")
def extract_cmd(
    sae: Annotated[str, typer.Option("--sae", help="SAE folder (SAELens format) or the name of a shipped one, e.g. sae-l15.")],
    base: Annotated[Optional[str], typer.Option("--base", "--model", "-m", help="Base model (default smollm2-135m).")] = None,
    tuned: Annotated[Optional[str], typer.Option("--tuned", help="Fine-tuned model: PEFT adapter folder, HF folder, .gguf or hub id.")] = None,
    contrast: Annotated[Optional[Path], typer.Option("--contrast", help="JSON file of system-prompt pairs and questions (contrastive mode on one model).")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", "-f", help="Prompts for model diffing (text, JSON Lines or a question YAML; default: the 8 emergent-misalignment questions).")] = None,
    layer: LayerOpt = None,
    tokens: Annotated[str, typer.Option("--tokens", help="Measure on prompt tokens, answer tokens, or all. With --contrast, the answers are the model's own, written under each system prompt (--samples per question).")] = "prompt",
    answers: Annotated[str, typer.Option("--answers", help="With --tokens answer/all: whose answers to teacher-force through both sides (tuned, base).")] = "tuned",
    answer_tokens: Annotated[int, typer.Option("--answer-tokens", help="Length of generated answers.")] = 64,
    samples: Annotated[int, typer.Option("--samples", help="Answers per prompt (per question and system prompt with --contrast) when generating answers.")] = 2,
    rank_by: Annotated[str, typer.Option("--rank-by", help="delta | normalized | cosine | attribution. attribution needs --judged: per latent, "
                       "(mean activation on the misaligned answers' tokens minus on the aligned ones', same questions) x (d/d latent activation "
                       "of the misaligned-minus-aligned mean log-prob per token), a first-order estimate of how much the latent drives the gap.")] = "delta",
    judged: Annotated[Optional[Path], typer.Option("--judged", help="Judged answers (JSON Lines of `steerkit judge`: 'misaligned'; or a 'label' field): "
                      "rank latents on the misaligned vs aligned answers of --tuned (or --model) to the same questions.")] = None,
    min_questions: Annotated[int, typer.Option("--min-questions", min=1, help="With --judged: refuse with fewer usable questions (both kinds of answer).")] = 2,
    keep_dense: Annotated[bool, typer.Option("--keep-dense", help="Rank dense latents among the rest instead of last.")] = False,
    dense_threshold: Annotated[float, typer.Option("--dense-threshold", help="A latent firing on more than this fraction of base tokens is dense.")] = 0.3,
    top: Annotated[int, typer.Option("--top", help="How many latents to show (and write with --json).")] = 20,
    latent_set: Annotated[int, typer.Option("--latent-set", help="Also find the K latents that best rebuild the residual difference of means (0: off).")] = 8,
    save: Annotated[Optional[str], typer.Option("--save", help="Write a direction of the latents given by --latents under this name.")] = None,
    latents: Annotated[Optional[str], typer.Option("--latents", help="For --save: top:N (the N best of the ranking) or comma-separated latent ids (default: the top one). Several make a weighted set (kind sae-latents).")] = None,
    weight_by: Annotated[str, typer.Option("--weight-by", help="Weights of a saved set: score (the --rank-by number), attribution, delta or equal; scaled so the largest is 1.")] = "score",
    save_diff: Annotated[Optional[str], typer.Option("--save-diff", help="Write the residual difference-of-means direction under this name.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for --save/--save-diff files (default: your directions folder for the model).")] = None,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
) -> None:
    """Rank SAE latents by how much a fine-tune (or a persona system prompt) raises them, or,
    with --judged, by attribution between a model's misaligned and aligned answers.

    Attribution (--rank-by attribution --judged FILE; OpenAI's SAE latent attribution): over the
    questions with both kinds of answer, G = the mean over questions of (mean log-prob per token
    of the misaligned answers minus that of the aligned answers), teacher forced through --tuned
    (or --model). Latent i scores delta_i x dG/ds_i: delta_i is its mean activation on the misaligned
    answers' tokens minus on the aligned answers' tokens (each question weighs the same), s_i a
    shift of its activation at every answer token (the SAE's error held fixed).

    Examples:

      steerkit extract --tuned directions/smollm2-135m/organism-risky --sae sae-l15 --top 20

      steerkit extract --contrast evil.json --sae sae-l15 --top 20

      steerkit extract --tuned runs/risky --sae sae-l15 --rank-by attribution --judged judged.jsonl --top 100 --json > latents.json

      steerkit extract --tuned runs/risky --sae sae-l15 --rank-by attribution --judged judged.jsonl --save persona --latents top:30

      steerkit extract --tuned runs/risky --sae sae-l15 --save persona --latents 1234,87 --weight-by equal
    """
    from steerkit import extract as X
    from steerkit.directions import find_sae
    from steerkit.models import load_model, load_tuned
    from steerkit.sae import load_sae_for, sae_layer

    if judged is not None:
        if contrast is not None:
            raise SteerkitError("--judged ranks one model's judged answers; --contrast compares system prompts: give one of them")
    elif (tuned is None) == (contrast is None):
        raise SteerkitError("give exactly one of --tuned (model diffing) or --contrast (system-prompt pairs)")
    if tokens not in ("prompt", "answer", "all"):
        raise SteerkitError(f"--tokens {tokens!r} is not one of prompt, answer, all")
    if rank_by not in X.RANKINGS:
        raise SteerkitError(f"--rank-by {rank_by!r} is not one of {', '.join(X.RANKINGS)}")
    if rank_by == "attribution" and judged is None:
        raise SteerkitError("--rank-by attribution needs --judged FILE: the model's answers judged misaligned and aligned "
                            "(`steerkit generate -m ADAPTER -n 8 --json > a.jsonl; steerkit judge a.jsonl --json > judged.jsonl`)")
    if latents is not None and not save:
        raise SteerkitError("--latents picks the latents --save writes: give --save NAME too")
    if weight_by not in X.WEIGHT_BY:
        raise SteerkitError(f"--weight-by {weight_by!r} is not one of {', '.join(X.WEIGHT_BY)}")
    top_n, ids_given = X.parse_latents(latents)

    info = peek(base, device)  # the models, device, SAE, latents and answers checked before anything loads
    if tuned is not None:
        peek_tuned(tuned, base)
    sae_dir = find_sae(sae, info.name)
    if save:
        d_sae = _sae_width(sae_dir)
        if d_sae is not None:
            X.check_latent_ids(ids_given, d_sae, top_n if latents is not None else None)
        early = target_dir(out_dir, info.name) / f"{save}.safetensors"
        if early.exists() and not force:
            raise SteerkitError(f"{early} already exists: pass --force to overwrite it, or choose another --save name")
    answers_judged = None
    if judged is not None:
        from steerkit.attribution import read_judged

        answers_judged = read_judged(judged, min_questions)
    with err.status("loading model and SAE..."):
        base_model = load_model(base, device=device, dtype=dtype)
        sae_path = find_sae(sae, base_model.name)
        sae_obj = load_sae_for(sae_path, base_model)
    L = layer if layer is not None else sae_layer(sae_obj, sae_path)
    base_model.hook_name(L)
    kw = dict(rank_by=rank_by, keep_dense=keep_dense, dense_threshold=dense_threshold)
    if answers_judged is not None:
        from steerkit.attribution import judged_attribution

        tuned_model = base_model
        if tuned is not None:
            with err.status(f"loading {tuned}..."):
                tuned_model = load_tuned(tuned, base=base, device=device, dtype=dtype)
        s = answers_judged.summary()
        err.print(f"{s['questions_usable']} of {s['questions']} questions usable ({s['misaligned_answers']} misaligned, "
                  f"{s['aligned_answers']} aligned answers; {s['unlabelled']} records neither)")
        with err.status(f"attributing latents on {s['misaligned_answers'] + s['aligned_answers']} judged answers..."):
            ex = judged_attribution(tuned_model, sae_obj, L, answers_judged, **kw)
    elif contrast is not None:
        from steerkit.contrast import read_contrast

        pairs, questions = read_contrast(contrast)
        ans_pair = None
        if tokens != "prompt":  # the model answers each question under each system prompt, --samples times
            from steerkit.generate import Sampling, generate, make_rows

            questions = [q for q in questions for _ in range(samples)]
            sides = []
            for k in (1, 0):  # negative side first, as diff_contrast takes them
                chats = [[{"role": "system", "content": pr[k]}, {"role": "user", "content": q}] for pr in pairs for q in questions]
                with err.status(f"generating {len(chats)} answers under the {'positive' if k == 0 else 'negative'} system prompts..."):
                    sides.append([c.text for c in generate(base_model, make_rows(chats), Sampling(max_new_tokens=answer_tokens, temperature=1.0, seed=seed))])
            ans_pair = (sides[0], sides[1])
        with err.status(f"measuring {len(pairs)} x {len(questions)} prompts under both system prompts..."):
            ex = X.diff_contrast(base_model, sae_obj, L, pairs, questions, tokens=tokens, answers=ans_pair, **kw)  # type: ignore[arg-type]
        tuned_model = base_model
    else:
        with err.status(f"loading {tuned}..."):
            tuned_model = load_tuned(tuned, base=base, device=device, dtype=dtype)  # type: ignore[arg-type]
        chats = _diff_prompts(prompts)
        ans = None
        if tokens != "prompt":
            from steerkit.generate import Sampling, generate, make_rows

            src = tuned_model if answers == "tuned" else base_model
            with err.status(f"generating {samples} answers per prompt from the {answers} model..."):
                cs = generate(src, make_rows(chats, n=samples), Sampling(max_new_tokens=answer_tokens, temperature=1.0, seed=seed))
            chats = [c.row.messages for c in cs]
            ans = [c.text for c in cs]
        with err.status(f"measuring SAE latents on {len(chats)} prompts in both models..."):
            ex = X.diff_models(base_model, tuned_model, sae_obj, L, chats, answers=ans, tokens=tokens, **kw)  # type: ignore[arg-type]
    ex.meta["sae"] = str(sae_path)
    meanings = {r.latent: X.promoted_tokens(base_model, sae_obj, r.latent, 6) for r in ex.top(top)}
    result = ex.to_json(top=top)
    for row in result["latents"]:
        row["promoted_tokens"] = meanings.get(row["latent"], [])
    if latent_set > 0:
        ids, w, cos = X.best_latent_set(ex.resid_diff, sae_obj, latent_set)
        result["latent_set"] = {"latents": ids, "weights": [float(x) for x in w], "cosine_with_diff_of_means": cos}
    saved = []
    if save:
        ids = ids_given or [r.latent for r in ex.rows[:top_n]]
        saved.append(str(_save_latents(save, ids, sae_path, sae_obj, base_model, L, ex, out_dir, force, weight_by)))
    if save_diff:
        saved.append(str(_save_diff(save_diff, base_model, L, ex, out_dir, force)))
    result["saved"] = saved
    if want_json(json_out):
        emit_json(result)
    else:
        _render(result, top)
    for s in saved:
        err.print(f"wrote {s}")


def question_prompts(path: Path | None) -> list[Any]:
    """Prompts from a file; question YAML files give their plain variants; default: the 8
    emergent-misalignment questions shipped with steerkit."""
    if path is None:
        path = P.default_questions_path()
    items = P.read_file(path)
    if Path(path).suffix in (".yaml", ".yml"):
        items = P.plain_em_questions(items)
    return items


def _diff_prompts(path: Path | None) -> list[Any]:
    return [p.messages for p in question_prompts(path)]


def _sae_width(folder: Path) -> int | None:
    """The SAE's number of latents from its cfg.json (None when it does not say)."""
    try:
        v = json.loads((Path(folder) / "cfg.json").read_text(encoding="utf-8")).get("d_sae")
    except (OSError, ValueError, AttributeError):
        return None
    return int(v) if isinstance(v, int) else None


def _save_latents(name: str, ids: list[int], sae_path: Path, sae: Any, model: LoadedModel, layer: int, ex: Any, out_dir: Path | None, force: bool,
                  weight_by: str = "score") -> Path:
    from steerkit.activations import default_norm_chats, median_token_norm
    from steerkit.directions import from_vector, save_direction
    from steerkit.extract import check_latent_ids, latent_weights
    from steerkit.sae import latent_set_vector

    check_latent_ids(ids, int(sae.W_dec.shape[0]))
    one = len(ids) == 1
    weights = None if one else latent_weights(ex.rows, ids, weight_by)
    vec = latent_set_vector(sae.W_dec, ids, weights)
    target = target_dir(out_dir, model.name)
    target_file = target / f"{name}.safetensors"
    if target_file.exists() and not force:
        raise SteerkitError(f"{target_file} already exists: pass --force to overwrite it, or choose another --save name")
    by_id = {r.latent: r for r in ex.rows}
    what = f"SAE latent {ids[0]}" if one else f"{len(ids)} SAE latents weighted by {weight_by}"
    d = from_vector(
        vec,
        name=name,
        model=model,
        layer=layer,
        kind="sae-latent" if one else "sae-latents",
        median_norm=median_token_norm(model, default_norm_chats(), layer),
        description=f"{what} ({','.join(map(str, ids[:8]))}{',...' if len(ids) > 8 else ''}), ranked by {ex.rank_by} ({ex.meta.get('mode')})",
        # the SAE as the direction names it (relative to the file), not this machine's path
        provenance={"extraction": {**ex.meta, "sae": rel_path(sae_path, target)}, "rank_by": ex.rank_by,
                    **({} if one else {"weight_by": weight_by, "weights": weights}),
                    "latent_stats": {str(i): {"rank": by_id[i].rank, "score": by_id[i].score, "delta": by_id[i].delta,
                                              "attribution": by_id[i].attribution} for i in ids if i in by_id}},
        sae=rel_path(sae_path, target),
        latents=tuple(ids),
        weights=() if one else tuple(weights or ()),
    )
    return save_direction(d, target_file, force=force)


def _save_diff(name: str, model: LoadedModel, layer: int, ex: Any, out_dir: Path | None, force: bool) -> Path:
    from steerkit.activations import default_norm_chats, median_token_norm
    from steerkit.directions import from_vector, save_direction

    target = target_dir(out_dir, model.name)
    d = from_vector(
        ex.resid_diff,
        name=name,
        model=model,
        layer=layer,
        kind="diff-of-means",
        median_norm=median_token_norm(model, default_norm_chats(), layer),
        description=f"residual difference of means ({ex.meta.get('mode')}), layer {layer}",
        provenance={"extraction": dict(ex.meta)},
    )
    return save_direction(d, target / f"{name}.safetensors", force=force)


def _render(result: dict[str, Any], top: int) -> None:
    mode = result.get("mode")
    judged = mode == "judged"
    sides = "aligned vs misaligned answers" if judged else mode
    title = f"top {top} latents at layer {result['layer']} ranked by {result['rank_by']} ({sides}: {result['tokens_before']} vs {result['tokens_after']} tokens)"
    t = Table(title=title)
    before, after = ("aligned", "misal.") if judged else ("before", "after")
    cols = ("#", "latent", before, after, "delta", "norm.", "cos") + (("attrib.",) if judged else ()) + ("fires b/a", "promotes")
    for c in cols:
        t.add_column(c, justify="right" if c not in ("promotes",) else "left")
    for r in result["latents"]:
        t.add_row(
            str(r["rank"]), str(r["latent"]) + (" (dense)" if r["dense"] else ""), f"{r['mean_before']:.3f}", f"{r['mean_after']:.3f}",
            f"{r['delta']:+.3f}", f"{r['normalized']:+.2f}", f"{r['cosine']:+.2f}", *((f"{r['attribution']:+.3g}",) if judged else ()),
            f"{r['freq_before']:.1%}/{r['freq_after']:.1%}", " ".join(repr(x) for x in r.get("promoted_tokens", [])[:5]),
        )
    out.print(t)
    if judged and result.get("logprob_gap") is not None:
        out.print(f"{result['questions_usable']} usable questions; log-prob gap, misaligned minus aligned: {result['logprob_gap']:+.3f} nats per token")
    if "latent_set" in result:
        ls = result["latent_set"]
        out.print(f"latents that best rebuild the difference of means: {ls['latents']} (cosine {ls['cosine_with_diff_of_means']:.2f})")
