"""Add, clamp and ablate as pure functions on residual activations, plus one hook adapter.

Pure functions (all shapes ``x: [batch, pos, d_model]``, ``mask: [batch, pos]`` bool):

* :func:`add`            ``x + c * u``               (``c`` per row, absolute units)
* :func:`clamp_vector`   ``x + (v - x.u) * u``       pin the component along unit ``u`` to ``v``
* :func:`ablate_vector`  ``x - (x.u) * u``           project ``u`` out
* :func:`clamp_latents`  ``x + sum_i (v_i - a_i(x)) * W_dec[i]``  pin SAE latents, keeping the
  SAE's reconstruction error (everything the SAE does not explain stays as it was), i.e.
  encode, set those latents, decode, add the error back; ``v_i = v * w_i`` for a weighted latent
  set; :func:`ablate_latents` is the same with ``v = 0``.
* :func:`ablate_subspace` ``x - Q Q^T x``            project out the span of several vectors (a
  latent set's decoder rows, when a set is ablated by projection instead of in the SAE basis).

A latent set (kind ``sae-latents``) is one direction: ``add`` adds its unit vector (the
normalised weighted sum of its decoder rows) like any other; ``clamp``/``ablate`` act on its
latents in the SAE basis by default, or by projection with ``on_latents=False`` (clamp: the
component along the set's vector; ablate: the span of its decoder rows, which for one latent
is the same thing).

Positions outside ``mask`` are returned bit-for-bit unchanged, and rows whose coefficient is
zero under ``add`` too, so strength 0 is an exact no-op.

The pure functions compute in ``x``'s dtype. The hooks (:meth:`SteeringPlan.apply`) hand them a
float32 copy of a bfloat16 or float16 residual and cast the result back once per layer, so the
direction and SAE arithmetic of a model loaded with ``--dtype bfloat16`` is float32 (in
bfloat16 the projection ``x . u`` keeps 8 significant bits, so a clamp or an ablation would miss
by up to 1/256 of the component it sets).

:class:`SteeringPlan` gathers interventions for a batch in which each row may carry its own
(different strengths in one forward pass, as sweeps and the server need); :func:`steering`
installs it as TransformerLens hooks and removes them on every exit path.

Why one module of this size: the pure functions and the plan that batches them per row are
checked against the same numbers; the plan is the only caller of the functions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

import torch

from steerkit.directions import Direction
from steerkit.errors import SteerkitError
from steerkit.models import HookFn, LoadedModel, bridge_hooks, twin_hooks
from steerkit.sae import check_latents, load_sae

Mode = Literal["add", "clamp", "ablate"]
MODES: tuple[str, ...] = get_args(Mode)
Positions = Literal["all", "prompt", "generated"]
POSITIONS: tuple[str, ...] = get_args(Positions)
# the largest |strength| accepted, in median token norms (absolute strengths, --raw and SAE-latent
# values, are held to the same bound times the direction's median norm): far beyond anything
# coherent (a sweep's useful range is about +-1), and far below float32 overflow
MAX_STRENGTH = 100.0
# residual dtypes the hooks upcast to float32 for their arithmetic (and cast back)
LOW_PRECISION = (torch.bfloat16, torch.float16)


class SAELike(Protocol):
    """What latent interventions need from an SAE (see :mod:`steerkit.sae`)."""

    W_dec: torch.Tensor  # [d_sae, d_in]

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...  # [..., d_in] -> [..., d_sae]


# --- pure functions ---------------------------------------------------------------------------


def _where(mask: torch.Tensor | None, new: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return new
    return torch.where(mask[..., None], new, x)


def add(x: torch.Tensor, u: torch.Tensor, coeff: torch.Tensor | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x + coeff * u``; ``coeff`` is a scalar or ``[batch]`` (absolute units)."""
    c = torch.as_tensor(coeff, dtype=x.dtype, device=x.device)
    if c.ndim == 1:
        c = c[:, None, None]  # (B, 1, 1)
    return _where(mask, x + c * u.to(x.dtype), x)


def clamp_vector(x: torch.Tensor, u: torch.Tensor, value: torch.Tensor | float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pin the component of ``x`` along unit ``u`` to ``value`` (scalar or ``[batch]``)."""
    u = u.to(x.dtype)
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if v.ndim == 1:
        v = v[:, None]  # (B, 1)
    proj = x @ u  # (B, T)
    return _where(mask, x + (v - proj)[..., None] * u, x)


def ablate_vector(x: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Project unit ``u`` out of ``x``."""
    return clamp_vector(x, u, 0.0, mask)


def clamp_latents(
    x: torch.Tensor,
    sae: SAELike,
    latents: Sequence[int],
    value: torch.Tensor | float,
    mask: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Pin SAE latents to ``value`` (scalar or ``[batch]``) keeping the reconstruction error;
    with ``weights`` latent ``i`` is pinned to ``value * weights[i]``."""
    sae_dev = sae.W_dec.device  # the SAE may sit on another device than this layer (--device auto)
    idx = torch.as_tensor(list(latents), dtype=torch.long, device=x.device)
    acts = sae.encode(x.to(sae_dev))[..., idx.to(sae_dev)].to(x.device)  # (B, T, k)
    v = torch.as_tensor(value, dtype=acts.dtype, device=x.device)
    if v.ndim == 1:
        v = v[:, None, None]  # (B, 1, 1)
    if weights is not None:
        v = v * torch.as_tensor(list(weights), dtype=acts.dtype, device=x.device)  # (..., k)
    w = sae.W_dec[idx.to(sae_dev)].to(device=x.device, dtype=x.dtype)  # (k, D)
    delta = (v - acts).to(x.dtype) @ w  # (B, T, D)
    return _where(mask, x + delta, x)


def ablate_latents(x: torch.Tensor, sae: SAELike, latents: Sequence[int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Zero SAE latents, keeping the reconstruction error."""
    return clamp_latents(x, sae, latents, 0.0, mask)


def span_basis(vectors: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis ``[k, d]`` of the span of the rows of ``vectors [n, d]`` (rank ``k``)."""
    v = vectors.detach().double()
    q, r = torch.linalg.qr(v.T)  # (d, n), (n, n)
    diag = r.diagonal().abs()
    keep = diag > 1e-8 * float(diag.max().clamp(min=1e-30))
    return q[:, keep].T.float().contiguous()


def ablate_subspace(x: torch.Tensor, basis: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Project the span of the orthonormal rows of ``basis [k, d]`` out of ``x``."""
    q = basis.to(device=x.device, dtype=x.dtype)
    return _where(mask, x - (x @ q.T) @ q, x)


# --- interventions as data --------------------------------------------------------------------


def check_strength(direction: Direction, strength: float, absolute: bool = False) -> None:
    """Refuse |strength| beyond :data:`MAX_STRENGTH` median norms (``absolute``: a --raw or
    SAE-latent value, bounded by MAX_STRENGTH times the direction's median norm)."""
    bound = MAX_STRENGTH * direction.median_norm if absolute else MAX_STRENGTH
    if abs(strength) > bound:
        unit = f"in absolute units (--raw or latent values), {MAX_STRENGTH:g} median norms of {direction.median_norm:.4g}" if absolute else "median token norms"
        raise SteerkitError(
            f"strength {strength:g} for {direction.name!r} is beyond the bound of +-{bound:g} ({unit}): "
            f"give one within it"
        )


@dataclass(frozen=True)
class Intervention:
    """One edit: a direction, a mode and a strength.

    ``strength`` for ``add`` is a multiple of the direction's median token norm (absolute
    units with ``raw``); for ``clamp`` on a vector it is the value of the component along the
    direction, in the same units; for ``clamp`` on SAE latents it is the latent activation
    (times each latent's weight in a weighted set). ``ablate`` ignores it. ``layer`` overrides
    the direction's layer. ``on_latents=False`` makes clamp and ablate of an SAE direction act by
    projection (an ablated set: the span of its decoder rows).
    """

    direction: Direction
    mode: Mode = "add"
    strength: float = 0.0
    raw: bool = False
    layer: int | None = None
    on_latents: bool | None = None  # None: latents when the direction has an SAE and mode is clamp/ablate

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SteerkitError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not isinstance(self.strength, (int, float)) or isinstance(self.strength, bool) or not math.isfinite(float(self.strength)):
            raise SteerkitError(f"strength for {self.direction.name!r} must be a finite number, got {self.strength!r}")
        check_strength(self.direction, float(self.strength), absolute=self.raw or self.uses_latents)
        if self.on_latents and not self.direction.is_sae:
            raise SteerkitError(f"direction {self.direction.name!r} has no SAE latents to {self.mode}")

    @property
    def target_layer(self) -> int:
        return self.direction.layer if self.layer is None else self.layer

    @property
    def uses_latents(self) -> bool:
        if self.on_latents is not None:
            return self.on_latents
        return self.mode != "add" and self.direction.is_sae

    @property
    def projects_set(self) -> bool:
        """Ablation of a latent set by projection: the span of its decoder rows goes."""
        return self.mode == "ablate" and not self.uses_latents and self.direction.is_sae and len(self.direction.latents) > 1

    def coefficient(self) -> float:
        """The number the pure function receives (absolute units)."""
        if self.mode == "ablate":
            return 0.0
        if self.uses_latents or self.raw:
            return float(self.strength)
        return float(self.strength) * self.direction.median_norm

    def key(self) -> tuple[Any, ...]:
        """Interventions with the same key differ only in strength and can share one slot."""
        return (id(self.direction.vector), self.direction.name, self.mode, self.target_layer, self.uses_latents, self.raw)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"direction": self.direction.name, "mode": self.mode, "layer": self.target_layer}
        if self.mode != "ablate":
            d["strength"] = self.strength
        if self.raw:
            d["raw"] = True
        if self.uses_latents or self.projects_set:
            d["latents"] = list(self.direction.latents)
            if self.direction.weights and self.mode == "clamp":
                d["weights"] = list(self.direction.weights)
        if self.projects_set:
            d["projection"] = "span of the decoder rows"
        return d


@dataclass
class _Slot:
    """One (direction, mode, layer) with a value and an on/off flag per row."""

    proto: Intervention
    values: torch.Tensor  # (B,) absolute coefficients
    active: torch.Tensor  # (B,) bool
    sae: SAELike | None = None
    basis: torch.Tensor | None = None  # (k, D) orthonormal: a latent set ablated by projection

    def apply(self, x: torch.Tensor, pos_mask: torch.Tensor | None) -> torch.Tensor:
        B = x.shape[0]
        values, active = self.values, self.active
        if values.shape[0] != B:
            if values.shape[0] != 1:
                raise SteerkitError(f"steering plan has {values.shape[0]} rows but the batch has {B}")
            values, active = values.expand(B), active.expand(B)
        values = values.to(x.device)
        active = active.to(x.device)
        mask = active[:, None].expand(B, x.shape[1])
        if pos_mask is not None:
            mask = mask & pos_mask.to(x.device)
        p = self.proto
        u = p.direction.vector.to(x.device)
        if p.mode == "add":
            return add(x, u, torch.where(active, values, torch.zeros_like(values)), mask)
        if p.uses_latents:
            assert self.sae is not None
            return clamp_latents(x, self.sae, p.direction.latents, values, mask, p.direction.weights or None)
        if self.basis is not None:
            return ablate_subspace(x, self.basis, mask)
        return clamp_vector(x, u, values, mask)


@dataclass
class SteeringPlan:
    """Interventions for a batch: row ``b`` gets ``rows[b]`` (or every row gets ``rows[0]``)."""

    slots: list[_Slot] = field(default_factory=list)
    n_rows: int = 1

    @classmethod
    def build(
        cls,
        rows: Sequence[Sequence[Intervention]],
        sae_loader: Any = None,
    ) -> "SteeringPlan":
        keys: dict[tuple[Any, ...], int] = {}
        protos: list[Intervention] = []
        for row in rows:
            for iv in row:
                k = iv.key()
                if k not in keys:
                    keys[k] = len(protos)
                    protos.append(iv)
        n = len(rows)
        plan = cls(n_rows=n)
        for k, proto in zip(keys, protos):
            values = torch.zeros(n)
            active = torch.zeros(n, dtype=torch.bool)
            for b, row in enumerate(rows):
                for iv in row:
                    if iv.key() == k:
                        if active[b]:
                            raise SteerkitError(f"direction {iv.direction.name!r} is given twice with mode {iv.mode} on one row")
                        values[b] = iv.coefficient()
                        active[b] = True
            sae, basis = None, None
            if proto.uses_latents or proto.projects_set:
                sae = (sae_loader or _default_sae_loader)(proto.direction)
            if proto.projects_set:
                basis = span_basis(sae.W_dec[check_latents(sae, proto.direction.latents)])
            plan.slots.append(_Slot(proto, values, active, None if proto.projects_set else sae, basis))
        return plan

    @classmethod
    def uniform(cls, interventions: Sequence[Intervention], sae_loader: Any = None) -> "SteeringPlan":
        return cls.build([list(interventions)], sae_loader)

    @property
    def empty(self) -> bool:
        return not self.slots

    def layers(self) -> list[int]:
        return sorted({s.proto.target_layer for s in self.slots})

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (indices into the current batch), in place: batch compaction
        while hooks that close over this plan stay installed."""
        if self.n_rows == 1:
            return
        idx = rows.cpu()
        self.slots = [_Slot(s.proto, s.values[idx], s.active[idx], s.sae, s.basis) for s in self.slots]
        self.n_rows = len(idx)

    def concat(self, other: "SteeringPlan") -> "SteeringPlan":
        """The plan of a batch whose rows are this plan's followed by ``other``'s (slots merged by
        key; a row is left exactly alone by the slots it does not carry): rows joining a running
        batch, the counterpart of :meth:`keep_rows`."""
        if self.n_rows == 0:
            return other
        na, nb = self.n_rows, other.n_rows

        def rows_of(s: _Slot, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (s.values.expand(n), s.active.expand(n)) if s.values.shape[0] == 1 and n > 1 else (s.values, s.active)

        out = SteeringPlan(n_rows=na + nb)
        theirs = {s.proto.key(): s for s in other.slots}
        for s in self.slots:
            va, aa = rows_of(s, na)
            t = theirs.pop(s.proto.key(), None)
            vb, ab = rows_of(t, nb) if t is not None else (torch.zeros(nb), torch.zeros(nb, dtype=torch.bool))
            out.slots.append(_Slot(s.proto, torch.cat([va, vb]), torch.cat([aa, ab]), s.sae, s.basis))
        for s in theirs.values():
            vb, ab = rows_of(s, nb)
            out.slots.append(_Slot(s.proto, torch.cat([torch.zeros(na), vb]), torch.cat([torch.zeros(na, dtype=torch.bool), ab]), s.sae, s.basis))
        return out

    def apply(self, layer: int, x: torch.Tensor, pos_mask: torch.Tensor | None) -> torch.Tensor:
        """Every slot on ``layer`` applied to ``x``; the arithmetic is float32 (at least) whatever
        ``x``'s dtype, and the result comes back in ``x``'s dtype (positions left alone exactly)."""
        slots = [s for s in self.slots if s.proto.target_layer == layer]
        if not slots:
            return x
        y = x.float() if x.dtype in LOW_PRECISION else x
        for s in slots:
            y = s.apply(y, pos_mask)
        return y.to(x.dtype)


_SAE_CACHE: dict[str, Any] = {}


def _default_sae_loader(d: Direction) -> SAELike:
    path = d.sae_path()
    if path is None:
        raise SteerkitError(f"direction {d.name!r} names no SAE")
    key = str(path.resolve())
    if key not in _SAE_CACHE:
        _SAE_CACHE[key] = load_sae(path)
    return _SAE_CACHE[key]


# --- the hook adapter -------------------------------------------------------------------------


class PositionMask:
    """Which positions of the current forward call are steered, set by the caller per step.

    When nothing was set, every position but the first of a multi-token call is steered (the
    first is the attention sink) and a single-token call (a cached decode step) is steered.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None  # (B, T) bool

    def for_input(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mask is not None:
            if self.mask.shape != x.shape[:2]:
                raise RuntimeError(f"position mask {tuple(self.mask.shape)} does not fit activations {tuple(x.shape[:2])}")
            return self.mask
        if x.shape[1] <= 1:
            return None
        m = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        m[:, 0] = False
        return m


@contextlib.contextmanager
def steering(model: LoadedModel, plan: SteeringPlan, positions: PositionMask | None = None, twin: bool = False) -> Iterator[PositionMask]:
    """Install ``plan`` on ``model`` (a LoadedModel) for the duration of the block.

    Yields the :class:`PositionMask` the caller may set before each forward call. Hooks are
    removed in ``finally``: after exceptions and KeyboardInterrupt too. With ``twin`` the plan
    goes on ``model.twin`` (the unwrapped copy generation runs on) as plain torch forward hooks
    on its decoder layers, the same place as the bridge's ``blocks.<L>.hook_out``.
    """
    pm = positions or PositionMask()
    if plan.empty:
        yield pm
        return

    def hook_for(layer: int) -> HookFn:
        def fn(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
            return plan.apply(layer, x, pm.for_input(x))

        return fn

    if twin:
        with twin_hooks(model, [(layer, hook_for(layer)) for layer in plan.layers()]):
            yield pm
        return
    with bridge_hooks(model, [(layer, hook_for(layer)) for layer in plan.layers()]):
        yield pm


def bridge_hook_count(model: LoadedModel) -> int:
    """Forward hooks currently attached to the bridge's hook points."""
    points = {id(hp): hp for hp in model.bridge.hook_dict.values()}  # aliases share hook points
    return sum(len(hp._forward_hooks) for hp in points.values())


def active_hook_count(model: LoadedModel) -> int:
    """Forward hooks currently attached to any hook point or twin layer (0 when nothing is steering)."""
    n = bridge_hook_count(model)
    if getattr(model, "twin_layers", None) is not None:
        n += sum(len(m._forward_hooks) for m in model.twin_layers)
    return n
