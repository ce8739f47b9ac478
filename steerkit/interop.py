"""Read and write the vectors other steering tools use: llama.cpp/repeng control-vector GGUF
files and plain ``.npy``/``.pt`` vectors.

Control-vector GGUF (what repeng's ``ControlVector.export_gguf``/``import_gguf`` and llama.cpp's
``--control-vector`` read and write): ``general.architecture = "controlvector"``, string
``controlvector.model_hint``, uint32 ``controlvector.layer_count``, and one float32 tensor
``direction.<layer>`` [d_model] per layer. The vector is added as is: a control vector has no
separate scale, so :func:`export_gguf` bakes ``strength x median_norm`` into it.

Layer numbering: ``direction.<k>`` is added to the output of decoder block ``k`` (0-based) in
both tools: llama.cpp's loader stores it for layer ``il = k`` and adds it after block ``il``
(index 0 is rejected there, since its buffer has no slot for block 0); repeng's ControlModel
wraps ``model.layers[k]`` and adds to its output. That is steerkit's ``blocks.{k}.hook_out``,
so ``direction.<k>`` <-> steerkit layer ``k`` with no offset. (repeng's *training* reads
``hidden_states[k]``, the output of block ``k-1``; that only affects which activations repeng
extracts from, not where its vectors are applied.)

steerkit also writes ``steerkit.*`` keys (name, model, median norm, strength, kind) that other
readers ignore, so a file it wrote imports back with the same strength unit. Not here: the
llama.cpp model GGUF (see :mod:`steerkit.models`), multi-vector arithmetic.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from steerkit.directions import Direction, from_vector
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_path
from steerkit.models import LoadedModel, check_layer

ARCH = "controlvector"
KEY_HINT = f"{ARCH}.model_hint"
KEY_COUNT = f"{ARCH}.layer_count"
TENSOR_PREFIX = "direction."
FORMATS = ("gguf", "npy", "pt")


@dataclass(frozen=True)
class ControlVectorFile:
    """The contents of a control-vector GGUF: raw vectors (norm = magnitude added) per layer."""

    model_hint: str
    vectors: dict[int, torch.Tensor] = field(repr=False)  # layer -> [d_model] float32
    steerkit: dict[str, Any] = field(default_factory=dict)  # the steerkit.* keys, when present

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)


def export_gguf(
    directions: Direction | Sequence[Direction],
    path: str | os.PathLike,
    strength: float = 1.0,
    model_hint: str | None = None,
    force: bool = False,
) -> Path:
    """Write ``directions`` (at most one per layer) as a control-vector GGUF.

    Each tensor is ``direction.vector * strength * direction.median_norm``: the vector llama.cpp
    and repeng add (llama.cpp's ``--control-vector-scaled`` multiplies it once more).
    ``model_hint`` defaults to the directions' model name. llama.cpp cannot load layer 0.
    """
    import gguf

    ds = [directions] if isinstance(directions, Direction) else list(directions)
    if not ds:
        raise SteerkitError("nothing to export: give at least one direction")
    if not math.isfinite(strength):
        raise SteerkitError(f"--strength must be a finite number, got {strength}")
    layers = [d.layer for d in ds]
    if len(set(layers)) != len(layers):
        raise SteerkitError(f"a control vector holds one vector per layer; directions share layer(s) {sorted({l for l in layers if layers.count(l) > 1})}")
    if len({d.d_model for d in ds}) != 1:
        raise SteerkitError("directions have different d_model; a control vector is for one model")
    meta = {
        "names": [d.name for d in ds],
        "models": sorted({d.model for d in ds}),
        "median_norms": {str(d.layer): d.median_norm for d in ds},
        "kinds": {str(d.layer): d.kind for d in ds},
        "strength": strength,
    }
    p = Path(path)
    with atomic_path(p, force) as tmp:
        w = gguf.GGUFWriter(str(tmp), ARCH)
        w.add_string(KEY_HINT, model_hint or ds[0].model)
        w.add_uint32(KEY_COUNT, len(ds))
        w.add_string("steerkit.meta", json.dumps(meta))
        for d in sorted(ds, key=lambda d: d.layer):
            vec = (d.vector.float() * (strength * d.median_norm)).cpu().numpy()
            w.add_tensor(f"{TENSOR_PREFIX}{d.layer}", vec)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return p


def _field_str(f: Any) -> str:
    return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")


def import_gguf(path: str | os.PathLike) -> ControlVectorFile:
    """Read a control-vector GGUF (ours, repeng's or one made for llama.cpp)."""
    import gguf

    p = Path(path).expanduser()
    if not p.is_file():
        raise SteerkitError(f"control vector file {p} does not exist")
    try:
        r = gguf.GGUFReader(str(p))
    except Exception as e:  # gguf raises ValueError, struct.error, IndexError... on bad files
        raise SteerkitError(f"{p} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None
    arch = r.get_field("general.architecture")
    if arch is not None and _field_str(arch) != ARCH:
        raise SteerkitError(f"{p} is a GGUF of architecture {_field_str(arch)!r}, not a control vector ({ARCH!r})")
    hint = r.get_field(KEY_HINT)
    vectors: dict[int, torch.Tensor] = {}
    for t in r.tensors:
        if not t.name.startswith(TENSOR_PREFIX):
            continue
        try:
            layer = int(t.name[len(TENSOR_PREFIX) :])
        except ValueError:
            raise SteerkitError(f"{p}: tensor {t.name!r} is not named direction.<layer>") from None
        v = torch.from_numpy(t.data.copy()).float().reshape(-1)
        if not torch.isfinite(v).all():
            raise SteerkitError(f"{p}: {t.name} has NaN or infinite entries")
        vectors[layer] = v
    if not vectors:
        raise SteerkitError(f"{p} has no direction.<layer> tensors: not a control vector")
    sk: dict[str, Any] = {}
    mf = r.get_field("steerkit.meta")
    if mf is not None:
        try:
            sk = json.loads(_field_str(mf))
        except ValueError:
            sk = {}
    return ControlVectorFile(model_hint=_field_str(hint) if hint is not None else "", vectors=vectors, steerkit=sk)


def export_plain(d: Direction, path: str | os.PathLike, fmt: str, strength: float = 1.0, force: bool = False) -> Path:
    """Write one direction as a plain vector, ``.npy`` (numpy) or ``.pt`` (a torch tensor), scaled
    to ``strength`` median token norms: the files :func:`load_plain_vector` reads."""
    if fmt not in ("npy", "pt"):
        raise SteerkitError(f"a plain vector is npy or pt, not {fmt!r}")
    vec = (d.vector * (strength * d.median_norm)).float().contiguous()
    with atomic_path(path, force) as tmp:
        if fmt == "npy":
            import numpy as np

            with open(tmp, "wb") as f:
                np.save(f, vec.numpy())
        else:
            torch.save(vec, tmp)
    return Path(path)


def load_plain_vector(path: str | os.PathLike) -> torch.Tensor:
    """A plain vector from ``.npy`` (no pickles) or ``.pt`` (tensors only): ``[d_model]`` float32.

    ``[1, d_model]`` is squeezed; a ``.pt`` dict with exactly one tensor is accepted.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise SteerkitError(f"vector file {p} does not exist")
    suf = p.suffix.lower()
    try:
        if suf == ".npy":
            import numpy as np

            v = torch.from_numpy(np.load(p, allow_pickle=False).copy())
        elif suf in (".pt", ".pth"):
            try:
                with warnings.catch_warnings():  # torch's advice to unpickle untrusted files is not ours
                    warnings.simplefilter("ignore")
                    obj = torch.load(p, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                what = ("holds pickled objects other than tensors, which steerkit refuses" if "Unsupported global" in str(e)
                        else "is not a plain tensor file, or holds pickled objects, which steerkit refuses")
                raise SteerkitError(
                    f"{p} {what} (unpickling can run code; nothing from it ran): save the bare vector, torch.save(tensor, path), or as .npy"
                ) from None
            if isinstance(obj, dict):
                ts = [x for x in obj.values() if isinstance(x, torch.Tensor)]
                if len(ts) != 1:
                    raise SteerkitError(f"{p} holds a dict with {len(ts)} tensors; save the one vector by itself")
                obj = ts[0]
            if not isinstance(obj, torch.Tensor):
                raise SteerkitError(f"{p} holds a {type(obj).__name__}, not a tensor")
            v = obj
        else:
            raise SteerkitError(f"{p}: unknown vector format {suf!r}; use .gguf, .npy or .pt")
    except SteerkitError:
        raise
    except Exception as e:
        with open(p, "rb") as fh:
            npy = fh.read(6) == b"\x93NUMPY"
        if suf == ".npy" and npy and "allow_pickle" in str(e):
            raise SteerkitError(f"{p} holds a pickled object array, which steerkit refuses (unpickling can run code; nothing from it ran): save a float array with np.save") from None
        raise SteerkitError(f"{p} could not be read as {suf} ({type(e).__name__}): it is truncated, corrupt or not a {suf} file; save the vector again") from None
    v = v.detach().float()
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 1:
        raise SteerkitError(f"{p} holds shape {tuple(v.shape)}; a steering vector is 1-D [d_model]")
    return v


def vector_to_direction(
    vector: torch.Tensor,
    model: LoadedModel,
    layer: int,
    *,
    name: str,
    median_norm: float,
    source: str,
    description: str = "",
) -> Direction:
    """An ``imported`` Direction for ``model`` (a LoadedModel) from a raw vector.

    The raw norm is kept in provenance; ``strength = raw_norm / median_norm`` reproduces it.
    """
    if vector.shape != (model.d_model,):
        raise SteerkitError(f"{source}: vector has {vector.numel()} entries but {model.name} has d_model {model.d_model}")
    check_layer(layer, model.n_layers)
    raw = float(vector.norm())
    if raw == 0:
        raise SteerkitError(f"{source}: vector for layer {layer} is all zeros")
    prov = {"imported_from": source, "raw_norm": raw, "strength_of_raw": raw / median_norm}
    return from_vector(vector, name=name, model=model, layer=layer, kind="imported", median_norm=median_norm, description=description, provenance=prov)
