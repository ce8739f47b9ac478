"""`steerkit directions ...`: list shipped and user directions, show one, make random controls.

Other modules add commands to :data:`directions_app` (export/import live in cli/interop.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from steerkit.cli import app
from steerkit.cli.common import ForceOpt, JsonOpt, ModelOpt, SeedOpt, emit_json, out, want_json
from steerkit.directions import (
    Direction,
    find_direction,
    list_directions,
    load_direction,
    random_like,
    save_direction,
    search_dirs,
)
from steerkit.model_specs import DEFAULT_ALIAS, spec_name

directions_app = typer.Typer(help="Shipped and user direction files.", no_args_is_help=True)
app.add_typer(directions_app, name="directions")


@directions_app.command("list")
def list_cmd(
    model: ModelOpt = None,
    all_models: Annotated[bool, typer.Option("--all", help="Directions for every model.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List shipped and user directions with their metadata.

    Example: steerkit directions list --json
    """
    name = None if all_models else spec_name(model)
    items = list_directions(name)
    if want_json(json_out):
        for d in items:
            emit_json(d.summary() if isinstance(d, Direction) else d)
        return
    t = Table(title=f"directions for {name or 'all models'}")
    for col in ("name", "model", "layer", "kind", "median norm", "latents", "description"):
        t.add_column(col, overflow="fold")
    for d in items:
        if isinstance(d, Direction):
            lat = _latents_text(d)
            t.add_row(d.name, d.model, str(d.layer), d.kind, f"{d.median_norm:.1f}", lat, d.description)
        else:
            t.add_row(d["name"], "?", "?", "[red]unreadable[/red]", "", "", d["error"])
    out.print(t)
    if not items:
        out.print(f"no directions found; searched: {', '.join(str(p) for p in search_dirs(name or DEFAULT_ALIAS))}")


@directions_app.command("show")
def show_cmd(name: Annotated[str, typer.Argument(help="Direction name or path.")], model: ModelOpt = None, json_out: JsonOpt = False) -> None:
    """Show one direction's metadata and provenance.

    Example: steerkit directions show persona
    """
    d = load_direction(find_direction(name, spec_name(model)))
    info = d.summary() | {"hook_name": d.hook_name, "provenance": d.provenance, "steerkit_version": d.steerkit_version}
    if want_json(json_out):
        emit_json(info)
        return
    if len(d.latents) > 1:  # a set: each latent with its weight, in one line
        info.pop("weights", None)
        info["latents"] = _set_text(d)
    for k, v in info.items():
        out.print(f"[bold]{k}[/bold]: {v}", soft_wrap=True)


def _set_text(d: Direction) -> str:
    """A latent set for `show`: its size, then each latent with its weight."""
    return f"{len(d.latents)}, weight in brackets: " + ", ".join(f"{i} ({w:.2f})" for i, w in zip(d.latents, d.latent_weights()))


def _latents_text(d: Direction) -> str:
    """The latents column: a single latent, or a set's size and its first few latents."""
    if len(d.latents) <= 1:
        return ",".join(map(str, d.latents))
    head = ",".join(map(str, d.latents[:6])) + ("..." if len(d.latents) > 6 else "")
    return f"{len(d.latents)}{' weighted' if d.weights else ''}: {head}"


@directions_app.command("random")
def random_cmd(
    like: Annotated[str, typer.Option("--like", help="Direction whose layer, model and norm unit the control copies.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output .safetensors file.")],
    model: ModelOpt = None,
    index: Annotated[int, typer.Option("--index", "-i", min=0, help="Which draw: 0, 1, 2, ... give independent controls for the same direction.")] = 0,
    seed: SeedOpt = 0,
    name: Annotated[Optional[str], typer.Option("--name", help="Name stored in the file (default: the --out file's stem).")] = None,
    force: ForceOpt = False,
) -> None:
    """Write a random control direction of equal norm, on the same layer, as another. The draw
    is seeded from the direction's identity (model, layer, name, vector), --index and --seed:
    controls made for different directions, or with different indices, never coincide.

    Example: steerkit directions random --like persona --index 1 --out control.safetensors
    """
    src = load_direction(find_direction(like, spec_name(model)))
    ctl = random_like(src, index=index, seed=seed, name=name or (out_path.stem if out_path.stem else None))
    p = save_direction(ctl, out_path, force=force)
    out.print(f"wrote {p}: random control {index} for {src.name!r} (layer {src.layer}, seed {seed}, cosine {float(ctl.vector @ src.vector):+.3f})")
