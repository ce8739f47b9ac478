"""Direction files: one unit vector plus typed metadata in one safetensors file.

Format (``format = steerkit.direction``, ``format_version = 1``):

* tensor ``direction``: ``[d_model]`` float32, unit norm;
* metadata (all strings, as safetensors requires): ``name``, ``model``, ``d_model``, ``layer``,
  ``hook_name``, ``kind`` (see :data:`KINDS`), ``median_norm`` (the layer's median token norm,
  the unit of steering strength), ``steerkit_version``, ``description``, ``provenance`` (JSON),
  and for SAE latents ``sae`` (a folder, relative to the file when it sits beside it) and
  ``latents`` (comma-separated ids); a latent set (kind ``sae-latents``) may add ``weights``
  (comma-separated, one per latent, the largest 1; none: all 1).

A latent set's vector is the weighted sum of its decoder rows, ``sum_i w_i W_dec[i]`` (unit norm
in the file): adding it raises each latent in proportion to its weight. Clamping a set pins
latent ``i`` to ``value * w_i``; ablating it zeroes every latent of the set (weights play no
part), both in the SAE basis with the reconstruction error kept (:mod:`steerkit.interventions`).

Names resolve from the user's folder (``$STEERKIT_HOME/directions/<model>/``), then the shipped
``directions/<model>/``; anything that looks like a path is read as a path.

Why one module of this size: the direction file format, its reader and writer, name resolution
and the compatibility checks change together whenever the format does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from steerkit import __version__
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_path, user_data_dir
from steerkit.models import LoadedModel
from steerkit.sae_formats import detect_format

FORMAT = "steerkit.direction"
FORMAT_VERSION = "1"
TENSOR_KEY = "direction"
SUFFIX = ".safetensors"

Kind = Literal["sae-latent", "sae-latents", "diff-of-means", "random", "imported", "vector"]
KINDS: tuple[str, ...] = get_args(Kind)
REQUIRED_META = ("format", "name", "model", "d_model", "layer", "hook_name", "kind", "median_norm")


@dataclass(frozen=True)
class Direction:
    """A steering direction for one model and one residual-stream layer."""

    name: str
    vector: torch.Tensor = field(repr=False)  # [d_model], unit norm
    model: str
    layer: int
    hook_name: str
    kind: Kind
    median_norm: float
    description: str = ""
    sae: str | None = None  # folder of the SAE whose latents this direction is made of
    latents: tuple[int, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    steerkit_version: str = __version__
    path: Path | None = None  # where it was loaded from, if anywhere
    weights: tuple[float, ...] = ()  # per latent of a set, the largest 1; () = all 1

    def __post_init__(self) -> None:
        v = self.vector
        if not isinstance(v, torch.Tensor) or v.ndim != 1:
            raise SteerkitError(f"direction {self.name!r}: vector must be a 1-D tensor [d_model]")
        if not torch.isfinite(v).all():
            raise SteerkitError(f"direction {self.name!r}: vector has NaN or infinite entries")
        n = float(v.norm())
        if n == 0:
            raise SteerkitError(f"direction {self.name!r}: vector is all zeros")
        if abs(n - 1) > 1e-4:
            object.__setattr__(self, "vector", (v / n).to(torch.float32))
        if self.kind not in KINDS:
            raise SteerkitError(f"direction {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not (math.isfinite(self.median_norm) and self.median_norm > 0):
            raise SteerkitError(f"direction {self.name!r}: median_norm must be a positive number, got {self.median_norm}")
        if self.layer < 0:
            raise SteerkitError(f"direction {self.name!r}: layer must be >= 0, got {self.layer}")
        if self.weights and not self.latents:
            object.__setattr__(self, "weights", ())  # a copy without latents (a control) carries no weights
        if self.weights:
            w = tuple(float(x) for x in self.weights)
            if len(w) != len(self.latents):
                raise SteerkitError(f"direction {self.name!r}: {len(w)} weights for {len(self.latents)} latents; give one weight per latent")
            if not all(math.isfinite(x) for x in w) or not any(x != 0 for x in w):
                raise SteerkitError(f"direction {self.name!r}: latent weights must be finite and not all zero, got {list(w)}")
            object.__setattr__(self, "weights", w)

    def latent_weights(self) -> tuple[float, ...]:
        """One weight per latent (all 1 when the file gives none)."""
        return self.weights or tuple(1.0 for _ in self.latents)

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def is_sae(self) -> bool:
        return self.sae is not None and len(self.latents) > 0

    def sae_path(self) -> Path | None:
        """The SAE folder, resolved against the file's folder when relative."""
        if self.sae is None:
            return None
        p = Path(self.sae).expanduser()
        if not p.is_absolute() and self.path is not None:
            p = self.path.parent / p
        return p

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "model": self.model,
            "d_model": str(self.d_model),
            "layer": str(self.layer),
            "hook_name": self.hook_name,
            "kind": self.kind,
            "median_norm": repr(float(self.median_norm)),
            "description": self.description,
            "provenance": json.dumps(self.provenance, sort_keys=True),
            "steerkit_version": self.steerkit_version,
        }
        if self.sae is not None:
            meta["sae"] = self.sae
            meta["latents"] = ",".join(str(i) for i in self.latents)
            if self.weights:
                meta["weights"] = ",".join(repr(float(w)) for w in self.weights)
        return meta

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "layer": self.layer,
            "kind": self.kind,
            "d_model": self.d_model,
            "median_norm": self.median_norm,
            "latents": list(self.latents),
            "weights": list(self.weights) if self.weights else None,
            "sae": self.sae,
            "description": self.description,
            "path": str(self.path) if self.path else None,
        }


def save_direction(direction: Direction, path: str | os.PathLike, force: bool = False) -> Path:
    """Write a direction file atomically; refuse to overwrite without ``force``."""
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix != SUFFIX:
        p = p.with_name(p.name + SUFFIX)
    with atomic_path(p, force) as tmp:
        save_file({TENSOR_KEY: direction.vector.detach().to(torch.float32).cpu().contiguous()}, str(tmp), metadata=direction.metadata())
    return p


def load_direction(path: str | os.PathLike) -> Direction:
    """Read a direction file, with one-line errors for missing, corrupt or incomplete files."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise SteerkitError(f"direction file {p} does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
            if TENSOR_KEY not in keys:
                raise SteerkitError(f"{p} has no '{TENSOR_KEY}' tensor: not a steerkit direction file (tensors: {', '.join(keys) or 'none'})")
            vec = f.get_tensor(TENSOR_KEY)
    except SteerkitError:
        raise
    except Exception as e:
        raise SteerkitError(f"{p} is not a readable safetensors file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from e
    if meta.get("format") != FORMAT:
        raise SteerkitError(f"{p} is not a steerkit direction file (metadata 'format' is {meta.get('format')!r}); import other formats with `steerkit directions import`")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise SteerkitError(f"{p} lacks metadata {', '.join(missing)}: the file is incomplete")
    try:
        d_model = int(meta["d_model"])
        layer = int(meta["layer"])
        median_norm = float(meta["median_norm"])
        latents = tuple(int(x) for x in meta.get("latents", "").split(",") if x.strip())
        weights = tuple(float(x) for x in meta.get("weights", "").split(",") if x.strip())
        provenance = json.loads(meta.get("provenance") or "{}")
    except ValueError as e:
        raise SteerkitError(f"{p} has malformed metadata: {e}") from e
    if vec.ndim != 1 or vec.shape[0] != d_model:
        raise SteerkitError(f"{p}: tensor shape {tuple(vec.shape)} does not match d_model {d_model}")
    return Direction(
        name=meta["name"],
        vector=vec.to(torch.float32),
        model=meta["model"],
        layer=layer,
        hook_name=meta["hook_name"],
        kind=meta["kind"],  # type: ignore[arg-type]
        median_norm=median_norm,
        description=meta.get("description", ""),
        sae=meta.get("sae"),
        latents=latents,
        provenance=provenance,
        steerkit_version=meta.get("steerkit_version", "?"),
        path=p,
        weights=weights,
    )


# --- where directions live -------------------------------------------------------------------


def shipped_root() -> Path:
    """The shipped ``directions/`` folder: the repo's (editable install) or the wheel's copy."""
    here = Path(__file__).resolve().parent
    repo = here.parent / "directions"
    if repo.is_dir():
        return repo
    return here / "_shipped_directions"


def user_root() -> Path:
    return user_data_dir() / "directions"


def search_dirs(model_name: str) -> list[Path]:
    """Folders searched for direction names, first match wins."""
    dirs = [user_root() / model_name]
    extra = os.environ.get("STEERKIT_DIRECTIONS")
    if extra:
        dirs += [Path(x).expanduser() for x in extra.split(os.pathsep) if x]
    dirs.append(shipped_root() / model_name)
    return dirs


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(SUFFIX) or os.sep in spec or spec.startswith((".", "~"))


def find_direction(spec: str, model_name: str) -> Path:
    """Turn a direction name or path into a file path, or say what names exist."""
    if _looks_like_path(spec):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise SteerkitError(f"direction file {p} does not exist")
        return p
    for d in search_dirs(model_name):
        cand = d / f"{spec}{SUFFIX}"
        if cand.is_file():
            return cand
    names = sorted({p.stem for d in search_dirs(model_name) if d.is_dir() for p in d.glob(f"*{SUFFIX}")})
    hint = f"known for {model_name}: {', '.join(names)}" if names else f"no directions found for model {model_name!r}"
    raise SteerkitError(f"unknown direction {spec!r} ({hint}); or give a path to a .safetensors file")


def find_sae(spec: str, model_name: str) -> Path:
    """An SAE folder by path, or by name from the direction search folders (e.g. ``sae-l15``)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if not _looks_like_path(spec):
        for d in search_dirs(model_name):
            if (d / spec).is_dir():
                return d / spec
    names = sorted({q.name for d in search_dirs(model_name) if d.is_dir() for q in d.iterdir() if detect_format(q) is not None})
    hint = f"known for {model_name}: {', '.join(names)}" if names else f"no SAEs found for {model_name!r}"
    raise SteerkitError(f"SAE {spec!r} not found ({hint}); give a folder in SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json + sae.safetensors) or dictionary_learning (config.json + ae.pt) layout")


def resolve_direction(spec: str | Direction, model: LoadedModel, allow_other_model: bool = False) -> Direction:
    """Load a direction by name or path and check it fits ``model`` (a LoadedModel)."""
    d = spec if isinstance(spec, Direction) else load_direction(find_direction(spec, model.name))
    check_compatible(d, model, allow_other_model)
    return d


def check_compatible(d: Direction, model: LoadedModel, allow_other_model: bool = False) -> None:
    if d.d_model != model.d_model:
        raise SteerkitError(
            f"direction {d.name!r} was made for {d.model} (d_model {d.d_model}); "
            f"model {model.name} has d_model {model.d_model}"
        )
    if d.layer >= model.n_layers:
        raise SteerkitError(f"direction {d.name!r} is for layer {d.layer}, but {model.name} has {model.n_layers} layers")
    if d.model != model.name and not allow_other_model:
        raise SteerkitError(
            f"direction {d.name!r} was made for model {d.model!r}, not {model.name!r}; "
            f"pass --any-model to use it anyway (same d_model {d.d_model})"
        )


def list_directions(model_name: str | None = None) -> list[Direction | dict[str, Any]]:
    """Every direction file in the search folders (all models when ``model_name`` is None).

    Unreadable files are listed as dicts with an ``error`` so one bad file hides nothing else.
    """
    roots: list[tuple[Path, str | None]] = []
    for root in [user_root(), shipped_root()] + [Path(x) for x in os.environ.get("STEERKIT_DIRECTIONS", "").split(os.pathsep) if x]:
        if not root.is_dir():
            continue
        if model_name:
            roots.append((root / model_name, model_name))
            roots.append((root, None))  # an extra folder may hold files directly
        else:
            roots += [(d, d.name) for d in sorted(root.iterdir()) if d.is_dir()]
            roots.append((root, None))
    out: list[Direction | dict[str, Any]] = []
    seen: set[Path] = set()
    for folder, _ in roots:
        if not folder.is_dir():
            continue
        for p in sorted(folder.glob(f"*{SUFFIX}")):
            rp = p.resolve()
            if rp in seen:
                continue
            seen.add(rp)
            try:
                d = load_direction(p)
                if model_name and d.model != model_name:
                    continue
                out.append(d)
            except SteerkitError as e:
                if p.name.startswith("sae_weights"):
                    continue
                out.append({"name": p.stem, "path": str(p), "error": str(e)})
    return out


def vector_digest(d: Direction) -> str:
    """The first 16 hex digits of the SHA-256 of the direction's float32 vector."""
    return hashlib.sha256(d.vector.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def control_seed(d: Direction, kind: str, index: int, seed: int = 0) -> int:
    """A generator seed for control ``index`` of kind ``kind`` made for ``d``: drawn from the
    direction's identity (model, layer, name, vector) so that no two directions, no two control
    indices and no SAE initialisation (seeded with small integers) share a draw."""
    text = f"steerkit-control|{kind}|{d.model}|{d.layer}|{d.name}|{vector_digest(d)}|{index}|{seed}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def random_like(d: Direction, index: int = 0, seed: int = 0, name: str | None = None) -> Direction:
    """Random control number ``index`` for ``d``: a Gaussian direction on the same layer with the
    same strength unit, drawn from a generator seeded by :func:`control_seed` (``seed`` is mixed
    in, e.g. a sweep's seed), never from a bare small integer."""
    gs = control_seed(d, "random", index, seed)
    g = torch.Generator().manual_seed(gs)
    v = torch.randn(d.d_model, generator=g)
    return replace(
        d,
        name=name or f"{d.name}-random-{index + 1}",
        vector=v / v.norm(),
        kind="random",
        sae=None,
        latents=(),
        weights=(),
        description=f"random unit direction number {index + 1}, control for {d.name!r} (same layer and norm unit)",
        provenance={"control_for": d.name, "control_for_sha256": vector_digest(d), "index": index, "seed": seed,
                    "generator_seed": gs, "method": "torch.randn(d_model) from steerkit.directions.control_seed "
                    "(SHA-256 of model, layer, name, vector, index, seed), normalised",
                    "source": d.path.name if d.path else None},
        steerkit_version=__version__,
        path=None,
    )


def from_vector(
    vector: torch.Tensor,
    *,
    name: str,
    model: LoadedModel,
    layer: int,
    kind: Kind,
    median_norm: float,
    description: str = "",
    provenance: dict[str, Any] | None = None,
    sae: str | None = None,
    latents: tuple[int, ...] = (),
    weights: tuple[float, ...] = (),
) -> Direction:
    """Build a Direction for ``model`` (a LoadedModel) from a raw vector of any norm."""
    if vector.shape != (model.d_model,):
        raise SteerkitError(f"vector has shape {tuple(vector.shape)}, expected ({model.d_model},) for {model.name}")
    prov = dict(provenance or {})
    prov.setdefault("raw_norm", float(vector.norm()))
    return Direction(
        name=name,
        vector=vector.detach().float().cpu(),
        model=model.name,
        layer=layer,
        hook_name=model.hook_name(layer),
        kind=kind,
        median_norm=median_norm,
        description=description,
        provenance=prov,
        sae=sae,
        latents=latents,
        weights=weights,
    )
