"""LoRA adapters merged into a loaded model in place, and taken out again, without PEFT.

:func:`read_lora` reads a PEFT LoRA adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) as :class:`LoraModule` s: each adapted Linear's ``A`` and ``B``
with the scaling PEFT gives it. :class:`AdapterSwap` merges one adapter into ONE loaded model
(a :class:`~steerkit.models.LoadedModel`): it keeps a copy of the base weight of every Linear an
adapter touches and sets ``W = W0 + scale * B @ A`` as PEFT's ``merge_and_unload`` computes it
(same operations, same order: the weights equal :func:`steerkit.models.load_tuned`'s bit for
bit). The bridge and the plain twin that generation runs on share those parameter tensors, so
both see every swap. A run continued from another adapter (``steerkit finetune --tuned``) is
saved as one standalone adapter, so it swaps in like any other.

What it leaves out: other PEFT types, DoRA, LoRA biases, embedding adapters and
``modules_to_save`` (refused: their merge is not ``W + scale * B @ A``), and training.
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from steerkit.errors import SteerkitError
from steerkit.fsutil import read_json
from steerkit.models import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoadedModel, check_weight_files

_PEFT_PREFIX = "base_model.model."
_BRIDGE_PART = "._original_component"


@dataclass(frozen=True)
class LoraModule:
    """One adapted Linear: ``delta = transpose(B @ A) * scaling`` (PEFT's get_delta_weight)."""

    module: str  # the module's name in the plain HF model, e.g. model.layers.0.self_attn.q_proj
    A: torch.Tensor = field(repr=False)  # [r, in]
    B: torch.Tensor = field(repr=False)  # [out, r]
    scaling: float
    fan_in_fan_out: bool = False

    def delta(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        a, b = self.A.to(device), self.B.to(device)
        cast = device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if cast:
            a, b = a.float(), b.float()
        else:
            a, b = a.to(dtype), b.to(dtype)
        d = b @ a
        if self.fan_in_fan_out:
            d = d.T
        d = d * self.scaling
        return d.to(dtype) if cast else d


def _pattern_value(patterns: Any, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches the end of the module name."""
    if isinstance(patterns, dict):
        for key, v in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return float(v)
    return default


def read_lora(folder: str | os.PathLike) -> list[LoraModule]:
    """The LoRA matrices of a PEFT adapter folder with their scaling, read from its
    ``adapter_config.json`` (r, lora_alpha, use_rslora, alpha_pattern, fan_in_fan_out) and
    ``adapter_model.safetensors``. Refuses what cannot be merged as ``W + scale * B @ A``:
    other PEFT types, DoRA, LoRA biases, embedding adapters and ``modules_to_save``."""
    d = Path(folder).expanduser()
    cfg = read_json(d / ADAPTER_CONFIG)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise SteerkitError(f"{d} is a {cfg.get('peft_type')} adapter: only LoRA adapters can be swapped in")
    if cfg.get("use_dora"):
        raise SteerkitError(f"{d} is a DoRA adapter: track swaps plain LoRA only (its merge is not W + scale * B @ A)")
    files = check_weight_files(d, "adapter", "adapter_model*.safetensors")
    if not files:
        raise SteerkitError(f"{d} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: copy the adapter's weights there")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    odd = [k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise SteerkitError(
            f"{d} holds {odd[0]!r}, not only LoRA A/B matrices of Linear layers: track cannot swap it in place; "
            f"use `steerkit sweep --tuned` on each checkpoint instead"
        )
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    out: list[LoraModule] = []
    for key in sorted(k for k in weights if k.endswith(".lora_A.weight")):
        stem = key[: -len(".lora_A.weight")]
        b_key = f"{stem}.lora_B.weight"
        if b_key not in weights:
            raise SteerkitError(f"{d}: {key} has no matching {b_key}: the adapter is incomplete")
        a, b = weights[key], weights[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise SteerkitError(f"{d}: {key} {tuple(a.shape)} and {b_key} {tuple(b.shape)} do not make a LoRA pair")
        module = stem[len(_PEFT_PREFIX):] if stem.startswith(_PEFT_PREFIX) else stem
        r = int(a.shape[0])
        al = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        scaling = al / math.sqrt(r) if cfg.get("use_rslora") else al / r
        out.append(LoraModule(module, a, b, scaling, bool(cfg.get("fan_in_fan_out", False))))
    if not out:
        raise SteerkitError(f"{d / ADAPTER_WEIGHTS} holds no LoRA matrices")
    return out


def plain_name(name: str) -> str:
    """A parameter's name in the plain HF model (the bridge nests the original modules)."""
    return name.replace(_BRIDGE_PART, "")


class AdapterSwap:
    """Merge a LoRA adapter into one loaded model in place, and take it out again.

    ``apply(adapter)`` sets every weight the adapter touches to ``W0 + d(adapter)``; a weight
    that the previous adapter touched and this one does not returns to ``W0``. ``reset()``
    (and leaving a ``with`` block) restores the base exactly. The base copies of the touched
    weights are kept on the CPU.
    """

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._params: dict[str, torch.nn.Parameter] = {}
        for name, p in model.hf_model.named_parameters():
            self._params.setdefault(plain_name(name), p)
        self._base: dict[str, torch.Tensor] = {}
        self._dirty: set[str] = set()
        self.current: Path | None = None
        self._tuned0 = getattr(model, "tuned", None)

    def _param(self, module: str, folder: Path) -> torch.nn.Parameter:
        p = self._params.get(f"{module}.weight")
        if p is None:
            raise SteerkitError(
                f"adapter {folder} does not fit model {getattr(self.model, 'name', '?')}: it has no module {module!r}; "
                f"give the base model the adapter was trained on"
            )
        return p

    def _deltas(self, folder: Path) -> dict[str, list[LoraModule]]:
        """The adapter's LoRA modules by the weight they change, each checked against the model."""
        deltas: dict[str, list[LoraModule]] = defaultdict(list)
        for m in read_lora(folder):
            p = self._param(m.module, folder)
            want = (m.A.shape[1], m.B.shape[0]) if m.fan_in_fan_out else (m.B.shape[0], m.A.shape[1])
            if tuple(p.shape) != want:
                raise SteerkitError(
                    f"adapter {folder} does not fit model {getattr(self.model, 'name', '?')}: {m.module} is {tuple(p.shape)}, "
                    f"the adapter's delta {want}; give the base model the adapter was trained on"
                )
            deltas[f"{m.module}.weight"].append(m)
        return deltas

    @torch.no_grad()
    def apply(self, adapter: str | os.PathLike | None, tuned: dict[str, str] | None = None) -> None:
        """Merge the adapter folder ``adapter`` (None: none) into the base weights; ``tuned``
        goes to ``model.tuned`` (records name the tuned model by it). Nothing changes when the
        adapter does not fit the model."""
        folder = Path(adapter).expanduser().resolve() if adapter is not None else None
        deltas = self._deltas(folder) if folder is not None else {}
        for name in set(deltas) | self._dirty:
            p = self._params[name]
            if name not in self._base:
                self._base[name] = p.detach().to("cpu", copy=True)
            w = self._base[name].to(p.device, copy=True)
            for m in deltas.get(name, ()):
                w += m.delta(p.device, p.dtype).to(w.dtype)
            p.copy_(w)
        self._dirty = set(deltas)
        self.current = folder
        self.model.tuned = tuned if folder is not None else self._tuned0

    def reset(self) -> None:
        """Every swapped weight back to the base model's, exactly."""
        self.apply(None)

    def __enter__(self) -> AdapterSwap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reset()


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterSwap", "LoraModule", "plain_name", "read_lora"]
