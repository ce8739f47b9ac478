"""Steering specs, parsed and resolved in one place.

Two syntaxes name the same thing, "steer with this direction, in this mode, at this strength":

* the command line's ``--add NAME:S``, ``--clamp NAME:V``, ``--ablate NAME`` (with ``--layer``
  and ``--raw`` for all of them): :func:`parse_flags`;
* a server request's ``steering`` items ``{"direction", "mode", "strength", "layer"?, "raw"?}``:
  :func:`parse_request_items`.

Both give :class:`SteeringSpec` objects, and :func:`resolve_steering` turns specs into
Interventions for a loaded model: it finds and checks each
direction once (a cache by name), builds the interventions (mode and strength bounds) and checks
that they make one steering plan (a direction given twice in one mode, an SAE that does not
load). ``steerkit generate``, ``steerkit serve`` and the server's request parser all call it.

Errors are :class:`SteeringSpecError`, a :class:`~steerkit.errors.SteerkitError` whose
``param`` and ``code`` name the request field at fault (``steering[0].strength``,
``invalid_strength``) for specs that came from a request; the server answers them as OpenAI
error objects, the CLI prints the message.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from steerkit.directions import Direction, resolve_direction
from steerkit.errors import SteerkitError
from steerkit.interventions import MODES, Intervention, SteeringPlan
from steerkit.models import LoadedModel, check_layer

ITEM_FIELDS = ("direction", "mode", "strength", "layer", "raw")


class SteeringSpecError(SteerkitError):
    """A bad steering spec; ``param`` and ``code``: the request field at fault and an OpenAI-style
    error code (None for specs from the command line)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class SteeringSpec:
    """One steering edit before its direction is read: a direction name (or path), a mode, a
    strength (ignored by ablate), a layer overriding the direction's, absolute units (``raw``).
    ``where`` is the request item it came from (``steering[0]``), named by its errors."""

    mode: str
    direction: str
    strength: float = 0.0
    layer: int | None = None
    raw: bool = False
    where: str | None = None


# --- numbers in specs -------------------------------------------------------------------------


def is_finite_number(v: Any) -> bool:
    """A JSON number that is a finite float (an integer literal too big for a float is not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def short_repr(v: Any) -> str:
    """``repr(v)``, cut to 40 characters for an error message."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def parse_float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise SteerkitError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(v):
        raise SteerkitError(f"{what}: strength must be a finite number, got {text!r}")
    return v


def split_spec(spec: str, what: str, need_value: bool) -> tuple[str, float | None]:
    """'persona:0.3' -> ('persona', 0.3). A path with ':' in it keeps all but the last part."""
    if ":" in spec:
        name, _, val = spec.rpartition(":")
        if not name:
            raise SteerkitError(f"{what} {spec!r}: give NAME:VALUE, e.g. persona:0.3")
        return name, parse_float(val, f"{what} {spec!r}")
    if need_value:
        raise SteerkitError(f"{what} {spec!r} needs a value: NAME:VALUE, e.g. {spec}:0.3")
    return spec, None


# --- the two syntaxes -------------------------------------------------------------------------


def parse_flags(add: Iterable[str] = (), clamp: Iterable[str] = (), ablate: Iterable[str] = (), layer: int | None = None,
                raw: bool = False) -> list[SteeringSpec]:
    """``--add NAME:S``, ``--clamp NAME:V``, ``--ablate NAME`` (every one at ``layer`` and in
    ``raw`` units when given) -> specs, adds first, then clamps, then ablations."""
    specs: list[SteeringSpec] = []
    for s in add:
        name, v = split_spec(s, "--add", need_value=True)
        specs.append(SteeringSpec("add", name, float(v), layer, raw))  # type: ignore[arg-type]
    for s in clamp:
        name, v = split_spec(s, "--clamp", need_value=True)
        specs.append(SteeringSpec("clamp", name, float(v), layer, raw))  # type: ignore[arg-type]
    for s in ablate:
        name, v = split_spec(s, "--ablate", need_value=False)
        if v is not None:
            raise SteerkitError(f"--ablate {s!r} takes no value: write --ablate {name}")
        specs.append(SteeringSpec("ablate", name, 0.0, layer, raw))
    return specs


def parse_request_items(raw: Any, n_layers: int) -> Iterator[SteeringSpec]:
    """A request's ``steering`` (a list of items, or one item) -> specs, for a model of
    ``n_layers`` layers. A generator: each item is checked as it is taken, so that
    :func:`resolve_steering` reports the first bad item first, whatever is wrong with it."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise SteeringSpecError("steering must be a list of {direction, mode, strength} objects", "steering")
    for i, item in enumerate(raw):
        p = f"steering[{i}]"
        if not isinstance(item, dict):
            raise SteeringSpecError(f"{p} must be an object with direction, mode and strength", p)
        extra = set(item) - set(ITEM_FIELDS)
        if extra:
            raise SteeringSpecError(f"{p}: unknown field(s) {', '.join(sorted(extra))}; allowed: {', '.join(ITEM_FIELDS)}", p)
        name = item.get("direction")
        if not isinstance(name, str) or not name:
            raise SteeringSpecError(f"{p}.direction must be a direction name", f"{p}.direction")
        mode = item.get("mode", "add")
        if mode not in MODES:
            raise SteeringSpecError(f"{p}.mode {mode!r} is not one of {', '.join(MODES)}", f"{p}.mode", "invalid_mode")
        strength = item.get("strength", 0.0 if mode == "ablate" else None)
        if strength is None:
            raise SteeringSpecError(f"{p}.strength is required for mode {mode}", f"{p}.strength")
        if not is_finite_number(strength):
            raise SteeringSpecError(f"{p}.strength must be a finite number, got {short_repr(strength)}", f"{p}.strength", "invalid_strength")
        layer = item.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers):
            raise SteeringSpecError(f"{p}.layer must be an integer from 0 to {n_layers - 1}, got {layer!r}", f"{p}.layer")
        raw_units = item.get("raw", False)
        if not isinstance(raw_units, bool):
            raise SteeringSpecError(f"{p}.raw must be true or false", f"{p}.raw")
        yield SteeringSpec(mode, name, float(strength), layer, raw_units, where=p)


# --- resolution -------------------------------------------------------------------------------


def looks_like_path(name: str) -> bool:
    """A direction spec that names a file rather than a direction."""
    return name.endswith(".safetensors") or "/" in name or "\\" in name or name.startswith((".", "~"))


def _param(spec: SteeringSpec, field: str | None = None) -> str | None:
    if spec.where is None:
        return None
    return spec.where if field is None else f"{spec.where}.{field}"


def _direction(model: LoadedModel, spec: SteeringSpec, cache: dict[str, Direction], read: dict[str, Any], any_model: bool,
               allow_paths: bool) -> Direction:
    name, param = spec.direction, _param(spec, "direction")
    if name not in cache:
        if not allow_paths and looks_like_path(name):
            raise SteeringSpecError(f"direction {name!r}: give a direction name; this server does not read paths (start it with --allow-paths)",
                                    param, "invalid_direction")
        try:
            cache[name] = resolve_direction(read.get(name, name), model, allow_other_model=any_model)
        except SteerkitError as e:
            raise SteeringSpecError(str(e), param, "invalid_direction") from None
        except (OSError, ValueError):  # a name no file system takes (too long, NUL)
            raise SteeringSpecError(f"unknown direction {short_repr(name)}: give the name of a direction file", param, "invalid_direction") from None
    return cache[name]


def resolve_steering(model: LoadedModel, specs: Iterable[SteeringSpec], *, any_model: bool = False, directions: dict[str, Any] | None = None,
                     cache: dict[str, Direction] | None = None, allow_paths: bool = True) -> tuple[Intervention, ...]:
    """The Interventions ``specs`` ask of ``model`` (a LoadedModel), checked as one steering plan.

    Each direction is read once per name (by name or path, as ``steerkit generate`` finds them)
    and checked against the model (``any_model``: a direction made for another model of the same
    d_model). ``directions``: directions already read, by spec name (the CLI's pre-load checks
    read them), still checked against the model. ``cache``: checked directions by name, filled
    in place (the server keeps one across requests, so requests naming one direction share one
    slot of a batch's plan). ``allow_paths=False`` refuses file paths (the server's default).
    Raises :class:`SteeringSpecError` naming the first bad spec."""
    cache = {} if cache is None else cache
    read = directions or {}
    ivs: list[Intervention] = []
    from_request = False
    for spec in specs:
        from_request = from_request or spec.where is not None
        if spec.layer is not None:
            try:
                check_layer(spec.layer, model.n_layers)  # (request items were checked with their own message)
            except SteerkitError as e:
                raise SteeringSpecError(str(e), _param(spec, "layer")) from None
        d = _direction(model, spec, cache, read, any_model, allow_paths)
        try:
            ivs.append(Intervention(d, spec.mode, float(spec.strength), raw=spec.raw, layer=spec.layer))  # type: ignore[arg-type]
        except SteerkitError as e:
            about_strength = "strength" in str(e)
            raise SteeringSpecError(str(e), _param(spec, "strength" if about_strength else None), "invalid_strength" if about_strength else None) from None
    try:
        SteeringPlan.build([ivs])  # a direction twice in one mode, an SAE that does not load: refused now, not inside a batch
    except SteerkitError as e:
        raise SteeringSpecError(str(e), "steering" if from_request else None) from None
    return tuple(ivs)
