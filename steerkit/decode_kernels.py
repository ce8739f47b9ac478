"""What the unwrapped twin decodes with: grouped-query attention that does not copy the KV
cache, a KV cache that grows in place, the unembedding in vocabulary chunks, and a store of
prompt starts' KV caches (:class:`PrefixCache`) that later batches and requests reuse.

The first three compute the same numbers as transformers' own eager path (attention up to float
rounding, the other two bit for bit; the tests compare them) and are used only by the twin
that :mod:`steerkit.generate` decodes on: the bridge, extraction, SAEs and judging keep
transformers' modules as loaded. Measured in ``bench/bench_decode.py``.

**Attention.**
Transformers' eager attention (what steerkit loads models with, so that hooks see every
activation) first repeats each key/value head once per query head that shares it
(``repeat_kv``): on the default model (9 query heads, 3 key/value heads) every decode step
copies the whole KV cache three times over, 30 layers deep, and that copy was a fifth of a
batch-64 decode step. Here the query heads of a group are stacked instead and attend to
their shared key/value head in one matrix product, which is the same arithmetic on the same
numbers (equal to eager up to float rounding; the tests compare the two).

It is registered with transformers under :data:`NAME` (``AttentionInterface``, with the eager
mask). Calls it does not cover (dropout in
training, logit soft-capping, attention sinks, anything else a model passes beyond the mask
and scale) go to the model's own eager function unchanged.

**KV cache.** transformers' ``DynamicLayer`` concatenates every step (a copy of the whole
cache per layer per token); :class:`GrowingLayer` writes into spare room and reallocates only
every :data:`GROW` tokens; ``keys``/``values`` read as views of the filled part, and
assigning them (compaction, merging, trimming) works as before.

**Unembedding.** On CPU the (rows x 49k) logits matrix product runs faster in 2,048-column
pieces that stay in cache (each logit is the same dot product, so bit-identical).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import torch

NAME = "steerkit_grouped"
GROW = 64  # cache room added per reallocation, in tokens
CHUNK = 2048  # unembedding columns per matrix product

# keyword arguments models pass to attention that change nothing here (positions, cache
# bookkeeping, the layer's own settings that eager ignores too)
_BENIGN = {"position_ids", "cache_position", "output_attentions", "use_cache", "is_causal", "sliding_window",
           "position_embeddings", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention for ``query`` (B, H, q, d) over ``key``/``value`` (B, Hkv, T, d) with
    H a multiple of Hkv; returns ((B, q, H, d), weights (B, H, q, T)) like eager."""
    B, H, q, d = query.shape
    Hkv, T = key.shape[1], key.shape[2]
    extra = {k for k, v in kwargs.items() if v is not None} - _BENIGN
    if dropout or module.training or extra or H % Hkv or value.shape[1] != Hkv:
        return _model_eager(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    G = H // Hkv
    # head h attends with key/value head h // G (repeat_kv's order): stack each group's queries
    qg = query.reshape(B, Hkv, G * q, d)
    w = torch.matmul(qg, key.transpose(2, 3)) * scaling  # (B, Hkv, G*q, T)
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :T]
        w = (w.view(B, Hkv, G, q, T) + mask[:, :, None]).view(B, Hkv, G * q, T)
    w = torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w, value)  # (B, Hkv, G*q, d)
    return out.view(B, H, q, d).transpose(1, 2).contiguous(), w.view(B, H, q, T)


def _model_eager(module: torch.nn.Module) -> Any:
    """The eager attention function of ``module``'s own modelling file (transformers' generic
    one where the file has none)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:  # pragma: no cover - every decoder family in transformers 5 defines one
        raise RuntimeError(f"{type(module).__name__} has no eager attention to fall back on")
    return fn


def register() -> str:
    """Make :data:`NAME` a valid ``attn_implementation`` (idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(NAME, grouped_attention)
        AttentionMaskInterface.register(NAME, eager_mask)
    return NAME


def use_grouped(net: torch.nn.Module) -> bool:
    """Switch ``net`` (a twin with its own config) from eager to grouped attention; False, and
    nothing changed, where it does not use eager attention or has no grouped heads."""
    cfg = getattr(net, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "eager":
        return False
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if not heads or not kv or heads % kv:
        return False
    try:
        cfg._attn_implementation = register()
    except Exception:  # a transformers without these registries: keep eager (slower, same numbers)
        return False
    return True


# --- the KV cache --------------------------------------------------------------------------------


def cache_kwarg(net: torch.nn.Module) -> str:
    """The name the model's forward takes the KV cache by: ``cache`` from transformers 5.24 on
    (``past_key_values`` still works there, with a deprecation warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned (``cache`` from transformers 5.24 on, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values



def _append(buf: torch.Tensor | None, n: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Write ``new`` (..., q, d) after the first ``n`` positions of ``buf``; a larger buffer
    (``GROW`` positions to spare) where it has no room."""
    q = new.shape[-2]
    if buf is None or buf.dim() != new.dim() or buf.shape[-2] < n + q or buf.shape[:-2] != new.shape[:-2] or buf.dtype != new.dtype:
        shape = list(new.shape)
        shape[-2] = n + q + GROW
        grown = new.new_empty(shape)
        if n:
            grown[..., :n, :] = buf[..., :n, :]  # type: ignore[index]
        buf = grown
    buf[..., n : n + q, :] = new
    return buf, n + q


@functools.cache
def growing_layer_class() -> type:
    """:class:`GrowingLayer`, a ``DynamicLayer`` that appends in place (built on first use, so
    that importing steerkit does not import transformers)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):  # type: ignore[misc, valid-type]
        """``DynamicLayer`` with spare room: ``update`` writes the new positions into it."""

        _k: torch.Tensor | None = None
        _v: torch.Tensor | None = None
        _nk = _nv = 0

        @property  # type: ignore[override]
        def keys(self) -> torch.Tensor | None:
            return self._k if self._k is None or self._k.dim() < 2 else self._k[..., : self._nk, :]

        @keys.setter
        def keys(self, x: torch.Tensor | None) -> None:
            self._k, self._nk = x, (x.shape[-2] if x is not None and x.dim() >= 2 else 0)

        @property  # type: ignore[override]
        def values(self) -> torch.Tensor | None:
            return self._v if self._v is None or self._v.dim() < 2 else self._v[..., : self._nv, :]

        @values.setter
        def values(self, x: torch.Tensor | None) -> None:
            self._v, self._nv = x, (x.shape[-2] if x is not None and x.dim() >= 2 else 0)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self._k, self._nk = _append(self._k if self._nk else None, self._nk, key_states)
            self._v, self._nv = _append(self._v if self._nv else None, self._nv, value_states)
            return self.keys, self.values  # type: ignore[return-value]

    return GrowingLayer


def new_cache(net: torch.nn.Module) -> Any:
    """The KV cache ``net`` would make for itself, with its plain layers growing in place
    (the plain cache where this transformers builds caches differently)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cache = DynamicCache(config=net.config)
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        grow = growing_layer_class()
        cache.layers = [grow() if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


def is_plain_layer(layer: Any) -> bool:
    """Whether a cache layer is a plain growing one (whose tensors may be joined along the batch)."""
    from transformers.cache_utils import DynamicLayer

    return type(layer) in (DynamicLayer, growing_layer_class())


# --- prompt starts kept across batches -----------------------------------------------------------


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """KV caches of prompt starts, kept across batches: rows that begin with a start run before
    (the chat template and its system prompt, under the same steering) prefill only the rest.
    The server's scheduler keeps one for its lifetime, :func:`generate` one per call.

    An entry is keyed by its tokens and the steering it was run under (the same direction
    object, mode, strength and layer, or none) and holds those interventions, so a direction's
    identity cannot be taken by another object while its entry lives; the least recently used
    go past ``max_entries``. A start is stored when a batch shares it or when a prompt begins
    the way an earlier one did (:meth:`seen`)."""

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self.entries: OrderedDict[tuple[Any, tuple[int, ...]], tuple[list[tuple[torch.Tensor, torch.Tensor]], Any]] = OrderedDict()
        self.recent: deque[tuple[Any, tuple[int, ...]]] = deque(maxlen=32)
        self.hits = 0
        self.runs = 0
        self._net: int | None = None

    def bind(self, net: torch.nn.Module) -> None:
        """Entries belong to one model: forget them when another uses this cache."""
        if self._net != id(net):
            self.entries.clear()
            self.recent.clear()
            self._net = id(net)

    def find(self, key: Any, ids: Sequence[int], limit: int) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(n, per-layer (keys, values)): the longest stored start of ``ids`` under ``key``,
        usable for its first n <= ``limit`` tokens; (0, []) when none."""
        best: tuple[int, Any] = (0, None)
        for ek in self.entries:
            k, pre = ek
            if k == key:
                n = min(_common(pre, ids), limit)
                if n > best[0]:
                    best = (n, ek)
        if best[1] is None:
            return 0, []
        self.entries.move_to_end(best[1])
        self.hits += 1
        return best[0], self.entries[best[1]][0]

    def put(self, key: Any, ids: Sequence[int], kv: list[tuple[torch.Tensor, torch.Tensor]], keep: Any) -> None:
        self.entries[(key, tuple(ids))] = (kv, keep)
        self.entries.move_to_end((key, tuple(ids)))
        self.runs += 1
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)

    def seen(self, key: Any, ids: Sequence[int], limit: int) -> int:
        """The longest start (at most ``limit`` tokens) ``ids`` shares with a recent prompt under ``key``."""
        return max((min(_common(other, ids), limit) for k, other in self.recent if k == key), default=0)

    def remember(self, key: Any, ids: Sequence[int]) -> None:
        self.recent.append((key, tuple(ids)))


# --- the unembedding -----------------------------------------------------------------------------


class ChunkedUnembed(torch.nn.Module):
    """``linear`` computed :data:`CHUNK` output columns at a time (sharing its parameters)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs = self.bias.split(CHUNK) if self.bias is not None else [None] * -(-self.out_features // CHUNK)
        return torch.cat([torch.nn.functional.linear(x, w, b) for w, b in zip(self.weight.split(CHUNK), bs)], dim=-1)


PROBE_ROWS = (1, 2, 7, 15, 64)  # rows of the probe products: the kernels BLAS picks depend on the shape


def chunking_is_exact(linear: torch.nn.Linear) -> bool:
    """Whether :class:`ChunkedUnembed` gives ``linear``'s output bit for bit on this machine, on
    random inputs of :data:`PROBE_ROWS` rows. BLAS picks kernels by shape and CPU: on an AVX-512
    Xeon with MKL, products with 64 input features sum in another order for 1, 7 or 15 rows
    (measured 2026-12-02), while SmolLM2's 576 stay exact. Where it is not exact the twin keeps
    the plain layer, so chunking never changes a sampled token."""
    g = torch.Generator().manual_seed(0)
    chunked = ChunkedUnembed(linear)
    with torch.no_grad():
        for m in PROBE_ROWS:
            x = torch.randn(m, linear.in_features, generator=g).to(linear.weight.dtype)
            if not torch.equal(chunked(x), linear(x)):
                return False
    return True


def prepare_twin(net: torch.nn.Module) -> list[str]:
    """Give the twin the faster pieces that apply to it; returns their names."""
    done = []
    if use_grouped(net):
        done.append("grouped attention")
    out = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    if (type(out) is torch.nn.Linear and out.weight.device.type == "cpu" and out.out_features > 4 * CHUNK
            and hasattr(net, "set_output_embeddings") and chunking_is_exact(out)):
        net.set_output_embeddings(ChunkedUnembed(out))
        done.append("chunked unembedding")
    return done
