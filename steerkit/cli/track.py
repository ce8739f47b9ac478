"""`steerkit track`: judged misalignment and a direction's activation at every checkpoint of one
or several fine-tuning runs, on one model load (adapters swapped in place)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from steerkit.cli import app
from steerkit.cli.checks import check_batch_size, check_fits, peek
from steerkit.cli.common import (
    AnyModelOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    SeedOpt,
    emit_json,
    err,
    load_judge_kind,
    out,
    want_json,
)
from steerkit.errors import SteerkitError
from steerkit.fsutil import check_writable
from steerkit.judge import check_kind
from steerkit.prompts import eval_questions
from steerkit.track_stats import LEAD_SE


@app.command("track")
def track_cmd(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN...", help="Run folders written by `steerkit finetune --save-every N --out RUN` (or any adapter folders).", show_default=False)],
    direction: Annotated[list[str], typer.Option("--direction", "-d", help="Direction name or file whose activation to measure. Repeatable: every direction is measured on the same answers.", show_default=False)] = [],
    questions: Annotated[Optional[Path], typer.Option("--questions", "-q", help="Question file (emergent-misalignment YAML, JSON Lines or text); default: the shipped EM questions.", show_default=False)] = None,
    ids: Annotated[list[str], typer.Option("--ids", help="Only questions whose id matches this glob. Repeatable.")] = [],
    all_variants: Annotated[bool, typer.Option("--all-variants", help="Keep the _json/_template variants of EM question files (default: plain ones only).")] = False,
    samples: Annotated[int, typer.Option("--samples", "-n", help="Samples per question at every checkpoint (the same seeds at each).")] = 8,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "--max-tokens", help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 1.0,
    seed: SeedOpt = 0,
    judge: Annotated[str, typer.Option("--judge", help="auto (offline if it loads), offline, endpoint (STEERKIT_JUDGE_URL, _MODEL, _KEY) or none.")] = "auto",
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model the adapters are merged into.", show_default="the one the adapters name")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Answers per forward pass.")] = 32,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for answers.jsonl, track.json, points.jsonl, track.png; a rerun resumes (only missing answers are generated).", show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also write the plot here (PNG).", show_default=False)] = None,
    control: Annotated[str, typer.Option("--control", help="Random control directions measured on the same answers: random:K draws per layer (same layer and strength unit as the first direction on it), or none. Each direction's rho is then shown beside the controls' 95% band and the share of controls that track at least as well.")] = "none",
    force: Annotated[bool, typer.Option("--force", help="Overwrite --plot, and start afresh in an --out folder that holds a track with other settings (the same settings always resume).")] = False,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    any_model: AnyModelOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """At each checkpoint of each run: generate answers to the evaluation questions (fixed seeds,
    the same settings everywhere), judge them, and measure each direction's mean activation over
    the answers and over the prompts. Reports the misaligned rate (95% Wilson interval, corrected
    for the judge's error) and the activation per checkpoint, Spearman's rho between them across
    all checkpoints, and per run whether the activation moves before misalignment does.

    The base model loads once; each checkpoint's LoRA adapter is merged into it in place.

    Examples:

      steerkit track runs/mix25/ --direction persona --out runs/track-mix25/ --json

      steerkit track runs/mix*/ --direction persona --samples 8 --out runs/track/ --plot track.png

      steerkit track runs/mix*/ -d persona -d evil-dom --control random:32 --out runs/track/   # add a direction or controls later: only activations are measured
    """
    from steerkit import track as T
    from steerkit.directions import find_direction, load_direction
    from steerkit.generate import Sampling
    from steerkit.sae_formats import detect_format
    from steerkit.track_points import find_all_points

    if not direction:
        raise SteerkitError("give --direction NAME (see `steerkit directions`): the direction whose activation to track")
    if samples < 1:
        raise SteerkitError(f"--samples must be at least 1, got {samples}")
    check_batch_size(batch_size)
    check_kind(judge)
    from steerkit.controls import parse_controls

    ctrl = parse_controls(control)
    if ctrl.latents:
        raise SteerkitError(f"--control {control}: track compares with random directions only (random:K); matched latents are for sweeps")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if out_dir is not None and out_dir.suffix.lower() in (".png", ".svg", ".pdf"):
        raise SteerkitError(f"--out {out_dir} looks like a plot file: --out takes a folder for the answers; give the plot with --plot {out_dir}")
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise SteerkitError(f"--plot {plot}: give a .png file name, e.g. --plot track.png")
        check_writable(plot, force)
    if out_dir is not None:
        T.check_out(out_dir, None, force)
    points = find_all_points(runs, base=model)
    base = model or points[0].base
    info = peek(base, device)
    dirs = []
    for spec in direction:
        d = load_direction(find_direction(spec, info.name))
        check_fits(d, info, any_model)
        sae = d.sae_path() if d.is_sae else None
        if sae is not None and detect_format(sae) is None:
            raise SteerkitError(f"direction {spec!r} names SAE folder {sae}, which holds no SAE (SAELens, sparsify or dictionary_learning files): put the SAE there")
        dirs.append(d)
    if len({d.name for d in dirs}) != len(dirs):
        raise SteerkitError(f"--direction names one direction twice ({', '.join(direction)}): give each once")
    prompts = eval_questions(questions, ids, all_variants)
    if out_dir is not None:  # other settings than the judge's: refused before it loads
        T.check_out(out_dir, T.track_config(info.name, dirs, prompts, samples, sampling, None, ctrl.random), force, ignore=("judge", "judge_error"))
    judge_obj = load_judge_kind(judge, questions)
    config = T.track_config(info.name, dirs, prompts, samples, sampling, judge_obj, ctrl.random)
    if out_dir is not None:
        T.check_out(out_dir, config, force)  # other settings: refused before the model loads
    else:
        err.print("[yellow]no --out: answers are not kept and a rerun starts again (give --out DIR to keep and resume)[/]")
    runs_n = len({p.run for p in points})
    err.print(f"{len(points)} checkpoints in {runs_n} run{'s' if runs_n != 1 else ''}, {len(prompts)} questions x {samples} samples each")

    def load() -> Any:
        from steerkit.models import load_model

        with err.status(f"loading {base}..."):
            return load_model(base, device=device, dtype=dtype)

    result = _run(T, points, dirs, prompts, load, info.name, samples, sampling, judge_obj, out_dir, batch_size, force, any_model, ctrl.random)
    _render(result, json_out, plot, [d.name for d in dirs])


# --- pieces -----------------------------------------------------------------------------------


def _run(T: Any, points: Any, dirs: Any, prompts: Any, load: Any, name: str, samples: int, sampling: Any, judge: Any,
         out_dir: Optional[Path], batch_size: int, force: bool, any_model: bool, controls: int = 0) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from steerkit.generate import Throughput

    tp = Throughput()
    prog = Progress(TextColumn("{task.fields[what]}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} tok/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
    task = prog.add_task("track", total=None, what="tracking", rate="-")
    started = False

    def on_progress(done: int, total: int, point: Any) -> None:
        nonlocal started
        if point is not None and not started:  # after the model load (its spinner is a live display too)
            prog.start()
            started = True
        what = f"{point.label} step {point.step}" if point is not None else "tracking"
        prog.update(task, completed=done, total=total, what=what, rate=f"{tp.rate:.0f}")

    def on_token(row: Any, t: int, ids: list[int]) -> None:
        tp.add()

    try:
        result = T.run_track(points, dirs, prompts, load, samples, sampling, judge, out_dir, model_name=name, batch_size=batch_size,
                             force=force, allow_other_model=any_model, on_progress=on_progress, on_token=on_token,
                             controls=controls)
    finally:
        prog.stop()
    if result.resumed:
        err.print(f"resumed: {result.resumed} answers were already in {out_dir}, generated {result.generated}")
    if result.stale:
        err.print(f"[yellow]{result.stale} answers in {out_dir} belong to checkpoints whose weights have changed since: ignored (regenerated)[/]")
    return result


def _fmt(v: float | None, spec: str = "+.3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def _render(result: Any, json_out: bool, plot: Optional[Path], names: list[str]) -> None:
    from steerkit import track as T

    written = []
    pts = [p.to_json() for p in result.points]
    targets = ([result.out_dir / T.PLOT_PNG] if result.out_dir is not None else []) + ([plot] if plot is not None else [])
    if targets and result.points:
        from steerkit import report

        title = _title(result)
        for path in targets:
            try:
                written.append(report.plot_track_png(pts, path, names, title=title))
            except SteerkitError as e:
                err.print(f"[yellow]no PNG: {e}[/]")
                break
    if want_json(json_out):
        for p in pts:
            emit_json(p)
        emit_json(result.summary())
    else:
        _print_table(result, names)
    for p in written:
        err.print(f"wrote {p}")


def _title(result: Any) -> str:
    c = result.config
    s = c.get("sampling", {})
    return (f"{c.get('model')}: {', '.join(d['name'] for d in c.get('directions', []))}; {c.get('samples')} samples x "
            f"{len(c.get('questions', []))} questions, temperature {s.get('temperature')}, {s.get('max_new_tokens')} tokens")


def _print_table(result: Any, names: list[str]) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(title=_title(result), title_justify="left")
    heads = ["run", "step", "data share", "n", "misaligned", "95% CI", "corrected (95% CI)", "incoherent"]
    for n in names:
        heads += [f"{n} answer (mean ± sd)", f"{n} prompt"]
    for i, h in enumerate(heads):
        t.add_column(h, justify="left" if i == 0 else "right")
    prev = None
    for p in result.points:
        if prev is not None and p.run != prev:
            t.add_section()
        prev = p.run
        row = [
            Path(p.run).name, "-" if p.step is None else str(p.step), "-" if p.fraction is None else f"{p.fraction:.2f}", str(p.n),
            f"{_pct(p.rate)} ({p.misaligned}/{p.judged})" if p.judged else "-",
            f"{_pct(p.low)}-{_pct(p.high)}" if p.judged else "-",
            "-" if math.isnan(p.corrected) else f"{_pct(p.corrected)} ({_pct(p.corrected_low)}-{_pct(p.corrected_high)})",
            _pct(p.incoherent_rate) if p.judged else "-",
        ]
        for n in names:
            a = p.activation[n]
            row += [f"{_fmt(a.answer_mean)} ± {_fmt(a.answer_sd, '.3f')}", _fmt(a.prompt_mean)]
        t.add_row(*[Text(c) for c in row])
    out.print(t)
    for c in result.correlations:
        if c.control:
            continue
        rho = "n/a (fewer than 3 judged checkpoints)" if math.isnan(c.rho) else f"{c.rho:+.2f}"
        band = ""
        if c.controls:
            band = (f"; {c.controls} random controls: 95% of their rho in [{c.control_low:+.2f}, {c.control_high:+.2f}], "
                    f"{c.control_p:.0%} track at least as strongly") if not math.isnan(c.control_p) else f"; {c.controls} random controls: rho n/a"
        out.print(Text(f"{c.direction}: Spearman rho(answer activation, misaligned rate) over {c.points} checkpoints {rho}"
                       + ("" if math.isnan(c.rho_prompt) else f"; prompt activation {c.rho_prompt:+.2f}") + band))
    for x in result.leads:
        run = Path(x.run).name
        if x.first is None and x.activation_step is None and x.misalignment_step is None:
            out.print(Text(f"{run}, {x.direction}: neither moved past step 0 (or the run has no step 0)"))
            continue
        act = "never" if x.activation_step is None else f"step {x.activation_step}"
        mis = "never" if x.misalignment_step is None else f"step {x.misalignment_step}"
        verdict = {"activation": "the activation moves first", "misalignment": "misalignment moves first",
                   "same": "both at the same step"}.get(x.first or "", "")
        out.print(Text(f"{run}, {x.direction}: activation above step 0 by > {LEAD_SE:g} SE at {act}; misaligned rate's interval "
                       f"clears step 0's at {mis}: {verdict}"))
