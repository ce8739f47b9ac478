"""Sparse autoencoders: TopK, ReLU and JumpReLU, as a config and a module.

An SAE reads residual activations ``x [..., d_in]`` and writes latents ``a [..., d_sae]``::

    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    a   = topk(relu(pre), k)          # "topk"
        = relu(pre)                   # "relu" (SAELens: "standard")
        = pre * (pre > threshold)     # "jumprelu"
    x_hat = a @ W_dec + b_dec

Row ``i`` of ``W_dec`` is latent ``i``'s direction. SAEs steerkit trains are saved in raw
residual units with unit-norm decoder rows (the training-time input scaling is folded into the
weights), so a latent's activation is its coefficient along that unit row. Run-time
``constant_norm_rescale`` and ``layer_norm`` input normalisation are applied in
:meth:`SAE.encode`/:meth:`SAE.decode`.

This is the SAE alone, with no files: :mod:`steerkit.sae` reads and writes SAE folders (and
hands on every name here), :mod:`steerkit.sae_formats` converts the other published layouts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import nn

from steerkit.errors import SteerkitError

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
