"""SAE folders: SAELens-format folders in and out, sparsify and dictionary_learning folders in;
firing frequencies beside them; directions from latents.

The SAE itself (its config and module: TopK, ReLU and JumpReLU, encode and decode) is
:mod:`steerkit.sae_core`'s; its names are importable from here too (``steerkit.sae.SAE``).

On disk (the SAELens format, which :func:`save_sae` writes): a folder with ``cfg.json`` and
``sae_weights.safetensors`` holding ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and ``threshold [d_sae]`` for JumpReLU. Both SAELens
config layouts load: v6 (``architecture``, ``k``, hook name under ``metadata``/``meta``) and v5
(``hook_name`` at top level, ``activation_fn_str: "topk"`` with ``activation_fn_kwargs.k``).
``rescale_acts_by_decoder_norm`` is folded into the weights on load. :func:`load_sae` also
reads EleutherAI sparsify folders (``cfg.json`` + ``sae.safetensors``) and
saprmarks/dictionary_learning folders (``config.json`` + ``ae.pt``, read tensors-only),
converting them as :mod:`steerkit.sae_formats` describes.

Training lives in :mod:`steerkit.sae_train`, metrics and interpretation in
:mod:`steerkit.sae_eval`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from steerkit.activations import default_norm_chats, median_token_norm
from steerkit.directions import Direction, find_sae, from_vector
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_path, atomic_write_bytes, atomic_write_text
from steerkit.models import LoadedModel
from steerkit.sae_core import ARCHITECTURES, NORMS, SAE, Architecture, Norm, SAEConfig, check_latents, config_from_json, new_sae  # noqa: F401 - re-exported: the SAE's names
from steerkit.sae_formats import load_foreign, locate

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"


# --- files ------------------------------------------------------------------------------------


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder: SAELens (``cfg.json`` + ``sae_weights.safetensors``), EleutherAI
    sparsify (``cfg.json`` + ``sae.safetensors``) or dictionary_learning (``config.json`` +
    ``ae.pt``), see :mod:`steerkit.sae_formats`. The SAE's ``source_format`` says which."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, fmt = locate(path)
    if fmt != "saelens":
        return load_foreign(folder, fmt).to(device)
    cfg_path, w_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SteerkitError(f"{cfg_path} is not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise SteerkitError(f"{cfg_path}: expected a JSON object")
    cfg, rescale = config_from_json(raw, str(cfg_path))
    try:
        w = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise SteerkitError(f"{w_path} is not a readable safetensors file ({e})") from None
    want = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "W_dec": (cfg.d_sae, cfg.d_in), "b_dec": (cfg.d_in,)}
    if cfg.architecture == "jumprelu":
        if "threshold" not in w and "log_threshold" in w:
            w["threshold"] = w.pop("log_threshold").exp()
        want["threshold"] = (cfg.d_sae,)
    if "b_enc" not in w and cfg.architecture == "topk":
        w["b_enc"] = torch.zeros(cfg.d_sae)
    for name, shape in want.items():
        if name not in w:
            raise SteerkitError(f"{w_path}: tensor {name!r} is missing (has {', '.join(sorted(w))})")
        if tuple(w[name].shape) != shape:
            raise SteerkitError(f"{w_path}: {name} has shape {tuple(w[name].shape)}, expected {shape} from {CFG_FILE}")
    sae = SAE(cfg)
    with torch.no_grad():
        for name in want:
            getattr(sae, name).copy_(w[name].float())
    if rescale:
        sae.fold_decoder_norm()
    sae.requires_grad_(False)
    sae.source_format = "saelens"
    return sae.to(device)


def load_sae_for(spec: str | os.PathLike, model: LoadedModel) -> SAE:
    """The SAE ``spec`` names (a folder, or a shipped name such as ``sae-l15``) for ``model``: on
    its device, and refused with one line when its width is not the model's."""
    path = find_sae(str(spec), model.name)
    sae = load_sae(path, device=model.device)
    if sae.cfg.d_in != model.d_model:
        raise SteerkitError(f"SAE {spec} reads d_in {sae.cfg.d_in}, but {model.name} has d_model {model.d_model}")
    return sae


def sae_layer(sae: SAE, path: str | os.PathLike) -> int:
    """The residual layer an SAE reads, from its hook name (``blocks.<L>.hook_...``)."""
    hook = getattr(sae.cfg, "hook_name", None)
    cfg = Path(path) / "cfg.json"
    if hook is None and cfg.is_file():
        hook = json.loads(cfg.read_text(encoding="utf-8")).get("hook_name")
    m = re.search(r"blocks\.(\d+)\.", str(hook or ""))
    if not m:
        raise SteerkitError(f"cannot tell the SAE's layer from its hook name {hook!r}: pass --layer")
    return int(m.group(1))


def save_sae(sae: SAE, path: str | os.PathLike, force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``sae`` as a SAELens-format folder. Refuses to overwrite an SAE without ``force``."""
    from safetensors.torch import save_file

    folder = Path(path).expanduser()
    if (folder / WEIGHTS_FILE).exists() and not force:
        raise SteerkitError(f"{folder} already holds an SAE: pass --force to overwrite it")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.cfg.architecture == "jumprelu":
        tensors["threshold"] = sae.threshold
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(folder / WEIGHTS_FILE, force=True) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / CFG_FILE, json.dumps(sae.cfg.to_json(), indent=2) + "\n", force=True)
    for name, text in (extra_files or {}).items():
        atomic_write_text(folder / name, text, force=True)
    return folder


FIRING_FILE = "firing.safetensors"


def save_firing(folder: str | os.PathLike, frequency: torch.Tensor, meta: dict[str, Any]) -> Path:
    """Write each latent's firing frequency (``[d_sae]``, fraction of tokens) beside an SAE:
    matched-latent controls (:func:`steerkit.controls.matched_latents`) read it."""
    from safetensors.torch import save

    m = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}
    return atomic_write_bytes(Path(folder) / FIRING_FILE, save({"frequency": frequency.detach().float().cpu().contiguous()}, metadata=m), force=True)


def load_firing(folder: str | os.PathLike) -> tuple[torch.Tensor, dict[str, str]] | None:
    """(frequency [d_sae], metadata) written by ``steerkit sae eval --save``; None when absent."""
    p = Path(folder) / FIRING_FILE
    if not p.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            return f.get_tensor("frequency").float(), dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for a corrupt file
        raise SteerkitError(f"{p} is not a readable firing-frequency file ({e}): rerun `steerkit sae eval --save`") from None


def latent_set_vector(W_dec: torch.Tensor, ids: Sequence[int], weights: Sequence[float] | None = None, normalize_rows: bool = False) -> torch.Tensor:
    """The direction of these latents, before scaling: ``sum_i w_i W_dec[i]`` (float32, on the
    CPU; ``w_i`` 1 without ``weights``). ``normalize_rows`` sums unit decoder rows instead, so
    that each latent counts alike whatever its decoder norm.

    Its callers: ``steerkit extract --save`` and the screen's candidates (raw rows, weighted for a
    latent set), :func:`latent_direction` (unit rows). The two agree for an SAE whose decoder rows
    have unit norm, and for one latent up to the vector's norm."""
    if weights is not None and len(weights) != len(ids):
        raise SteerkitError(f"{len(weights)} weights for {len(ids)} latents; give one weight per latent")
    W = W_dec.detach()[list(ids)].float().cpu()  # the rows first: a big SAE's decoder stays where it is
    if normalize_rows:
        W = W / W.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    w = torch.ones(len(ids)) if weights is None else torch.tensor(list(weights), dtype=torch.float32)
    return (w[:, None] * W).sum(0)


def latent_direction(sae: SAE, sae_path: str | os.PathLike, latents: Any, model: LoadedModel, layer: int | None = None, name: str | None = None, median_norm: float | None = None, description: str = "") -> Direction:
    """A Direction (kind ``sae-latent``/``sae-latents``) for one latent or a latent set: the
    unit sum of their unit decoder rows, carrying the SAE folder and latent ids so clamp and
    ablate act on the latents themselves."""
    ids = check_latents(sae, list(latents) if not isinstance(latents, int) else [latents])
    if not ids:
        raise SteerkitError("give at least one latent")
    L = layer if layer is not None else sae.cfg.layer
    if L is None:
        raise SteerkitError(f"cannot tell the SAE's layer from its hook name {sae.cfg.hook_name!r}: give the layer")
    vec = latent_set_vector(sae.W_dec, ids, normalize_rows=True)
    if median_norm is None:
        median_norm = median_token_norm(model, default_norm_chats(), L)
    return from_vector(
        vec,
        name=name or ("latent-" + "-".join(str(i) for i in ids[:4]) + ("-etc" if len(ids) > 4 else "")),
        model=model,
        layer=L,
        kind="sae-latent" if len(ids) == 1 else "sae-latents",
        median_norm=median_norm,
        description=description or f"SAE latents {ids} of {Path(sae_path).name}",
        provenance={"sae_summary": asdict(replace(sae.cfg, extra={}))},
        sae=str(sae_path),
        latents=tuple(ids),
    )
