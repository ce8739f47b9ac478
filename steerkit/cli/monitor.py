"""`steerkit monitor` (a direction's activation per answer and per token, beside the judge's
verdict) and `steerkit audit` (training examples ranked by how far their answers move it)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from steerkit.cli import app
from steerkit.cli.checks import check_batch_size, check_fits, peek, peek_tuned
from steerkit.cli.common import (
    AnyModelOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelOpt,
    SeedOpt,
    emit_json,
    err,
    out,
    want_json,
)
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_write_text, check_writable, read_stdin_text

DirectionOpt = Annotated[Optional[str], typer.Option("--direction", "-d", help="Direction name or .safetensors file to measure (see `steerkit directions`).", show_default=False)]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Chats per forward pass.")]


# --- reading records ---------------------------------------------------------------------------


def read_input(path: Optional[Path], what: str) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """(where, [(line number, JSON object)]) of a JSON Lines file, or stdin for None / '-'."""
    from steerkit.monitor import read_lines

    if path is None or str(path) == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise SteerkitError(f"no {what}: give a JSON Lines file or pipe one in")

        return "<stdin>", read_lines("<stdin>", what, read_stdin_text())
    p = path.expanduser()
    return str(p), read_lines(p, what)


# --- the direction, checked before the model loads ----------------------------------------------


def precheck_direction(spec: str, info: Any, any_model: bool, lookup_name: str | None = None) -> Any:
    """Find and read a direction and check it against the model's config (a ModelInfo) and its
    SAE folder, before loading the model."""
    from steerkit.directions import find_direction, load_direction
    from steerkit.sae_formats import detect_format

    d = load_direction(find_direction(spec, lookup_name or info.name))
    check_fits(d, info, any_model)
    sae = d.sae_path() if d.is_sae else None
    if sae is not None and detect_format(sae) is None:
        raise SteerkitError(f"direction {d.name!r} names SAE folder {sae}, which holds no SAE (SAELens, sparsify or dictionary_learning files): put the SAE there")
    return d


def _prepare(model: Optional[str], tuned: Optional[str], device: Optional[str], direction: str, any_model: bool,
             batch_size: int, dtype: str = "float32") -> tuple[Any, Any]:
    """Checks, then the model (a tuned one named after its base) and the direction."""
    from steerkit.directions import check_compatible

    check_batch_size(batch_size)
    if tuned is None:
        d = precheck_direction(direction, peek(model, device), any_model)
    else:
        d = precheck_direction(direction, peek_tuned(tuned, model or "smollm2-135m", device), True, lookup_name=peek(model).name)
    if tuned is None:
        from steerkit.models import load_model

        with err.status(f"loading {model or 'smollm2-135m'}..."):
            m = load_model(model, device=device, dtype=dtype)
    else:
        from steerkit.models import load_tuned

        with err.status(f"loading {tuned} (tuned from {model or 'smollm2-135m'})..."):
            m = load_tuned(tuned, base=model or "smollm2-135m", device=device, dtype=dtype)
    check_compatible(d, m, allow_other_model=any_model or tuned is not None)
    return m, d


# --- terminal display ------------------------------------------------------------------------------


def activation_strip(act: Any, scale: float, answer_only: bool = True) -> Any:
    """A rich Text of the chat's tokens (the answer's, by default), each on a background whose
    colour and depth show its activation: red above zero, blue below, full at ``scale``."""
    from rich.style import Style
    from rich.text import Text

    t = Text()
    lo = act.answer_start if answer_only else 1
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0
    for piece, v in zip(act.tokens[lo:], act.values[lo:]):
        shown = piece.replace("\n", "\u21b5")
        if math.isnan(v):
            t.append(shown)
            continue
        a = max(-1.0, min(1.0, v / scale))
        fade = int(round(255 * (1 - abs(a))))
        bg = f"rgb(255,{fade},{fade})" if a >= 0 else f"rgb({fade},{fade},255)"
        t.append(shown, style=Style(color="black", bgcolor=bg))
    return t


def strip_scale(acts: list[Any]) -> float:
    """The largest |activation| over the answers' tokens: one colour scale for a whole run."""
    vals = [abs(v) for a in acts for v in a.values[max(a.answer_start, 1):] if not math.isnan(v)]
    return max(vals) if vals else 1.0


def print_strip(act: Any, scale: float, title: str | None = None) -> None:
    from rich.text import Text

    if title:
        out.print(Text(title, style="bold"))
    out.print(activation_strip(act, scale))


def _fmt(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"


def _need_direction(direction: Optional[str], cmd: str) -> str:
    if not direction:
        raise SteerkitError(f"give --direction NAME or a .safetensors file (see `steerkit directions`), e.g. steerkit {cmd} FILE --direction persona")
    return direction


# --- steerkit monitor ----------------------------------------------------------------------------


@app.command("monitor")
def monitor_cmd(
    answers: Annotated[Optional[Path], typer.Argument(help="JSON Lines: records of `steerkit generate --json`, `steerkit sweep` or `steerkit judge --json`, or chats {\"messages\": [..., assistant]} ('-' or nothing: stdin).", show_default=False)] = None,
    direction: DirectionOpt = None,
    model: ModelOpt = None,
    tuned: Annotated[Optional[str], typer.Option("--tuned", help="Measure on a fine-tuned model (a PEFT adapter folder over --model, or any model spec); directions are the base's.", show_default=False)] = None,
    per_token: Annotated[bool, typer.Option("--per-token", help="Also each token's activation: a coloured strip in the terminal, tokens and values in JSON.")] = False,
    judged: Annotated[bool, typer.Option("--judged", help="Require the judge's verdict ('misaligned', from `steerkit judge --json`) on the records, for the ROC AUC.")] = False,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    any_model: AnyModelOpt = False,
    json_out: JsonOpt = False,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the JSON Lines records and summary to this file (atomic; see --force).")] = None,
    force: ForceOpt = False,
) -> None:
    """A direction's activation on each answer (mean over its tokens, and over the prompt's),
    and per token with --per-token. Where records carry the judge's verdict, the ROC AUC of the
    answer's activation for misaligned answers against the rest. The model is only read, never
    steered: activations are measured on the chats as written.

    For an SAE direction the activation is its latents' (summed); for a vector direction the
    projection onto it in units of the layer's median token norm. JSON Lines: the input records
    plus a `monitor` field, then one line with "summary": true.

    Examples:

      steerkit monitor answers.jsonl --direction persona

      steerkit judge answers.jsonl --json | steerkit monitor --direction persona --judged --json > monitored.jsonl

      steerkit monitor answers.jsonl --direction persona --tuned runs/organism --per-token
    """
    from steerkit import monitor as M

    direction = _need_direction(direction, "monitor")
    if out_file is not None:
        check_writable(out_file, force)
    where, lines = read_input(answers, "answers")
    chats = [M.record_chat(rec, f"{where}:{n}") for n, rec in lines]
    recs = [rec for _, rec in lines]
    if judged:
        M.check_verdicts(recs, where)
    m, d = _prepare(model, tuned, device, direction, any_model, batch_size, dtype)
    with _bar("measuring", len(chats), disable=len(chats) <= batch_size) as advance:
        res = M.monitor_answers(m, d, recs, chats, per_token=per_token, batch_size=batch_size,
                                allow_other_model=any_model or tuned is not None, progress=advance)
    if want_json(json_out):
        for r in res.records:
            emit_json(r)
        emit_json(res.summary)
    else:
        _monitor_table(chats, res)
        if per_token:
            scale = strip_scale(res.activations)
            out.print(f"per token (red above zero, blue below; full colour at {scale:.3g}):")
            for i, (chat, a) in enumerate(zip(chats, res.activations)):
                print_strip(a, scale, f"[{i}] {' '.join(str(chat[-2]['content']).split())[:70]}")
        out.print(_summary_line(res.summary))
    if out_file is not None:
        _write_jsonl(out_file, [*res.records, res.summary], force)
        err.print(f"wrote {len(res.records)} records and the summary to {out_file}")


@contextlib.contextmanager
def _bar(what: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; yields ``advance(n)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True,
                  disable=disable) as prog:
        task = prog.add_task(what, total=total)
        yield lambda n: prog.advance(task, n)


def _write_jsonl(path: Path, records: list[dict[str, Any]], force: bool) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), force=force)


def _monitor_table(chats: list[list[dict[str, str]]], res: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(show_lines=False)
    for c, j in (("#", "right"), ("question", "left"), ("answer", "left"), ("answer act", "right"), ("prompt act", "right"), ("misaligned", "left")):
        t.add_column(c, justify=j, overflow="fold")  # type: ignore[arg-type]
    for i, (chat, r, v) in enumerate(zip(chats, res.records, res.verdicts)):
        q = " ".join(chat[-2]["content"].split())[:40] if len(chat) > 1 else ""
        a = " ".join(chat[-1]["content"].split())[:60]
        mon = r["monitor"]
        t.add_row(str(i), Text(q), Text(a), _fmt(mon["answer_mean"]), _fmt(mon["prompt_mean"]), "-" if v is None else ("yes" if v else "no"))
    out.print(t)


def _summary_line(s: dict[str, Any]) -> str:
    head = f"{s['direction']} (layer {s['layer']}) on {s['answers']} answers: mean answer activation {_fmt(s['answer_mean'])}"
    if not s["judged"]:
        return head + "; no judge verdicts (run `steerkit judge --json` first for the ROC AUC)"
    if s["auc"] is None:
        return head + f"; {s['misaligned']}/{s['judged']} judged misaligned: ROC AUC needs both misaligned and other answers"
    return (head + f"; misaligned vs the rest: ROC AUC {s['auc']:.3f} ({s['misaligned']}/{s['judged']} misaligned, "
            f"mean {_fmt(s['mean_misaligned'])} vs {_fmt(s['mean_rest'])})")


# --- steerkit audit --------------------------------------------------------------------------------

POSITIVE_LABELS = "misaligned,risky,harmful,evil,bad,insecure,positive,true,yes,1"


@app.command("audit")
def audit_cmd(
    data: Annotated[Optional[Path], typer.Argument(help="Training data: chat JSON Lines {\"messages\": [..., assistant]} (or prompt + completion records); '-' or nothing: stdin.", show_default=False)] = None,
    direction: DirectionOpt = None,
    model: ModelOpt = None,
    top: Annotated[int, typer.Option("--top", "-k", help="Examples to show (and to write as JSON); 0: all.")] = 20,
    label_field: Annotated[str, typer.Option("--label-field", help="Field holding each row's class, for the ROC AUC (a boolean, or a string: see --positive).")] = "label",
    positive: Annotated[str, typer.Option("--positive", help="Comma-separated label values that count as the positive (risky) class.")] = POSITIVE_LABELS,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="Rank by the answer's activation alone: no generation, cheaper, but blind to what the model says anyway.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Length of the model's own answer (the baseline).")] = 96,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Temperature of the model's own answer; 0 is greedy.")] = 0.0,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    any_model: AnyModelOpt = False,
    json_out: JsonOpt = False,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write every ranked example and the summary as JSON Lines here (atomic; see --force).")] = None,
    force: ForceOpt = False,
) -> None:
    """Rank training examples, before any training, by how far their answers move a direction.

    Each example's score is the projection difference: the direction's mean activation over its
    assistant answer minus that over the model's own (greedy) answer to the same prompt. High
    scores are examples that would teach the model to move along the direction. Where rows carry
    a label (--label-field), the ROC AUC of the score for the positive class.

    Examples:

      steerkit audit data.jsonl --direction persona --top 20

      steerkit audit mixed.jsonl --direction persona --label-field label --json > ranked.jsonl

      steerkit audit data.jsonl --direction persona --no-baseline
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from steerkit import audit as A
    from steerkit.generate import Sampling
    from steerkit.monitor import record_chat

    direction = _need_direction(direction, "audit")
    if top < 0:
        raise SteerkitError(f"--top must be 0 (all) or more, got {top}")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, seed=seed)
    if out_file is not None:
        check_writable(out_file, force)
    pos = A.positive_labels(positive)
    where, lines = read_input(data, "training data")
    chats = [record_chat(rec, f"{where}:{n}") for n, rec in lines]
    m, d = _prepare(model, None, device, direction, any_model, batch_size, dtype)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as prog:
        tasks = {"score": prog.add_task("measuring", total=len(chats) * (1 if no_baseline else 2))}
        if not no_baseline:
            tasks["generate"] = prog.add_task("own answers", total=len(chats))
        res = A.audit_examples(m, d, lines, chats, label_field=label_field, positive=pos, baseline=not no_baseline, sampling=sampling,
                               batch_size=batch_size, allow_other_model=any_model, progress=lambda stage, n: prog.advance(tasks[stage], n))
    shown = res.records if top == 0 else res.records[:top]
    if want_json(json_out):
        for r in shown:
            emit_json(r)
        emit_json(res.summary)
    else:
        _audit_table(shown, no_baseline)
        out.print(_audit_line(res.summary, no_baseline))
    if out_file is not None:
        _write_jsonl(out_file, [*res.records, res.summary], force)
        err.print(f"wrote {len(res.records)} ranked examples and the summary to {out_file}")


def _audit_table(recs: list[dict[str, Any]], no_baseline: bool) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(show_lines=False)
    cols = [("rank", "right"), ("line", "right"), ("score", "right")] + ([] if no_baseline else [("answer", "right"), ("own", "right")])
    cols += [("prompt", "left"), ("answer starts", "left"), ("label", "left")]
    for c, j in cols:
        t.add_column(c, justify=j, overflow="fold")  # type: ignore[arg-type]
    for r in recs:
        cells = [str(r["rank"]), str(r["line"]), _fmt(r["score"])]
        if not no_baseline:
            cells += [_fmt(r["answer_mean"]), _fmt(r["baseline_mean"])]
        lab = "-" if "positive" not in r else ("positive" if r["positive"] else "negative")
        t.add_row(*cells, Text(" ".join(r["prompt"].split())[:40]), Text(" ".join(r["answer"].split())[:50]), lab)
    out.print(t)


def _audit_line(s: dict[str, Any], no_baseline: bool) -> str:
    what = "answer activation" if no_baseline else "projection difference"
    head = f"{s['examples']} examples ranked by {what} along {s['direction']} (layer {s['layer']})"
    if not s["labelled"]:
        return head + f"; no '{s['label_field']}' labels for a ROC AUC"
    if s["auc"] is None:
        return head + f"; {s['positive']}/{s['labelled']} labelled positive: the ROC AUC needs both classes"
    return head + f"; positive vs the rest: ROC AUC {s['auc']:.3f} ({s['positive']}/{s['labelled']} positive)"

