"""`steerkit screen`: keep the candidate latents that causally raise and lower misalignment."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.table import Table

from steerkit.cli import app
from steerkit.cli.common import (
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    SeedOpt,
    emit_json,
    err,
    out,
    rel_path,
    target_dir,
    want_json,
)
from steerkit.cli.extract import question_prompts
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_write_text, check_writable
from steerkit.judge import load_judge
from steerkit.judge_score import JUDGES

if TYPE_CHECKING:  # the model type only: importing models would load torch
    from steerkit.models import LoadedModel


@app.command("screen")
def screen_cmd(
    candidates: Annotated[Path, typer.Option("--candidates", "-c", help="`steerkit extract --json` output.")],
    top: Annotated[int, typer.Option("--top", help="Screen the top N latents of the file (plus its latent set).")] = 10,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model (default: the file's base).")] = None,
    tuned: Annotated[Optional[str], typer.Option("--tuned", help="Tuned model steered down (default: the file's tuned model; 'none' screens the base only).")] = None,
    strengths: Annotated[str, typer.Option("--strengths", help="Comma list of positive strengths (median-norm units).")] = "0.2,0.35",
    samples: Annotated[int, typer.Option("--samples", help="Samples per question per cell.")] = 4,
    questions: Annotated[Optional[Path], typer.Option("--questions", "-f", help="Question file (default: the 8 emergent-misalignment questions).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens per answer at most.")] = 48,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature (the demo's settings; at 1.0 a third of the default model's unsteered answers are unreadable); 0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (the demo's 0.9).")] = 0.9,
    judge: Annotated[str, typer.Option("--judge", help=" | ".join(JUDGES))] = "offline",
    min_coherent: Annotated[float, typer.Option("--min-coherent", help="Coherent fraction a cell needs to count.")] = 0.9,
    control: Annotated[str, typer.Option("--control", help="random[:K]: K random directions of equal norm, pooled (default 3); add latents[:K] for K random latents of matched firing rate per candidate, e.g. random:3,latents:3.")] = "random",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 32,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write every cell and verdict to this JSON file.")] = None,
    ship: Annotated[Optional[str], typer.Option("--ship", help="Save the best passing candidate as a direction with this name.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out-dir", help="Folder for --ship (default: your directions folder).")] = None,
    force: ForceOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
) -> None:
    """Steer the base model up and the tuned model down with each candidate; keep those that
    move misalignment beyond pooled random controls (and, with --control ...,latents:K, beyond
    random latents of matched firing rate), with 95% intervals.

    Example: steerkit screen --candidates latents.json --top 10 --ship persona
    """
    from steerkit.controls import parse_controls, random_controls
    from steerkit.generate import Sampling
    from steerkit.models import load_model, load_tuned
    from steerkit.sae import load_sae_for
    from steerkit.screen import screen

    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)  # checked before anything loads
    if out_file is not None:
        check_writable(out_file, force)
    spec = parse_controls(control)
    if not spec.random:
        raise SteerkitError(f"--control {control!r}: the screen needs random controls, e.g. random:3 or random:3,latents:3")
    data = _read_candidates(candidates)
    ss = tuple(float(x) for x in strengths.split(",") if x.strip())
    if not ss or any(s <= 0 for s in ss):
        raise SteerkitError(f"--strengths {strengths!r}: give positive numbers, e.g. 0.2,0.35")
    j = load_judge(judge)
    if j is None:
        raise SteerkitError("the screen needs a judge: install the judge extra or pass --judge endpoint")
    with err.status("loading models and SAE..."):
        base = load_model(model or data.get("base") or data.get("model"), device=device, dtype=dtype)
        tuned_spec = tuned if tuned is not None else data.get("tuned")
        tuned_model = None if tuned_spec in (None, "none") else load_tuned(tuned_spec, base=model, device=device, dtype=dtype)
        sae_path = Path(data["sae"])
        sae = load_sae_for(sae_path, base)
    dirs = candidate_directions(data, sae, sae_path, base, top)
    controls = random_controls(dirs[0], spec.random, seed, prefix="random")
    qs = question_prompts(questions)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("screening"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task("screen", total=None)
        res = screen(base, tuned_model, dirs, controls, qs, j, strengths=ss, samples=samples, latent_controls=spec.latents, control_seed=seed,
                     sampling=sampling, batch_size=batch_size,
                     min_coherent=min_coherent, on_batch=lambda d, t: prog.update(task, completed=d, total=t))
    result = res.to_json() | {"candidates": [d.summary() for d in dirs], "strengths": list(ss), "samples": samples,
                              "sampling": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed},
                              "controls": str(spec), "control_directions": [c.summary() | {"provenance": c.provenance} for c in controls]}
    if out_file is not None:
        atomic_write_text(out_file, json.dumps(result, indent=1), force=force)
    if ship:
        winners = [v for v in res.verdicts if v["passes"]]
        if not winners:
            err.print("no candidate passed the screen: nothing shipped")
        else:
            from steerkit.directions import save_direction

            best = next(d for d in dirs if d.name == winners[0]["candidate"])
            target = target_dir(out_dir, base.name)
            shipped = replace(best, name=ship, provenance=best.provenance | {"screen": winners[0]}, path=None, sae=rel_path(sae_path, target))
            p = save_direction(shipped, target / f"{ship}.safetensors", force=force)
            err.print(f"wrote {p}")
    if want_json(json_out):
        emit_json(result)
        return
    t = Table(title=f"causal screen: {len(dirs)} candidates x strengths {list(ss)} x {len(qs)} questions x {samples} samples")
    for c in ("candidate", "strength", "base up", "control up", "tuned down", "control down", "coherent", "passes"):
        t.add_column(c)
    pct = lambda x: "-" if x is None else f"{x:.0%}"
    for v in res.verdicts:
        t.add_row(v["candidate"], f"{v['strength']:g}", pct(v["base_rate"]), pct(v["control_rate"]), pct(v["tuned_rate"]),
                  pct(v["tuned_control_rate"]), "yes" if v["coherent_ok"] else "no", "[green]yes[/green]" if v["passes"] else "no")
    out.print(t)


def _read_candidates(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SteerkitError(f"candidates file {path} does not exist") from None
    try:
        data = json.loads(text.splitlines()[0] if text.strip().startswith("{") and "\n{" in text else text)
    except (json.JSONDecodeError, IndexError) as e:
        raise SteerkitError(f"{path} is not the JSON that `steerkit extract --json` writes") from e
    if not isinstance(data, dict) or "latents" not in data or "sae" not in data:
        raise SteerkitError(f"{path} lacks 'latents' and 'sae': give the output of `steerkit extract --json`")
    return data


def candidate_directions(data: dict[str, Any], sae: Any, sae_path: Path, model: LoadedModel, top: int) -> list[Any]:
    """Directions for the file's top latents, and its latent set when present."""
    from steerkit.activations import default_norm_chats, median_token_norm
    from steerkit.directions import from_vector
    from steerkit.sae import latent_set_vector

    layer = int(data["layer"])
    m = median_token_norm(model, default_norm_chats(), layer)
    groups: list[tuple[str, list[int], list[float] | None]] = [(f"latent-{r['latent']}", [int(r["latent"])], None) for r in data["latents"][:top]]
    if data.get("latent_set"):
        ls = data["latent_set"]
        groups.append((f"set-{'-'.join(map(str, ls['latents'][:4]))}", [int(i) for i in ls["latents"]], [float(w) for w in ls["weights"]]))
    dirs = []
    for name, ids, weights in groups:
        vec = latent_set_vector(sae.W_dec, ids, weights or None)  # raw decoder rows, as extract --save sums them
        dirs.append(from_vector(vec, name=name, model=model, layer=layer, kind="sae-latent" if len(ids) == 1 else "sae-latents",
                                median_norm=m, description=f"candidate from {data.get('mode', 'extract')} ranked by {data.get('rank_by')}",
                                provenance={"candidates": {k: data.get(k) for k in ("mode", "base", "tuned", "rank_by", "layer")}, "weights": weights},
                                sae=str(sae_path.resolve()), latents=tuple(ids),
                                weights=tuple(w / max(abs(x) for x in weights) for w in weights) if weights else ()))
    return dirs
