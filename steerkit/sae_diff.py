"""Diff-SAEs: activations that are the tuned model's residual minus the base model's at one
layer, on the same tokens.

:class:`DiffActs` runs each buffer's chunks through the base model, then (for a LoRA adapter)
merges the adapter into the same loaded weights with :class:`steerkit.lora.AdapterSwap`, runs
the chunks again and takes the adapter out: one model in memory, two swaps per buffer. A full
fine-tuned model (a folder, .gguf or hub id, or a :class:`~steerkit.models.LoadedModel`) runs
as a second model instead.

An SAE trained on these differences (``steerkit sae train --diff --tuned ADAPTER``, BatchTopK
by default, about 2 x d_model latents) has decoder rows that are directions of the fine-tune by
construction: use them as vectors (``--add``); its encoder reads differences, not residuals, so
clamping or ablating its latents in one model's residual stream is not what it was made for.
Its ``cfg.json`` says so under ``steerkit.diff`` (adapter path and weight hash, base model).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from steerkit.errors import SteerkitError
from steerkit.finetune import check_adapter, is_adapter_dir, load_tuned, tuned_info
from steerkit.lora import AdapterSwap
from steerkit.models import DEFAULT_ALIAS, LoadedModel, peek_model
from steerkit.sae_chat import residual_acts


def check_tuned(tuned: str | os.PathLike, base: str | None = None) -> None:
    """A --tuned spec checked without loading weights: an adapter folder (LoRA, readable
    weights; it is swapped into ``base``, the model trained on), else a model spec
    :func:`steerkit.models.peek_model` accepts."""
    if is_adapter_dir(tuned):
        check_adapter(tuned, base or DEFAULT_ALIAS)
        return
    p = Path(str(tuned)).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise SteerkitError(f"--tuned {p} is neither a PEFT adapter folder (adapter_config.json) nor a model folder (config.json)")
    peek_model(tuned)


class DiffActs:
    """``(chunk ids, keep masks) -> tuned - base`` residuals at ``layer`` of the kept positions."""

    def __init__(self, model: LoadedModel, tuned: Any, layer: int, device: torch.device) -> None:
        self.model, self.layer, self.device = model, layer, device
        self.swap: AdapterSwap | None = None
        self.adapter: Path | None = None
        self.tuned_model: Any = None
        if isinstance(tuned, (str, os.PathLike)) and is_adapter_dir(tuned):
            self.adapter = Path(tuned).expanduser().resolve()
            self.swap = AdapterSwap(model)
            self.swap._deltas(self.adapter)  # refuses an adapter that does not fit, before any work
            self.info = {"tuned": str(self.adapter), **tuned_info(self.adapter, list(self.adapter.glob("adapter_model*.safetensors"))),
                         "how": "LoRA swapped into the base weights"}
        elif isinstance(tuned, (str, os.PathLike)):
            self.tuned_model = load_tuned(tuned, device=str(model.device), dtype=model.dtype)
            self.info = {"tuned": str(tuned), **(self.tuned_model.tuned or {}), "how": "second model"}
        else:
            self.tuned_model = tuned
            self.info = {"tuned": getattr(tuned, "source", "") or getattr(tuned, "name", "?"), **(getattr(tuned, "tuned", None) or {}),
                         "how": "second model"}
        if self.tuned_model is not None and self.tuned_model.d_model != model.d_model:
            raise SteerkitError(f"--tuned has d_model {self.tuned_model.d_model}, the base model {model.d_model}: give a fine-tune of {model.name}")
        self.info["base"] = model.name
        self.info["layer"] = layer
        self.info["difference"] = "tuned minus base residual, same tokens"

    def __call__(self, ids_l: list[torch.Tensor], keep_l: list[torch.Tensor]) -> torch.Tensor:
        base = residual_acts(self.model, self.layer, self.device)(ids_l, keep_l)
        if self.swap is not None:
            try:
                self.swap.apply(self.adapter)
                tuned = residual_acts(self.model, self.layer, self.device)(ids_l, keep_l)
            finally:
                self.swap.reset()
        else:
            tuned = residual_acts(self.tuned_model, self.layer, self.device)(ids_l, keep_l)
        tuned -= base
        return tuned


__all__ = ["DiffActs", "check_tuned"]
