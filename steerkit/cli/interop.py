"""`steerkit directions export|import`: control-vector GGUF (llama.cpp, repeng) and plain vectors.

The file format and layer mapping are described in :mod:`steerkit.interop`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from steerkit.activations import default_norm_chats, median_token_norm
from steerkit.cli.checks import peek
from steerkit.cli.common import DeviceOpt, DtypeOpt, ForceOpt, LayerOpt, ModelOpt, err, out
from steerkit.cli.directions import directions_app
from steerkit.directions import SUFFIX, find_direction, load_direction, save_direction, user_root
from steerkit.errors import SteerkitError
from steerkit.fsutil import check_writable
from steerkit.interop import FORMATS, export_gguf, export_plain, import_gguf, load_plain_vector, vector_to_direction
from steerkit.model_specs import spec_name
from steerkit.models import check_layer, load_model


@directions_app.command("export")
def export_cmd(
    names: Annotated[list[str], typer.Argument(help="Direction name(s) or path(s); one per layer for gguf.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output file (.gguf, .npy or .pt).")],
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="gguf (llama.cpp/repeng control vector), npy or pt; default: from --out's suffix.")] = None,
    strength: Annotated[float, typer.Option("--strength", "-s", help="Magnitude baked into the vector, in median token norms (control vectors have no separate scale).")] = 1.0,
    model: ModelOpt = None,
    model_hint: Annotated[Optional[str], typer.Option("--model-hint", help="controlvector.model_hint to write (default: the direction's model name).")] = None,
    force: ForceOpt = False,
) -> None:
    """Write directions as a control-vector GGUF (llama.cpp --control-vector, repeng
    ControlVector.import_gguf) or a plain vector. Layer L is written as direction.L, which both
    tools add to the output of block L, like steerkit.

    Example: steerkit directions export persona --format gguf --strength 4 --out persona.gguf
    """
    fmt = (fmt or out_path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise SteerkitError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    ds = [load_direction(find_direction(n, spec_name(model))) for n in names]
    if fmt == "gguf":
        p = export_gguf(ds, out_path, strength=strength, model_hint=model_hint, force=force)
        if any(d.layer == 0 for d in ds):
            err.print("[yellow]note:[/yellow] llama.cpp does not load direction.0 (block 0); repeng does")
    else:
        if len(ds) != 1:
            raise SteerkitError(f"--format {fmt} holds one vector; give one direction (or use --format gguf)")
        p = export_plain(ds[0], out_path, fmt, strength=strength, force=force)
    layers = ", ".join(f"{d.name}@{d.layer} (norm {strength * d.median_norm:.2f})" for d in ds)
    out.print(f"wrote {p}: {layers}")


@directions_app.command("import")
def import_cmd(
    path: Annotated[Path, typer.Argument(help="A control-vector .gguf, or a plain .npy/.pt vector.")],
    name: Annotated[Optional[str], typer.Option("--name", help="Name of the new direction (default: the file's name without its suffix, e.g. persona for persona.gguf).", show_default=False)] = None,
    layer: LayerOpt = None,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output .safetensors (default: the user directions folder). Several layers: one file per layer, <out>.L<layer>.safetensors.")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    force: ForceOpt = False,
) -> None:
    """Read a control vector or plain vector into a steerkit direction file. The strength unit is
    the layer's median token norm on --model; provenance keeps the raw norm (strength_of_raw).
    Plain vectors need --layer (and --model unless it is the default). The direction is named
    --name, else after the file (persona.gguf: persona).

    Examples:

      steerkit directions import persona.gguf

      steerkit directions import persona.gguf --name persona-cv --out persona-cv.safetensors
    """
    if name is None:
        name = path.stem
    if not name.strip():
        raise SteerkitError(f"{path.name} gives no name: pass --name NAME")
    suf = path.suffix.lower()
    meta: dict = {}
    if suf == ".gguf":
        cv = import_gguf(path)
        meta = cv.steerkit
        if layer is not None and layer not in cv.vectors:
            raise SteerkitError(f"{path} has no vector for layer {layer}; it has layer(s) {', '.join(map(str, cv.layers))}")
        vectors = {layer: cv.vectors[layer]} if layer is not None else dict(cv.vectors)
    else:
        if layer is None:
            raise SteerkitError(f"{path.name} is a plain vector: say which layer it belongs to with --layer")
        vectors = {layer: load_plain_vector(path)}

    info = peek(model, device)  # the model spec, device and layers checked before it loads
    if info.n_layers is not None:
        for L in vectors:
            check_layer(L, info.n_layers)
    if out_path is not None and len(vectors) == 1:
        check_writable(out_path if out_path.name.endswith(SUFFIX) else out_path.with_name(out_path.name + SUFFIX), force)  # before the model loads
    with err.status(f"loading {model or 'the default model'} to measure median norms"):
        m = load_model(model, device=device, dtype=dtype)
        known = meta.get("median_norms", {}) if m.name in meta.get("models", []) else {}
        base = out_path or (user_root() / m.name / f"{name}{SUFFIX}")
        stem = base.name[: -len(SUFFIX)] if base.name.endswith(SUFFIX) else base.name
        for L, v in sorted(vectors.items()):
            med = float(known[str(L)]) if str(L) in known else median_token_norm(m, default_norm_chats(), L) if 0 <= L < m.n_layers else 1.0
            nm = name if len(vectors) == 1 else f"{name}.L{L}"
            d = vector_to_direction(v, m, L, name=nm, median_norm=med, source=path.name)
            target = base if len(vectors) == 1 else base.with_name(f"{stem}.L{L}{SUFFIX}")
            p = save_direction(d, target, force=force)
            out.print(f"wrote {p}: {nm} at layer {L}, strength {d.provenance['strength_of_raw']:.3g} reproduces the file's vector")
