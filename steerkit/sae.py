"""Sparse autoencoders: TopK, ReLU and JumpReLU; SAELens-format folders in and out, sparsify and
dictionary_learning folders in.

An SAE reads residual activations ``x [..., d_in]`` and writes latents ``a [..., d_sae]``::

    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    a   = topk(relu(pre), k)          # "topk"
        = relu(pre)                   # "relu" (SAELens: "standard")
        = pre * (pre > threshold)     # "jumprelu"
    x_hat = a @ W_dec + b_dec

Row ``i`` of ``W_dec`` is latent ``i``'s direction. SAEs steerkit trains are saved in raw
residual units with unit-norm decoder rows (the training-time input scaling is folded into the
weights), so a latent's activation is its coefficient along that unit row.

On disk (the SAELens format, which :func:`save_sae` writes): a folder with ``cfg.json`` and
``sae_weights.safetensors`` holding ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and ``threshold [d_sae]`` for JumpReLU. Both SAELens
config layouts load: v6 (``architecture``, ``k``, hook name under ``metadata``/``meta``) and v5
(``hook_name`` at top level, ``activation_fn_str: "topk"`` with ``activation_fn_kwargs.k``).
``rescale_acts_by_decoder_norm`` is folded into the weights on load; run-time
``constant_norm_rescale`` and ``layer_norm`` input normalisation are applied in
:meth:`SAE.encode`/:meth:`SAE.decode`. :func:`load_sae` also reads EleutherAI sparsify folders
(``cfg.json`` + ``sae.safetensors``) and saprmarks/dictionary_learning folders (``config.json`` +
``ae.pt``, read tensors-only), converting them as :mod:`steerkit.sae_formats` describes.

Training lives in :mod:`steerkit.sae_train`, metrics and interpretation in
:mod:`steerkit.sae_eval`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from steerkit.errors import SteerkitError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"

Architecture = Literal["topk", "relu", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
_ARCH_ALIASES = {"topk": "topk", "standard": "relu", "relu": "relu", "jumprelu": "jumprelu"}
Norm = Literal["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
NORMS: tuple[str, ...] = get_args(Norm)


@dataclass(frozen=True)
class SAEConfig:
    """What an SAE is and where it reads from. ``extra`` keeps unknown cfg.json keys."""

    architecture: Architecture
    d_in: int
    d_sae: int
    k: int | None = None  # topk only
    hook_name: str | None = None
    model_name: str | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: Norm = "none"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SteerkitError(f"SAE architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SteerkitError(f"SAE sizes must be positive, got d_in {self.d_in}, d_sae {self.d_sae}")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise SteerkitError(f"a topk SAE needs 0 < k <= d_sae ({self.d_sae}), got k {self.k}")
        if self.normalize_activations not in NORMS:
            raise SteerkitError(f"normalize_activations {self.normalize_activations!r} is not one of {', '.join(NORMS)}")

    @property
    def layer(self) -> int | None:
        import re

        m = re.search(r"blocks\.(\d+)\.", self.hook_name or "")
        return int(m.group(1)) if m else None

    def to_json(self) -> dict[str, Any]:
        """cfg.json as SAELens v6 writes it (plus v5's top-level hook keys, which it ignores)."""
        arch = "standard" if self.architecture == "relu" else self.architecture
        meta = {"model_name": self.model_name, "hook_name": self.hook_name, "hook_layer": self.layer, "hook_head_index": None, "prepend_bos": True}
        d: dict[str, Any] = {
            "architecture": arch,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": "none",
            "metadata": meta,
            "model_name": self.model_name,
            "hook_name": self.hook_name,
            "hook_layer": self.layer,
        }
        if self.architecture == "topk":
            d["k"] = self.k
            d["rescale_acts_by_decoder_norm"] = False
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d


def config_from_json(raw: dict[str, Any], where: str = "cfg.json") -> tuple[SAEConfig, bool]:
    """Parse a SAELens cfg.json (v5 or v6). Returns (config, rescale_acts_by_decoder_norm)."""
    arch_raw = str(raw.get("architecture") or "standard")
    act_fn = str(raw.get("activation_fn_str") or raw.get("activation_fn") or "relu")
    if arch_raw == "standard" and act_fn == "topk":
        arch_raw = "topk"  # SAELens v5 spelled TopK as a standard SAE with a topk activation
    arch = _ARCH_ALIASES.get(arch_raw)
    if arch is None:
        raise SteerkitError(f"{where}: SAE architecture {arch_raw!r} is not supported (steerkit reads {', '.join(_ARCH_ALIASES)})")
    meta = raw.get("metadata") or raw.get("meta") or {}
    k = raw.get("k")
    if k is None:
        k = (raw.get("activation_fn_kwargs") or {}).get("k")
    if k is not None and float(k) != int(float(k)):
        raise SteerkitError(f"{where}: k {k} is not a whole number")
    try:
        d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise SteerkitError(f"{where}: needs integer 'd_in' and 'd_sae'") from None
    known = {"architecture", "d_in", "d_sae", "k", "hook_name", "model_name", "apply_b_dec_to_input", "normalize_activations", "dtype", "metadata", "meta", "activation_fn_kwargs"}
    cfg = SAEConfig(
        architecture=arch,  # type: ignore[arg-type]
        d_in=d_in,
        d_sae=d_sae,
        k=int(float(k)) if k is not None and arch == "topk" else None,
        hook_name=meta.get("hook_name") or raw.get("hook_name"),
        model_name=meta.get("model_name") or raw.get("model_name"),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=str(raw.get("normalize_activations") or "none"),  # type: ignore[arg-type]
        dtype=str(raw.get("dtype") or "float32"),
        extra={k: v for k, v in raw.items() if k not in known},
    )
    return cfg, bool(raw.get("rescale_acts_by_decoder_norm", False))


class SAE(nn.Module):
    """An SAE with SAELens parameter names. Shapes: ``encode [..., d_in] -> [..., d_sae]``."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    @property
    def hook_name(self) -> str | None:
        return self.cfg.hook_name

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    # -- the forward pass -----------------------------------------------------------------------

    def _norm_in(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            c = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            return x * c, c
        if mode == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), (mu, std)
        return x, None

    def _norm_out(self, x: torch.Tensor, state: Any) -> torch.Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x / state
        if mode == "layer_norm":
            mu, std = state
            return x * std + mu
        return x

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of already-normalised input: ``[..., d_in] -> [..., d_sae]``."""
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "topk":
            vals, idx = pre.topk(int(self.cfg.k or 1), dim=-1)  # (..., k)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if arch == "jumprelu":
            return pre * (pre > self.threshold).to(pre.dtype) * (pre > 0).to(pre.dtype)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw residual activations ``[..., d_in]`` -> latent activations ``[..., d_sae]``."""
        xn, _ = self._norm_in(x.to(self.W_enc.dtype))
        return self.activate(self.pre_acts(xn))

    def decode(self, a: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Latents ``[..., d_sae]`` -> reconstruction ``[..., d_in]``. Input normalisation
        that depends on ``x`` (``constant_norm_rescale``, ``layer_norm``) needs ``x``."""
        out = a.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if x is None:
                raise SteerkitError(f"this SAE normalises its input ({self.cfg.normalize_activations}): decode needs x")
            _, state = self._norm_in(x.to(self.W_enc.dtype))
            out = self._norm_out(out, state)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x``: ``[..., d_in] -> [..., d_in]``."""
        return self.decode(self.encode(x), x)

    def direction(self, latent: int) -> torch.Tensor:
        """Unit vector of latent ``latent``'s decoder row: ``[d_in]``."""
        check_latents(self, [latent])
        w = self.W_dec[latent].detach().float()
        return w / w.norm().clamp(min=1e-12)

    # -- weight surgery -------------------------------------------------------------------------

    @torch.no_grad()
    def fold_decoder_norm(self) -> None:
        """Make decoder rows unit norm without changing the reconstruction (activations scale)."""
        n = self.W_dec.norm(dim=-1).clamp(min=1e-12)  # (d_sae,)
        self.W_dec.div_(n[:, None])
        self.W_enc.mul_(n[None, :])
        self.b_enc.mul_(n)
        if self.cfg.architecture == "jumprelu":
            self.threshold.mul_(n)

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """An SAE trained on ``x * s`` becomes one that reads raw ``x``; latents scale by 1/s."""
        self.b_enc.div_(s)
        self.b_dec.div_(s)
        if self.cfg.architecture == "jumprelu":
            self.threshold.div_(s)

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "architecture": c.architecture,
            "d_in": c.d_in,
            "d_sae": c.d_sae,
            "k": c.k,
            "hook_name": c.hook_name,
            "layer": c.layer,
            "model_name": c.model_name,
            "normalize_activations": c.normalize_activations,
            "apply_b_dec_to_input": c.apply_b_dec_to_input,
            "decoder_row_norm_mean": float(self.W_dec.detach().norm(dim=-1).mean()),
        }


def check_latents(sae: Any, latents: Any) -> list[int]:
    d_sae = int(sae.W_dec.shape[0])
    ids = [int(i) for i in latents]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise SteerkitError(f"unknown latent {bad[0]}: the SAE has {d_sae} latents (0 to {d_sae - 1})")
    return ids


# --- files ------------------------------------------------------------------------------------


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder: SAELens (``cfg.json`` + ``sae_weights.safetensors``), EleutherAI
    sparsify (``cfg.json`` + ``sae.safetensors``) or dictionary_learning (``config.json`` +
    ``ae.pt``), see :mod:`steerkit.sae_formats`. The SAE's ``source_format`` says which."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from steerkit.sae_formats import load_foreign, locate

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


def save_sae(sae: SAE, path: str | os.PathLike, force: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``sae`` as a SAELens-format folder. Refuses to overwrite an SAE without ``force``."""
    from safetensors.torch import save_file

    from steerkit.fsutil import atomic_path, atomic_write_text

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

    from steerkit.fsutil import atomic_write_bytes

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


def new_sae(architecture: str, d_in: int, d_sae: int, k: int | None = None, hook_name: str | None = None, model_name: str | None = None, seed: int = 0) -> SAE:
    """A freshly initialised SAE: random unit decoder rows, encoder = decoder transposed."""
    cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, k=k, hook_name=hook_name, model_name=model_name)  # type: ignore[arg-type]
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_sae, d_in, generator=g)
    w = w / w.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
    return sae


def latent_direction(sae: SAE, sae_path: str | os.PathLike, latents: Any, model: Any, layer: int | None = None, name: str | None = None, median_norm: float | None = None, description: str = "") -> Any:
    """A Direction (kind ``sae-latent``/``sae-latents``) for one latent or a latent set: the
    unit sum of their unit decoder rows, carrying the SAE folder and latent ids so clamp and
    ablate act on the latents themselves."""
    from steerkit.directions import from_vector

    ids = check_latents(sae, list(latents) if not isinstance(latents, int) else [latents])
    if not ids:
        raise SteerkitError("give at least one latent")
    L = layer if layer is not None else sae.cfg.layer
    if L is None:
        raise SteerkitError(f"cannot tell the SAE's layer from its hook name {sae.cfg.hook_name!r}: give the layer")
    W = sae.W_dec.detach().float().cpu()[ids]
    vec = (W / W.norm(dim=-1, keepdim=True).clamp(min=1e-12)).sum(0)
    if median_norm is None:
        from steerkit.activations import default_norm_chats, median_token_norm

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
