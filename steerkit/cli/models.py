"""`steerkit models`: aliases, what is cached, d_model and layers of each."""

from __future__ import annotations

from rich.table import Table

from steerkit.cli import app
from steerkit.cli.common import JsonOpt, emit_json, out, want_json
from steerkit.models import cache_dir, list_models


@app.command("models")
def models_cmd(json_out: JsonOpt = False) -> None:
    """List model aliases and cached models.

    Example: steerkit models --json
    """
    rows = list_models()
    if want_json(json_out):
        for r in rows:
            emit_json(r)
        return
    t = Table(title=f"models (cache: {cache_dir()})")
    for col in ("name", "installed", "cached", "d_model", "layers", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["name"],
            "yes" if r.get("installed") else "no",
            "yes" if r.get("cached") else "no (first use dequantizes, ~20 s)",
            str(r.get("d_model") or "?"),
            str(r.get("n_layers") or "?"),
            r.get("error") or r.get("description", ""),
        )
    out.print(t)
    out.print("Also accepted by --model: a local Hugging Face folder, a .gguf file, or a hub id.")
