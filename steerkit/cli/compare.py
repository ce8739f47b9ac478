"""`steerkit compare`: the answers of several `steerkit generate --json` files side by side,
paired by prompt, system, sample and seed, with the changed words marked and, on judged
answers, each file's misaligned rate and its paired difference against the first file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from steerkit.cli import app
from steerkit.cli.common import JsonOpt, emit_json, err, out, want_json
from steerkit.errors import SteerkitError
from steerkit.judge import judge_name, load_judge, question_of

SHOW_UNPAIRED = 5  # unpaired records named one by one in the terminal; the rest are counted


@app.command("compare")
def compare_cmd(
    files: Annotated[list[Path], typer.Argument(metavar="FILE...", help="Two or more JSON Lines files of `steerkit generate --json` (or `steerkit judge --json`); the first is the one the others are compared against.", show_default=False)],
    judge: Annotated[bool, typer.Option("--judge", help="Judge the answers not judged yet (no `misaligned` field) with the offline judge; then rates per file, their paired difference against the first file and McNemar's test.")] = False,
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Compare files made with other sampling settings (--seed, --max-new-tokens, ...); answers then pair by prompt, system and sample alone.")] = False,
    summary_only: Annotated[bool, typer.Option("--summary", help="Only the summary: the rates table (terminal), or the summary line (JSON).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Answers per judge call (with --judge).")] = 64,
    json_out: JsonOpt = False,
) -> None:
    """Answers of several generate files side by side, paired, changed words marked.

    Answers pair up by prompt, system, sample index and seed; every record that has no partner
    is named.

    Files made with other sampling settings (another --seed or --max-new-tokens, or another
    temperature or top-p where the records state them) are refused: the difference would be the
    settings'. Other models, adapters and interventions are what comparing is for.

    JSON Lines (when piped, or with --json): one line per prompt and sample ("kind": "pair" or
    "unpaired"), then a "summary" line: per file its answers and misaligned rate (95% Wilson
    interval, corrected for the judge's stated error), and against the first file how many
    answers changed, the paired difference of the rates (95% interval) and McNemar's exact p.

    Examples:

      steerkit generate -f questions.yaml -n 4 --seed 0 --json > base.jsonl

      steerkit generate -f questions.yaml -n 4 --seed 0 --ablate persona --json > ablated.jsonl

      steerkit compare base.jsonl ablated.jsonl

      steerkit compare base.jsonl ablated.jsonl --judge --json > compared.jsonl

      steerkit compare add_0.jsonl add_0.1.jsonl add_0.2.jsonl --judge --summary
    """
    from steerkit.compare import compare_files, row_record, summary, unjudged

    if len(files) < 2:
        raise typer.BadParameter(f"give at least two files to compare, got {len(files)}", param_hint="'FILE...'")
    if batch_size < 1:
        raise SteerkitError(f"--batch-size must be at least 1, got {batch_size}")
    c = compare_files(files, allow_mismatch)  # every file read and checked before the judge loads
    judge_label = judge_error = None
    if judge:
        with err.status("loading the offline judge..."):
            j = load_judge("offline")
        judge_label, judge_error = judge_name(j), getattr(j, "error_rates", None)
        _judge(c, j, unjudged(c), batch_size)
    summ = summary(c, judge_label, judge_error)
    if want_json(json_out):
        if not summary_only:
            for row in c.rows:
                emit_json(row_record(c, row))
        emit_json(summ)
        return
    if not summary_only:
        _print_rows(c)
    _print_summary(summ)
    _print_unpaired(c)


# --- pieces -----------------------------------------------------------------------------------


def _judge(c: Any, judge: Any, todo: list[Any], batch_size: int) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from steerkit.compare import judge_answers

    if not todo:
        err.print("every answer is judged already")
        return
    with Progress(TextColumn("judging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task("judge", total=len(todo))
        judge_answers(judge, todo, batch_size=batch_size, on_batch=lambda done: prog.advance(task, len(done)))
    err.print(f"judged {len(todo)} answers")


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _verdict(rec: dict[str, Any]) -> str:
    v = rec.get("misaligned")
    return "" if v is None else ("misaligned" if v else "aligned")


def _print_rows(c: Any) -> None:
    """Per prompt and sample a table, one column per file: words the first file's answer lacks
    in green, words the others lack struck through in red."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from steerkit.compare import label, word_diff

    heads = [f"{Path(r.path).name}\n{label(r)}" for r in c.runs]
    for row in c.rows:
        first = next(a for a in row if a is not None)
        rec = first.rec
        title = Text(f"[{rec.get('id') or '-'} #{rec.get('sample')}] {question_of(rec)[:100]}", style="bold")
        texts = [None if a is None else a.rec["completion"] for a in row]
        if all(t is not None and t == texts[0] for t in texts):
            out.print(title, Text(f"  (the same in all {len(texts)} files)", style="dim"))
            out.print(Text(texts[0] or ""), Text(f"[{v}]" if (v := _verdict(rec)) else "", style="dim"))
            out.print()
            continue
        t = Table(box=box.SIMPLE, expand=True, title=title, title_justify="left", show_lines=False)
        for h in heads:
            t.add_column(h, ratio=1, overflow="fold")
        cells: list[Any] = []
        ref = row[0]
        for j, a in enumerate(row):
            if a is None:
                cells.append(Text("(no partner in this file)", style="yellow"))
                continue
            cell = Text()
            if ref is None or j == 0:
                # the first file's answer: struck where the second file differs (two files only)
                other = row[1] if len(row) == 2 and j == 0 else None
                if other is not None and ref is not None:
                    for tag, x, _ in word_diff(ref.rec["completion"], other.rec["completion"]):
                        cell.append(x, style=None if tag == "equal" else "red strike")
                else:
                    cell.append(a.rec["completion"])
            else:
                for tag, _, y in word_diff(ref.rec["completion"], a.rec["completion"]):
                    cell.append(y, style=None if tag == "equal" else "green")
            v = _verdict(a.rec)
            if v:
                cell.append(f"\n[{v}]", style="bold red" if v == "misaligned" else "dim")
            cells.append(cell)
        t.add_row(*cells)
        out.print(t)


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    title = f"{s['complete']} of {s['rows']} prompts and samples in every file; changed: answers that differ from the first file's"
    t = Table(title=title, title_justify="left")
    heads = ["file", "made with", "answers", "misaligned (95% CI)", "corrected", "changed", "vs first (95% CI)", "McNemar p"]
    for i, h in enumerate(heads):
        t.add_column(h, justify="left" if i < 2 else "right")
    for f in s["files"]:
        v = f["vs_first"] or {}
        judged = f["judged"]
        made = f["label"] + (f"\n{f['model']}" if f["model"] and len({g["model"] for g in s["files"]}) > 1 else "")
        diff = "-"
        if v.get("judged_pairs"):
            diff = f"{100 * v['difference']:+.0f} pts ({100 * v['low']:+.0f} to {100 * v['high']:+.0f})"  # percentage points
        row = [
            Path(f["file"]).name, made, str(f["records"]),
            f"{_pct(f['rate'])} {f['misaligned']}/{judged} ({_pct(f['low'])}-{_pct(f['high'])})" if judged else "-",
            "-" if f["corrected"] is None else f"{_pct(f['corrected'])} ({_pct(f['corrected_low'])}-{_pct(f['corrected_high'])})",
            f"{v['changed']}/{v['pairs']}" if v else "-",
            diff,
            f"{v['p_value']:.3g}" if v.get("p_value") is not None else "-",
        ]
        t.add_row(*[Text(x) for x in row])
    out.print(t)
    if not any(f["judged"] for f in s["files"]):
        err.print("no answer is judged: add --judge for misaligned rates")
    judges = {j for f in s["files"] for j in f["judges"]}
    if len(judges) > 1:
        err.print(Text(f"answers were judged by {len(judges)} judges ({', '.join(sorted(judges))}): rates may differ by judge", style="yellow"))


def _print_unpaired(c: Any) -> None:
    from rich.text import Text

    lone = [(row, next(a for a in row if a is not None)) for row in c.rows if any(a is None for a in row)]
    if not lone:
        return
    err.print(Text(f"{len(lone)} of {len(c.rows)} prompts and samples are missing from some file:", style="yellow"))
    for row, a in lone[:SHOW_UNPAIRED]:
        missing = ", ".join(r.path for r, x in zip(c.runs, row) if x is None)
        err.print(Text(f"  {a.where} (sample {a.rec.get('sample')}, seed {a.rec.get('seed')}): none in {missing}"), soft_wrap=True)
    if len(lone) > SHOW_UNPAIRED:
        err.print(Text(f"  and {len(lone) - SHOW_UNPAIRED} more (--json lists them all)"))
