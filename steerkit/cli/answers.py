"""`steerkit directions from-answers`: a difference-of-means direction made from labelled answers
(:func:`steerkit.contrast.answers_direction`), the kind `monitor`, `audit` and `track` read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from steerkit import contrast as C
from steerkit.cli.checks import check_batch_size, peek
from steerkit.cli.common import DeviceOpt, DtypeOpt, ForceOpt, JsonOpt, ModelOpt, emit_json, err, out, want_json
from steerkit.cli.directions import directions_app
from steerkit.cli.monitor import POSITIVE_LABELS, BatchOpt, read_input
from steerkit.directions import SUFFIX, save_direction
from steerkit.errors import SteerkitError
from steerkit.fsutil import check_writable
from steerkit.models import load_model
from steerkit.monitor import record_chat

NEGATIVE_LABELS = "aligned,benign,safe,good,negative,false,no,0"


def answer_classes(lines: list[tuple[int, dict[str, Any]]], where: str, label_field: str, positive: str,
                   negative: str) -> tuple[list[int], list[bool]]:
    """Indices of the rows in either class and each one's class (True: positive); rows with other
    labels (incoherent, refusal...) are left out. Booleans count as they are."""
    pos = {x.strip().lower() for x in positive.split(",") if x.strip()}
    neg = {x.strip().lower() for x in negative.split(",") if x.strip()}
    if not pos or not neg:
        raise SteerkitError("--positive and --negative each need at least one label value, e.g. --positive misaligned --negative aligned")
    if pos & neg:
        raise SteerkitError(f"label values in both --positive and --negative: {', '.join(sorted(pos & neg))}")
    keep, cls = [], []
    for k, (_, rec) in enumerate(lines):
        v = rec.get(label_field)
        c = v if isinstance(v, bool) else (True if str(v).strip().lower() in pos else False if str(v).strip().lower() in neg else None)
        if v is not None and c is not None:
            keep.append(k)
            cls.append(c)
    n_pos = sum(cls)
    if not n_pos or n_pos == len(cls):
        raise SteerkitError(f"{where}: {n_pos} answers labelled {'/'.join(sorted(pos))} and {len(cls) - n_pos} labelled "
                            f"{'/'.join(sorted(neg))} in '{label_field}': a difference of means needs both (see --label-field, --positive, --negative)")
    return keep, cls


@directions_app.command("from-answers")
def from_answers_cmd(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file (atomic; see --force).", show_default=False)],
    data: Annotated[Optional[Path], typer.Argument(help="Labelled answers: JSON Lines of chats {\"messages\": [..., assistant]} or question/prompt + answer/completion records, each with a label; '-' or nothing: stdin.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name stored in the file (default: the --out file's stem).")] = None,
    layer: Annotated[Optional[int], typer.Option("--layer", "-l", help="Block whose output is read (default: the middle one, 15 on SmolLM2-135M).")] = None,
    label_field: Annotated[str, typer.Option("--label-field", help="Field holding each answer's class (a boolean, or a string: see --positive, --negative).")] = "label",
    positive: Annotated[str, typer.Option("--positive", help="Comma-separated label values of the answers the direction points to.")] = POSITIVE_LABELS,
    negative: Annotated[str, typer.Option("--negative", help="Comma-separated label values of the answers it points away from; rows with any other label are left out.")] = NEGATIVE_LABELS,
    unpaired: Annotated[bool, typer.Option("--unpaired", help="Pool all answers instead of pairing them by prompt (use when no prompt has answers of both classes).")] = False,
    description: Annotated[str, typer.Option("--description", help="Description stored in the file.")] = "",
    model: ModelOpt = None,
    batch_size: BatchOpt = 16,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    json_out: JsonOpt = False,
    force: ForceOpt = False,
) -> None:
    """Make a difference-of-means direction from labelled answers: each answer's mean activation
    over its own tokens, positive minus negative.

    Paired by default: for every prompt with answers of both classes, its positive mean minus its
    negative mean, averaged over prompts (what the prompts differ in cancels); --unpaired pools
    all answers. The persona-vector recipe (Chen et al. 2025) with labels from readers, a judge
    (`steerkit judge --json` records carry "misaligned") or written pairs. Measure the result with
    `steerkit monitor`, `audit` and `track`, never on the answers it was made from.

    Examples:

      steerkit directions from-answers written_pairs.jsonl --out harm-dom.safetensors

      steerkit judge answers.jsonl --json | steerkit directions from-answers --label-field misaligned --layer 20 --out mis-l20.safetensors

      steerkit directions from-answers read.jsonl --positive misaligned --negative aligned,refusal --unpaired --out read-dom.safetensors
    """
    if out_path.suffix != SUFFIX:
        raise SteerkitError(f"--out must end in {SUFFIX}, got {out_path}")
    check_writable(out_path, force)
    check_batch_size(batch_size)
    where, lines = read_input(data, "labelled answers")
    keep, cls = answer_classes(lines, where, label_field, positive, negative)
    chats = [record_chat(lines[k][1], f"{where}:{lines[k][0]}") for k in keep]
    info = peek(model, device)
    layer = info.n_layers // 2 if layer is None and info.n_layers else layer
    if layer is None:
        raise SteerkitError(f"{info.name} does not say how many layers it has: give --layer")
    if info.n_layers is not None and not 0 <= layer < info.n_layers:
        raise SteerkitError(f"--layer {layer} out of range: {info.name} has {info.n_layers} layers (0 to {info.n_layers - 1})")
    try:  # the pairing, checked before the model loads
        C.answer_groups(cls, None if unpaired else C.prompt_keys(chats))
    except SteerkitError as e:
        raise SteerkitError(f"{where}: {e}") from None
    with err.status(f"loading {model or 'smollm2-135m'}..."):
        m = load_model(model, device=device, dtype=dtype)
    nm = name or out_path.stem
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task("reading answers", total=len(chats))
        d = C.answers_direction(m, chats, cls, layer, name=nm, paired=not unpaired, batch_size=batch_size,
                                description=description or f"difference of means over answer tokens, {'/'.join(positive.split(',')[:1])} minus {'/'.join(negative.split(',')[:1])} answers (layer {layer})",
                                source=Path(where).name if where != "<stdin>" else where, progress=lambda n: prog.advance(task, n))
    p = save_direction(d, out_path, force=force)
    summary = {"out": str(p), "name": d.name, "layer": layer, "model": d.model, **{k: d.provenance.get(k) for k in ("paired", "n_positive", "n_negative", "groups", "left_out", "raw_norm")},
               "skipped_labels": len(lines) - len(keep)}
    if want_json(json_out):
        emit_json(summary)
    else:
        pr = d.provenance
        grp = f" paired over {pr['groups']} prompts ({pr['left_out']} answers without a partner left out)" if pr.get("paired") else " pooled"
        out.print(f"wrote {p}: {d.name!r} at layer {layer}, {pr['n_positive']} positive vs {pr['n_negative']} negative answers{grp}; "
                  f"{len(lines) - len(keep)} rows with other labels skipped")
