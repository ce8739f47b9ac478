"""How good an SAE is, and what a latent means.

:func:`evaluate` runs packed chunks of held-out text through the model and reports, over all
tokens but each chunk's first:

* ``explained_variance`` = 1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2;
* ``l0`` (mean active latents per token), ``dead_fraction`` (latents that never fired),
  ``dense_fraction`` (latents firing on more than ``dense_threshold`` of tokens);
* next-token cross-entropy of the clean model, with the SAE's reconstruction spliced in at the
  layer (``ce_sae``), with reconstruction + error term (``ce_sae_with_error``: must equal clean,
  a check of the splice), and with the residual zero-ablated (``ce_zero``), and
  ``loss_recovered`` = (ce_zero - ce_sae) / (ce_zero - ce_clean).

Position 0 stays untouched in every splice (its activation is the attention sink).

:func:`top_contexts` finds the chunks of a corpus where a latent fires most and returns a
token window with per-token activations; the logit lens is
:func:`steerkit.extract.promoted_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from steerkit.corpus import Document
from steerkit.errors import SteerkitError
from steerkit.models import LoadedModel, bridge_hooks
from steerkit.sae import check_latents
from steerkit.sae_train import ChunkStream, chunk_activations


@dataclass(frozen=True)
class SAEMetrics:
    explained_variance: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    ce_clean: float
    ce_sae: float
    ce_sae_with_error: float
    ce_zero: float
    loss_recovered: float
    n_tokens: int
    mse: float
    # per-latent firing frequency [d_sae] (fraction of tokens where the latent is active); not
    # part of to_dict: `steerkit sae eval --save` writes it beside the SAE (steerkit.sae.FIRING_FILE)
    firing: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "firing"}  # no deep copy of firing


def _splice_ce(model: LoadedModel, ids: torch.Tensor, layer: int, fn: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[float, int]:
    """Summed next-token CE over ``ids [B, T]`` (predictions from positions 1..T-2) with the
    residual at ``layer`` (positions >= 1) replaced by ``fn(x)``."""
    hooks = []
    if fn is not None:

        def hook(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
            y = x.clone()
            y[:, 1:] = fn(x[:, 1:].float()).to(x.dtype)
            return y

        hooks.append((layer, hook))
    with bridge_hooks(model, hooks), torch.inference_mode():
        logits = model.hf_model(input_ids=ids.to(model.device), use_cache=False).logits  # (B, T, V)
    lp = logits[:, 1:-1].float().log_softmax(-1)
    tgt = ids[:, 2:].to(lp.device)
    nll = -lp.gather(-1, tgt[..., None]).squeeze(-1)
    return float(nll.sum()), int(nll.numel())


@torch.inference_mode()
def evaluate(
    model: LoadedModel,
    sae: Any,
    docs: Sequence[Document],
    layer: int | None = None,
    n_tokens: int = 20_000,
    context: int = 256,
    batch: int = 8,
    dense_threshold: float = 0.1,
    seed: int = 0,
    with_ce: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> SAEMetrics:
    """Metrics of ``sae`` on about ``n_tokens`` tokens of ``docs`` (packed, shuffled by seed)."""
    L = layer if layer is not None else sae.cfg.layer
    if L is None:
        raise SteerkitError("cannot tell the SAE's layer from its hook name: give the layer")
    if int(sae.W_dec.shape[1]) != model.d_model:
        raise SteerkitError(f"the SAE reads d_in {int(sae.W_dec.shape[1])}, but {model.name} has d_model {model.d_model}")
    stream = ChunkStream(model, docs, context, seed, cycle=False)
    d_sae = int(sae.W_dec.shape[0])
    fires = torch.zeros(d_sae, dtype=torch.float64)
    s_err = s_x2 = 0.0
    sum_x = torch.zeros(model.d_model, dtype=torch.float64)
    s_l0 = 0.0
    n = 0
    ce = {"clean": [0.0, 0], "sae": [0.0, 0], "err": [0.0, 0], "zero": [0.0, 0]}
    while n < n_tokens:
        ids = stream.next_chunks(batch)
        if ids is None:
            break
        x = chunk_activations(model, ids, L).float()  # (N, D)
        a = sae.encode(x.to(sae.W_dec.device))
        x_hat = sae.decode(a, x.to(sae.W_dec.device)).to(x.device).float()
        s_err += float((x - x_hat).double().pow(2).sum())
        sum_x += x.double().sum(0).cpu()
        s_x2 += float(x.double().pow(2).sum())
        fires += (a > 0).double().sum(0).cpu()
        s_l0 += float((a > 0).double().sum())
        n += x.shape[0]
        if with_ce:
            dev = sae.W_dec.device

            def recon(v: torch.Tensor) -> torch.Tensor:
                return sae(v.to(dev)).to(v.device)

            def recon_err(v: torch.Tensor) -> torch.Tensor:
                return recon(v) + (v - recon(v))

            for key, fn in (("clean", None), ("sae", recon), ("err", recon_err), ("zero", torch.zeros_like)):
                s, c = _splice_ce(model, ids, L, fn)
                ce[key][0] += s
                ce[key][1] += c
        if on_progress is not None:
            on_progress(min(n, n_tokens), n_tokens)
    if n == 0:
        raise SteerkitError("no held-out tokens to evaluate on: give a larger corpus or a shorter --context")
    mean = sum_x / n
    total_var = s_x2 - n * float(mean.pow(2).sum())
    ev = 1.0 - s_err / total_var
    freq = fires / n
    c = {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in ce.items()}
    denom = c["zero"] - c["clean"]
    rec = (c["zero"] - c["sae"]) / denom if with_ce and denom != 0 else float("nan")
    return SAEMetrics(
        explained_variance=ev,
        l0=s_l0 / n,
        dead_fraction=float((freq == 0).double().mean()),
        dense_fraction=float((freq > dense_threshold).double().mean()),
        ce_clean=c["clean"],
        ce_sae=c["sae"],
        ce_sae_with_error=c["err"],
        ce_zero=c["zero"],
        loss_recovered=rec,
        n_tokens=n,
        mse=s_err / n,
        firing=freq.float(),
    )


@dataclass(frozen=True)
class Context:
    """A token window around a latent's peak: ``tokens[i]`` fired at ``acts[i]``."""

    max_act: float
    tokens: list[str]
    acts: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def top_contexts(
    model: LoadedModel,
    sae: Any,
    docs: Sequence[Document],
    latent: int,
    layer: int | None = None,
    n_tokens: int = 50_000,
    top: int = 10,
    window: int = 12,
    context: int = 128,
    batch: int = 8,
    seed: int = 0,
) -> tuple[list[Context], float]:
    """The ``top`` windows where ``latent`` fires most (one per chunk) and its firing frequency."""
    check_latents(sae, [latent])
    L = layer if layer is not None else sae.cfg.layer
    if L is None:
        raise SteerkitError("cannot tell the SAE's layer from its hook name: give the layer")
    stream = ChunkStream(model, docs, context, seed, cycle=False)
    best: list[tuple[float, list[int], list[float]]] = []
    n = fired = 0
    while n < n_tokens:
        ids = stream.next_chunks(batch)
        if ids is None:
            break
        x = chunk_activations(model, ids, L)
        a = sae.encode(x.to(sae.W_dec.device))[:, latent].float().cpu().reshape(ids.shape[0], -1)  # (B, T-1)
        n += a.numel()
        fired += int((a > 0).sum())
        for b in range(ids.shape[0]):
            m, j = a[b].max(0)
            if float(m) <= 0:
                continue
            j = int(j) + 1  # position in the chunk
            lo, hi = max(1, j - window), min(ids.shape[1], j + window // 3 + 1)
            best.append((float(m), ids[b, lo:hi].tolist(), a[b, lo - 1 : hi - 1].tolist()))
        best = sorted(best, key=lambda t: -t[0])[:top]
    tok = model.tokenizer
    out = [Context(m, [tok.decode([t]) for t in ts], acts) for m, ts, acts in best]
    return out, fired / max(n, 1)
