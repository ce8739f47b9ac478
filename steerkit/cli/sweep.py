"""`steerkit sweep`: steer over a grid of strengths, judge every answer, and show misalignment
and incoherence per strength with 95% intervals (`steerkit sweep summarize DIR` re-renders)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from steerkit.cli import app
from steerkit.cli.checks import check_sweep_folder, precheck_sweep
from steerkit.cli.common import (
    AnyModelOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    JudgeDtypeOpt,
    LayerOpt,
    ModelOpt,
    SeedOpt,
    emit_json,
    err,
    load_judge_kind,
    out,
    want_json,
)
from steerkit.errors import SteerkitError
from steerkit.prompts import eval_questions

if TYPE_CHECKING:  # the model type only: importing models would load torch
    from steerkit.models import LoadedModel

sweep_app = typer.Typer(
    invoke_without_command=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="Sweep steering strengths, judge the answers, summarize with intervals.",
)
app.add_typer(sweep_app, name="sweep")


@sweep_app.callback()
def sweep_cmd(
    ctx: typer.Context,
    direction: Annotated[Optional[str], typer.Option("--direction", "-d", help="Direction name or file to steer with.", show_default=False)] = None,
    mode: Annotated[str, typer.Option("--mode", help="add, clamp or ablate (ablate compares unsteered with ablated; --strengths is ignored).")] = "add",
    strengths: Annotated[str, typer.Option("--strengths", help="START:STOP:N (both ends included) or a comma list, in units of the layer's median token norm.")] = "-0.6:0.6:9",
    questions: Annotated[Optional[Path], typer.Option("--questions", "-q", help="Question file (emergent-misalignment YAML, JSON Lines or text); default: the shipped EM questions.", show_default=False)] = None,
    ids: Annotated[list[str], typer.Option("--ids", help="Only questions whose id matches this glob. Repeatable.")] = [],
    all_variants: Annotated[bool, typer.Option("--all-variants", help="Keep the _json/_template variants of EM question files (default: plain ones only).")] = False,
    samples: Annotated[int, typer.Option("--samples", "-n", help="Samples per question and strength.")] = 8,
    control: Annotated[str, typer.Option("--control", help="Controls swept beside the direction in the same batches: random[:K] (K random directions of equal norm on the same layer, default 3), latents[:K] (K random latents of the same SAE with matched firing rate; SAE-latent directions), both comma-separated, or none. Each draw gets a row, and the draws of one kind a pooled row.")] = "random",
    judge: Annotated[str, typer.Option("--judge", help="auto (offline if it loads), offline, endpoint (STEERKIT_JUDGE_URL, _MODEL, _KEY) or none.")] = "auto",
    judge_dtype: JudgeDtypeOpt = "float32",
    tuned: Annotated[Optional[str], typer.Option("--tuned", help="Fine-tuned model to sweep (a PEFT adapter folder over --model, or any model spec).", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature (the demo's settings; at 1.0 a third of the default model's unsteered answers are unreadable); 0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (the demo's 0.9).")] = 0.9,
    seed: SeedOpt = 0,
    layer: LayerOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Strengths in absolute residual units instead of median-norm units.")] = False,
    positions: Annotated[str, typer.Option("--positions", help="Steer all positions but the first (all), prompt only, or generated only.")] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows per forward pass (rows of different strengths share it).")] = 32,
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for results.jsonl, sweep.json, summary.csv, sweep.png; a rerun resumes.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Start afresh in an --out folder that holds another sweep.")] = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    any_model: AnyModelOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Sweep a direction's strength over questions x samples; judge; summarize per strength.

    Examples:

      steerkit sweep --direction persona --mode add --strengths -0.6:0.6:9 --questions questions.yaml --samples 8 --control random:3 --out runs/sweep-add/

      steerkit sweep --model smollm2-135m --tuned runs/organism --direction persona --mode ablate --out runs/ablate/

      steerkit sweep summarize runs/sweep-add/
    """
    if ctx.invoked_subcommand is not None:
        return
    from steerkit import sweep as S
    from steerkit.generate import Sampling
    from steerkit.interventions import MODES, POSITIONS

    if direction is None:
        raise SteerkitError("give --direction NAME (see `steerkit directions`), or `steerkit sweep summarize DIR`")
    if mode not in MODES:
        raise SteerkitError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if positions not in POSITIONS:
        raise SteerkitError(f"--positions {positions!r} is not one of {', '.join(POSITIONS)}")
    from steerkit.controls import parse_controls

    control_spec = parse_controls(control)
    if samples < 1:
        raise SteerkitError(f"--samples must be at least 1, got {samples}")
    grid = S.parse_strengths(strengths)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

    precheck_sweep(direction, mode, grid, model, tuned, device, layer, raw, any_model, batch_size, out_dir)  # before any load
    prompts = eval_questions(questions, ids, all_variants)
    judge_obj = load_judge_kind(judge, questions, judge_dtype)
    model_obj, base_name = _load_models(model, tuned, device, dtype)
    d = _direction(direction, model_obj, base_name, any_model or tuned is not None)
    if layer is not None:
        model_obj.hook_name(layer)  # range check with a clear message
    conds = S.make_conditions(d, mode, grid, control_spec, control_seed=seed, raw=raw, layer=layer)  # type: ignore[arg-type]
    extra = {"tuned": tuned, "base_model": base_name}
    if out_dir is None:
        err.print("[yellow]no --out: answers are not kept and a rerun starts again (give --out DIR to keep and resume)[/]")
    result = _run(S, model_obj, conds, prompts, samples, sampling, judge_obj, out_dir, batch_size, positions, force, extra)
    _render(result, json_out, write_files=out_dir is not None)


@sweep_app.command("summarize")
def summarize_cmd(
    folder: Annotated[Path, typer.Argument(help="The --out folder of a sweep.", show_default=False)],
    json_out: JsonOpt = False,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not rewrite sweep.png.")] = False,
) -> None:
    """Re-read results.jsonl and render the summary (table, summary.csv, sweep.png) without generating.

    Example:

      steerkit sweep summarize runs/sweep-add/
    """
    from steerkit.sweep import load_sweep

    check_sweep_folder(folder)
    _render(load_sweep(folder), json_out, write_files=True, png=not no_plot)


# --- pieces -----------------------------------------------------------------------------------


def _load_models(model: Optional[str], tuned: Optional[str], device: Optional[str], dtype: str = "float32") -> tuple[Any, str]:
    """The model to steer and the name its directions are filed under (the base model's)."""
    from steerkit.models import load_model, load_tuned, resolve_spec

    if tuned is None:
        with err.status(f"loading {model or 'smollm2-135m'}..."):
            m = load_model(model, device=device, dtype=dtype)
        return m, m.name
    base_name = resolve_spec(model)[0]
    with err.status(f"loading {tuned} (tuned from {model or 'smollm2-135m'})..."):
        m = load_tuned(tuned, base=model or "smollm2-135m", device=device, dtype=dtype)
    return m, base_name


def _direction(spec: str, model: LoadedModel, base_name: str, any_model: bool) -> Any:
    from steerkit.directions import check_compatible, find_direction, load_direction

    d = load_direction(find_direction(spec, base_name))
    check_compatible(d, model, allow_other_model=any_model)
    return d


def _run(S: Any, model: LoadedModel, conds: list[Any], prompts: list[Any], samples: int, sampling: Any, judge: Any,
         out_dir: Optional[Path], batch_size: int, positions: str, force: bool, extra: dict[str, Any]) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from steerkit.generate import Throughput

    tp = Throughput()
    with Progress(TextColumn("sweeping"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} tok/s"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True) as prog:
        task = prog.add_task("sweep", total=None, rate="-")

        def on_batch(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total, rate=f"{tp.rate:.0f}")

        def on_token(row: Any, t: int, ids: list[int]) -> None:
            tp.add()

        result = S.run_sweep(model, conds, prompts, samples, sampling, judge, out_dir, batch_size=batch_size,
                             positions=positions, force=force, config_extra=extra, on_batch=on_batch, on_token=on_token)
    if result.resumed:
        err.print(f"resumed: {result.resumed} answers were already in {out_dir}, generated {result.generated}")
    return result


def _render(result: Any, json_out: bool, write_files: bool, png: bool = True) -> None:
    from steerkit import report
    from steerkit.sweep import PLOT_PNG, SUMMARY_CSV

    written = []
    if write_files and result.out_dir is not None:
        written.append(report.write_csv(result.rows, result.trends, result.out_dir / SUMMARY_CSV))
        if png and any(r.judged for r in result.rows):
            try:
                written.append(report.plot_png(result.rows, result.out_dir / PLOT_PNG, title=_title(result.config)))
            except SteerkitError as e:
                err.print(f"[yellow]no PNG: {e}[/]")
    if want_json(json_out):
        by = {t.condition: t for t in result.trends}
        for row in result.summary():
            t = by[row["condition"]]
            rec = {**row, "rho": t.rho, "in_coherent_range": row["strength"] in t.coherent_strengths}
            emit_json({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in rec.items()})  # JSON has no NaN
    else:
        _print_table(result)
        out.print(report.text_plot(result.rows), highlight=False, markup=False)
    for p in written:
        err.print(f"wrote {p}")


def _title(config: dict[str, Any]) -> str:
    conds = config.get("conditions") or []
    main = next((c for c in conds if not c.get("control")), None)
    if not main:
        return ""
    who = config.get("tuned") or config.get("model", "")
    return f"{who}: {main['mode']} {main['direction']} at layer {main['layer']}, {config.get('samples')} samples x {len(config.get('questions', []))} questions"


def _print_table(result: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    from steerkit import report

    headers, rows = report.table(result.rows)
    t = Table(title=_title(result.config) or None, title_justify="left")
    for i, h in enumerate(headers):
        t.add_column(h, justify="left" if i == 0 else "right")
    prev = None
    for r, cells in zip(result.rows, rows):
        if prev is not None and r.condition != prev:
            t.add_section()
        prev = r.condition
        t.add_row(*[Text(c) for c in cells], style="dim" if r.control else None)
    out.print(t)
    for line in report.trend_lines(result.trends):
        out.print(Text(line))
