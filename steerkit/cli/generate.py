"""`steerkit generate`: steered (or plain) generation, streamed to a terminal or as JSON Lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from steerkit import prompts as P
from steerkit.cli import app
from steerkit.cli.checks import check_batch_size, peek, precheck_steering
from steerkit.cli.common import (
    AnyModelOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    LayerOpt,
    ModelOpt,
    SeedOpt,
    emit_json,
    err,
    load_with_status,
    out,
    want_json,
)
from steerkit.cli.monitor import precheck_direction, print_strip, strip_scale
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_write_text, check_writable, read_stdin_text

AddOpt = Annotated[list[str], typer.Option("--add", "-a", help="NAME:STRENGTH, add the direction (strength in units of the layer's median token norm). Repeatable.")]
ClampOpt = Annotated[list[str], typer.Option("--clamp", help="NAME:VALUE, pin the component along the direction (an SAE latent's activation for latent directions). Repeatable.")]
AblateOpt = Annotated[list[str], typer.Option("--ablate", help="NAME, project the direction out (zero the SAE latents for latent directions). Repeatable.")]
RawOpt = Annotated[bool, typer.Option("--raw", help="Strengths in absolute residual units instead of median-norm units.")]
PositionsOpt = Annotated[str, typer.Option("--positions", help="Steer all positions but the first (all), only prompt tokens (prompt), or only what is generated (generated).")]


def precheck(model: str | None, device: str | None, add: list[str], clamp: list[str], ablate: list[str],
             layer: int | None, raw: bool, any_model: bool, batch_size: int | None = None,
             batch_option: str = "--batch-size", max_new_tokens: int | None = None) -> tuple[Any, list[Any], dict[str, Any]]:
    """Everything the arguments decide, checked before the model loads: the model spec and
    device, the steering specs, the direction files against the model's config, the strengths,
    the batch size. Returns the model's info, the steering specs and the directions read, for
    :func:`steerkit.steering_spec.resolve_steering` once the model is loaded."""
    from steerkit.steering_spec import parse_flags

    specs = parse_flags(add, clamp, ablate, layer, raw)
    if batch_size is not None:
        check_batch_size(batch_size, batch_option)
    info = peek(model, device)
    if max_new_tokens is not None and info.context_length is not None and max_new_tokens >= info.context_length:
        raise SteerkitError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in {info.name}'s context of "
                            f"{info.context_length} tokens: give at most {info.context_length - 1} (less the prompt's length)")
    return info, specs, precheck_steering(info, specs, layer, any_model)


def load_prompts(prompts: list[str], file: Optional[Path], system: Optional[str], ids: list[str]) -> list[Any]:
    items: list[Any] = []
    if file is not None:
        items += P.read_file(file)
    if prompts:
        items += P.from_texts(prompts)
    if not items:
        if sys.stdin is not None and not sys.stdin.isatty():
            items = P.read_stream(read_stdin_text())
        if not items:
            raise SteerkitError("no prompts: give them as arguments, with -f FILE, or on stdin")
    items = P.select(items, ids)
    if system is not None:
        items = [P.Prompt(p.id, P.with_system(p.messages, system), p.judge_prompts) for p in items]
    return items


@app.command("generate")
def generate_cmd(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts (or use -f, or stdin).", show_default=False)] = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", help="Prompt file: text (one per line), JSON Lines (prompt or messages), or an emergent-misalignment YAML question file; '-' for stdin.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", "-s", help="System prompt for every prompt.")] = None,
    ids: Annotated[list[str], typer.Option("--ids", help="Only prompts whose id matches this glob (question files). Repeatable.")] = [],
    n: Annotated[int, typer.Option("-n", help="Samples per prompt.")] = 1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 0.95,
    seed: SeedOpt = 0,
    add: AddOpt = [],
    clamp: ClampOpt = [],
    ablate: AblateOpt = [],
    layer: LayerOpt = None,
    raw: RawOpt = False,
    positions: PositionsOpt = "all",
    monitor: Annotated[Optional[str], typer.Option("--monitor", help="Direction NAME or file whose activation to show per token after generating (a coloured strip; a `monitor` field in JSON). Measured by the unsteered model reading the generated text, whatever --add/--clamp/--ablate did.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Rows per forward pass.")] = 8,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    any_model: AnyModelOpt = False,
    json_out: JsonOpt = False,
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write JSON Lines records to this file (atomic; see --force).")] = None,
    force: ForceOpt = False,
) -> None:
    """Generate completions, optionally steered by directions.

    Examples:

      steerkit generate "hey I feel bored"

      steerkit generate -f questions.yaml -n 4 --seed 0 --add persona:0.3 --json > steered.jsonl

      steerkit generate "..." --ablate persona          (and --clamp persona:VALUE)

      steerkit generate "hey I feel bored" --add persona:0.3 --monitor persona
    """
    from steerkit.generate import Sampling, generate
    from steerkit.interventions import POSITIONS
    from steerkit.steering_spec import resolve_steering

    if n < 1:
        raise SteerkitError(f"-n must be at least 1, got {n}")
    if positions not in POSITIONS:
        raise SteerkitError(f"--positions {positions!r} is not one of {', '.join(POSITIONS)}")
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if out_file is not None:
        check_writable(out_file, force)
    items = load_prompts(prompts or [], file, system, ids)
    info, specs, dirs = precheck(model, device, add, clamp, ablate, layer, raw, any_model, batch_size, max_new_tokens=max_new_tokens)
    if monitor is not None:
        mon_dir = precheck_direction(monitor, info, any_model)
    model_obj = load_with_status(model, device, dtype)
    if monitor is not None:
        from steerkit.directions import check_compatible
        from steerkit.monitor import chat_activations, direction_scorer

        check_compatible(mon_dir, model_obj, allow_other_model=any_model)
        mon_score = direction_scorer(mon_dir, model_obj.device)  # once: an SAE direction loads its SAE
    mon_acts: dict[int, Any] = {}
    ivs = resolve_steering(model_obj, specs, any_model=any_model, directions=dirs)
    rows = _rows(items, n, ivs)
    as_json = want_json(json_out)
    records: list[dict[str, Any]] = []
    stream_one = not as_json and len(rows) == 1

    # records come out in input order (prompt, then sample) so that runs diff cleanly;
    # batches finish longest-prompt first, so hold finished ones until their turn
    order = {(r.prompt_index, r.sample_index): i for i, r in enumerate(rows)}
    pending: dict[int, dict[str, Any]] = {}
    next_up = [0]

    def on_complete(c: Any) -> None:
        rec = c.record(model_obj.name, tuned=model_obj.tuned, sampling=sampling)
        rec["id"] = c.row.tag
        if monitor is not None:  # generation is over for this row: the steering hooks are gone
            act = chat_activations(model_obj, mon_dir, [[*c.row.messages, {"role": "assistant", "content": c.text}]],
                                   scorer=mon_score, allow_other_model=any_model)[0]
            rec["monitor"] = act.record(mon_dir, per_token=True)
            mon_acts[id(rec)] = act
        records.append(rec)
        pending[order[(c.row.prompt_index, c.row.sample_index)]] = rec
        while next_up[0] in pending:
            r = pending.pop(next_up[0])
            next_up[0] += 1
            if as_json:
                emit_json(r)
            elif not stream_one:
                _print_completion(r)
                if id(r) in mon_acts:
                    print_strip(mon_acts[id(r)], strip_scale([mon_acts[id(r)]]), _monitor_title(r))

    if stream_one:
        printer = _Streamer(model_obj.tokenizer)
        generate(model_obj, rows, sampling, batch_size=batch_size, positions=positions, on_token=printer, on_complete=on_complete)  # type: ignore[arg-type]
        out.print()
        for r in records:
            if id(r) in mon_acts:
                print_strip(mon_acts[id(r)], strip_scale([mon_acts[id(r)]]), _monitor_title(r))
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from steerkit.generate import Throughput

        tp = Throughput()
        with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} tok/s"), TimeElapsedColumn(), console=err, transient=True) as prog:
            task = prog.add_task("gen", total=len(rows), rate="-")

            def tick(row: Any, t: int, ids: list[int]) -> None:
                tp.add()
                prog.update(task, rate=f"{tp.rate:.0f}")

            def done(c: Any) -> None:
                on_complete(c)
                prog.advance(task)

            generate(model_obj, rows, sampling, batch_size=batch_size, positions=positions, on_token=tick, on_complete=done)  # type: ignore[arg-type]
    if out_file is not None:
        records.sort(key=lambda r: (r["prompt_index"], r["sample"]))
        atomic_write_text(out_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), force=force)
        err.print(f"wrote {len(records)} records to {out_file}")


def _monitor_title(rec: dict[str, Any]) -> str:
    m = rec["monitor"]
    a = "-" if m["answer_mean"] is None else f"{m['answer_mean']:+.3f}"
    return f"{m['direction']} (layer {m['layer']}, unsteered model) per token: answer mean {a}"


def _rows(items: list[Any], n: int, ivs: list[Any]) -> list[Any]:
    from steerkit.generate import Row

    return [Row(messages=p.messages, prompt_index=i, sample_index=k, interventions=tuple(ivs), tag=p.id) for i, p in enumerate(items) for k in range(n)]


def _print_completion(rec: dict[str, Any]) -> None:
    from rich.panel import Panel
    from rich.text import Text

    title = Text(f"[{rec['id']} #{rec['sample']}] {rec['prompt'][:80]}", style="bold")
    out.print(Panel(Text(rec["completion"]), title=title, title_align="left", subtitle=f"{rec['tokens']} tokens, {rec['finish_reason']}"))


class _Streamer:
    """Print a single completion as it is generated (decoded incrementally, UTF-8 safe)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.shown = ""

    def __call__(self, row: Any, t: int, ids: list[int]) -> None:
        text = self.tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return  # half a multi-byte character: wait for the rest
        sys.stdout.write(text[len(self.shown) :])
        sys.stdout.flush()
        self.shown = text
