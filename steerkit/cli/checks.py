"""Checks that the arguments allow, run before any model loads (a model load takes 15-20 s on
the default model): steering specs and strengths, direction files against the model's config,
layers, batch sizes, devices, output paths.

Each raises SteerkitError with one line naming the bad value and the fix; the same checks run
again after the load (cheaply) where the model itself is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steerkit.errors import SteerkitError
from steerkit.fsutil import check_writable_dir, read_text


def check_batch_size(batch_size: int, option: str = "--batch-size") -> None:
    if batch_size < 1:
        raise SteerkitError(f"{option} must be at least 1, got {batch_size}")


def peek(model: str | None, device: str | None = None) -> Any:
    """The model spec and device checked without loading weights (a ModelInfo)."""
    from steerkit.models import check_device, peek_model

    check_device(device)
    return peek_model(model)


def peek_tuned(tuned: str, base: str | None, device: str | None = None) -> Any:
    """A --tuned spec checked without loading: an adapter folder against ``base`` (or, with no
    ``base``, the base its adapter_config.json names), else any model spec."""
    from steerkit.finetune import check_adapter, is_adapter_dir

    if is_adapter_dir(tuned):
        check_adapter(tuned, base)
        if base is not None:
            return peek(base, device)
    return peek(tuned, device)


def check_fits(d: Any, info: Any, any_model: bool = False, layer: int | None = None) -> None:
    """A direction file against the model's config (as far as it is known before loading)."""
    from steerkit.models import check_layer

    if info.d_model is not None and d.d_model != info.d_model:
        raise SteerkitError(
            f"direction {d.name!r} was made for {d.model} (d_model {d.d_model}), but model {info.name} has d_model "
            f"{info.d_model}: use a direction made for {info.name} (see `steerkit directions list --model {info.name}`) "
            f"or run on --model {d.model}"
        )
    if info.n_layers is not None:
        if layer is not None:
            check_layer(layer, info.n_layers)
        elif d.layer >= info.n_layers:
            raise SteerkitError(
                f"direction {d.name!r} is for layer {d.layer}, but {info.name} has {info.n_layers} layers: "
                f"pass --layer 0 to {info.n_layers - 1}, or use a direction made for {info.name}"
            )
    if d.model != info.name and not any_model:
        raise SteerkitError(
            f"direction {d.name!r} was made for model {d.model!r}, not {info.name!r}; "
            f"pass --any-model to use it anyway (same d_model {d.d_model})"
        )


def precheck_steering(info: Any, specs: list[Any], layer: int | None, any_model: bool, lookup_name: str | None = None) -> dict[str, Any]:
    """Find and read every direction named in ``specs`` (:class:`~steerkit.steering_spec.SteeringSpec`)
    and check it against ``info`` (a ModelInfo): unknown names, d_model, layer range (``layer``:
    the --layer, checked with no spec too), strengths beyond the bound, before the model loads.
    Returns the directions by spec name, for :func:`steerkit.steering_spec.resolve_steering`."""
    from steerkit.directions import find_direction, load_direction
    from steerkit.interventions import Intervention
    from steerkit.models import check_layer
    from steerkit.sae_formats import detect_format

    if layer is not None and info.n_layers is not None:
        check_layer(layer, info.n_layers)
    dirs: dict[str, Any] = {}
    for spec in specs:
        name = spec.direction
        if name not in dirs:
            d = load_direction(find_direction(name, lookup_name or info.name))
            check_fits(d, info, any_model, spec.layer)
            dirs[name] = d
        iv = Intervention(dirs[name], spec.mode, spec.strength, raw=spec.raw, layer=spec.layer)  # type: ignore[arg-type]  # mode, strength bound
        sae = iv.direction.sae_path() if iv.uses_latents else None
        if sae is not None and detect_format(sae) is None:
            raise SteerkitError(f"direction {name!r} names SAE folder {sae}, which holds no SAE (SAELens, sparsify or dictionary_learning files): put the SAE there, or --add the direction as a vector")
    return dirs


def precheck_sweep(direction: str, mode: str, grid: tuple[float, ...], model: str | None, tuned: str | None,
                   device: str | None, layer: int | None, raw: bool, any_model: bool, batch_size: int,
                   out_dir: Any) -> None:
    """`steerkit sweep`'s arguments, before the judge and the model load: the batch size, the
    --out folder, the model specs and device, the direction file against the model's config and
    every strength of the grid against the bound."""
    from steerkit.steering_spec import SteeringSpec

    check_batch_size(batch_size)
    if out_dir is not None:
        check_writable_dir(out_dir)
    info = peek(model, device) if tuned is None else peek_tuned(tuned, model or "smollm2-135m", device)
    lookup = peek(model).name if tuned is not None else None  # directions are filed under the base
    specs = [SteeringSpec(mode, direction, 0.0 if mode == "ablate" else float(s), layer, raw) for s in grid]
    precheck_steering(info, specs, layer, any_model or tuned is not None, lookup_name=lookup)


SWEEP_RECORD_KEYS = ("condition", "direction", "control", "mode", "strength", "question_id", "sample", "tokens")


def check_sweep_folder(folder: Any) -> None:
    """What `steerkit sweep summarize` reads, checked line by line with fixes it can offer (it
    has no --force): results.jsonl records (a torn last line is ignored, as a resumed sweep
    does) and sweep.json."""
    d = Path(folder).expanduser()
    if d.exists() and not d.is_dir():
        raise SteerkitError(f"{d} is a file: give the --out folder of a sweep")
    cfg = d / "sweep.json"
    if cfg.is_file():
        why = ""
        try:
            ok = isinstance(json.loads(read_text(cfg, "sweep settings")), dict)
        except json.JSONDecodeError as e:
            ok, why = False, f" ({e.msg})"
        if not ok:
            raise SteerkitError(f"{cfg} is not a JSON object{why}: restore it, or delete it to summarize without the settings")
    res = d / "results.jsonl"
    if not res.is_file():
        return
    lines = read_text(res, "results file").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the torn tail of a killed run
                break
            raise SteerkitError(f"{res}:{n} is not valid JSON ({e.msg}): fix or delete that line") from None
        missing = [k for k in SWEEP_RECORD_KEYS if k not in rec] if isinstance(rec, dict) else list(SWEEP_RECORD_KEYS)
        if missing:
            raise SteerkitError(f"{res}:{n} is not a sweep record (no {', '.join(missing)}): delete that line")
