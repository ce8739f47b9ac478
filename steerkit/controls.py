"""Controls for steering experiments: several independent random directions, and random SAE
latents matched to a candidate latent's firing rate.

A claim such as "adding the persona latent raises misalignment" means something only beside
what an arbitrary edit of the same size does. Two kinds of control, each drawn ``K`` times:

* ``random:K`` (:func:`random_controls`): Gaussian unit directions on the direction's layer,
  with its strength unit, each drawn from a generator seeded from the direction's identity and
  the draw's index (:func:`steerkit.directions.control_seed`), so no two directions and no two
  draws share a vector, and none is the starting point of an SAE's dictionary;
* ``latents:K`` (:func:`matched_latents`), for directions made of SAE latents: ``K`` random
  latents of the same SAE whose firing frequency is within a factor of :data:`WINDOW` of each
  candidate latent's (read from the SAE's ``firing.safetensors``, written by
  ``steerkit sae eval --save``), so a latent is compared with latents, not only with arbitrary
  directions. Clamping and ablation act on those latents as they do on the candidate.

:func:`parse_controls` reads the ``--control`` option (``random``, ``random:5``, ``latents:3``,
``random:3,latents:3``, ``none``); ``random`` alone means :data:`DEFAULT_DRAWS` draws.
Sweeps pool the draws of one kind into a ``<group>-pooled`` row (:func:`steerkit.sweep.summarize`).
What it leaves out: choosing K (3 is a floor, not a power analysis).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from steerkit.directions import Direction, control_seed, random_like, vector_digest
from steerkit.errors import SteerkitError
from steerkit.sae import FIRING_FILE, load_firing, load_sae

DEFAULT_DRAWS = 3
POOLED = "-pooled"  # a pooled row is named <group>-pooled


def pooled_name(group: str) -> str:
    """The summary row that pools the draws of control group ``group``."""
    return f"{group}{POOLED}"


WINDOW = 2.0  # matched latents fire within a factor of 2 of the candidate
KINDS = ("random", "latents")


@dataclass(frozen=True)
class ControlSpec:
    """How many draws of each kind of control."""

    random: int = DEFAULT_DRAWS
    latents: int = 0

    def __bool__(self) -> bool:
        return self.random > 0 or self.latents > 0

    def __str__(self) -> str:
        parts = [f"{k}:{n}" for k, n in (("random", self.random), ("latents", self.latents)) if n]
        return ",".join(parts) or "none"


def parse_controls(text: str | ControlSpec | None) -> ControlSpec:
    """``none`` | ``random`` | ``random:K`` | ``latents[:K]`` | a comma-separated mix."""
    if isinstance(text, ControlSpec):
        return text
    if text is None:
        return ControlSpec(0, 0)
    s = str(text).strip().lower()
    if s in ("", "none"):
        return ControlSpec(0, 0)
    counts = {"random": 0, "latents": 0}
    for part in s.split(","):
        kind, _, n = part.strip().partition(":")
        if kind not in KINDS:
            raise SteerkitError(f"--control {text!r}: {kind!r} is not one of random, latents, none (e.g. random:3,latents:3)")
        try:
            k = int(n) if n else DEFAULT_DRAWS
        except ValueError:
            raise SteerkitError(f"--control {text!r}: {n!r} is not a whole number of draws (e.g. {kind}:3)") from None
        if not 1 <= k <= 100:
            raise SteerkitError(f"--control {text!r}: give 1 to 100 draws of {kind}, got {k}")
        counts[kind] = k
    return ControlSpec(counts["random"], counts["latents"])


def random_controls(d: Direction, k: int, seed: int = 0, prefix: str | None = None) -> list[Direction]:
    """``k`` independent random directions for ``d``, named ``<prefix>-1`` ... (prefix
    ``<d.name>-random``)."""
    prefix = prefix or f"{d.name}-random"
    return [random_like(d, index=i, seed=seed, name=f"{prefix}-{i + 1}") for i in range(k)]


def firing_of(d: Direction) -> torch.Tensor:
    """The firing frequency of every latent of ``d``'s SAE, from its ``firing.safetensors``."""
    folder = d.sae_path()
    if folder is None or not d.latents:
        raise SteerkitError(f"--control latents needs a direction made of SAE latents; {d.name!r} is a {d.kind} direction: use --control random")
    got = load_firing(folder)
    if got is None:
        raise SteerkitError(f"the SAE {folder} has no {FIRING_FILE}: write it with `steerkit sae eval {folder} --corpus <text files> --save`, "
                            "or use --control random")
    return got[0]


def matched_pool(freq: torch.Tensor, latent: int, exclude: set[int], window: float = WINDOW) -> list[int]:
    """Latents (other than ``exclude``) that fire, within a factor of ``window`` of ``latent``."""
    f = float(freq[latent])
    if f <= 0:
        raise SteerkitError(f"latent {latent} never fired in the SAE's evaluation corpus: no firing rate to match")
    ok = (freq >= f / window) & (freq <= f * window) & (freq > 0)
    return [int(i) for i in ok.nonzero()[:, 0].tolist() if int(i) not in exclude]


def matched_latents(d: Direction, k: int, seed: int = 0, window: float = WINDOW, freq: torch.Tensor | None = None,
                    decoder: torch.Tensor | None = None, prefix: str | None = None) -> list[Direction]:
    """``k`` controls for an SAE-latent direction: each replaces every latent of ``d`` by a
    random other latent of the same SAE that fires within a factor of ``window`` as often
    (no latent used twice), keeping the latents' weights. ``freq`` and ``decoder`` default to
    the SAE folder's firing file and decoder."""
    freq = firing_of(d) if freq is None else freq
    folder = d.sae_path()
    if decoder is None:
        decoder = load_sae(folder).W_dec.detach().float().cpu()
    ids = list(d.latents)
    if max(ids) >= len(freq) or len(freq) != decoder.shape[0]:
        raise SteerkitError(f"the firing file of {folder} has {len(freq)} latents, the SAE {decoder.shape[0]}: rerun `steerkit sae eval --save`")
    weights = d.provenance.get("weights") if isinstance(d.provenance.get("weights"), list) else None
    if weights is None or len(weights) != len(ids):
        weights = [1.0] * len(ids)
    used = set(ids)
    pools = [matched_pool(freq, i, set(ids), window) for i in ids]
    prefix = prefix or f"{d.name}-latents"
    out = []
    for index in range(k):
        g = torch.Generator().manual_seed(control_seed(d, "latents", index, seed))
        picks = []
        for lat, pool in zip(ids, pools):
            free = [j for j in pool if j not in used]
            if not free:
                raise SteerkitError(f"only {len(pool)} latents fire within x{window:g} of latent {lat} "
                                    f"({float(freq[lat]):.3%} of tokens): ask for fewer matched-latent draws than {k}")
            j = free[int(torch.randint(len(free), (1,), generator=g))]
            used.add(j)
            picks.append(j)
        W = decoder[picks]
        vec = (W / W.norm(dim=-1, keepdim=True).clamp(min=1e-12) * torch.tensor(weights, dtype=torch.float32)[:, None]).sum(0)
        out.append(replace(
            d, name=f"{prefix}-{index + 1}", vector=vec, latents=tuple(picks), sae=str(folder), path=None,
            description=f"random SAE latents {picks} firing within x{window:g} of {ids}: control {index + 1} for {d.name!r}",
            provenance={"control_for": d.name, "control_for_sha256": vector_digest(d), "index": index, "seed": seed,
                        "matched_to": ids, "firing": [round(float(freq[j]), 6) for j in picks],
                        "candidate_firing": [round(float(freq[i]), 6) for i in ids], "window": window,
                        "weights": weights if len(ids) > 1 else None},
        ))
    return out


def controls_for(d: Direction, spec: ControlSpec | str | None, seed: int = 0) -> list[tuple[str, Direction]]:
    """(group, control) pairs for ``d``: group ``<d.name>-random`` and ``<d.name>-latents``."""
    spec = parse_controls(spec)
    out: list[tuple[str, Direction]] = [(f"{d.name}-random", c) for c in random_controls(d, spec.random, seed)]
    if spec.latents:
        out += [(f"{d.name}-latents", c) for c in matched_latents(d, spec.latents, seed)]
    return out


def max_decoder_cosine(v: torch.Tensor, decoder: torch.Tensor) -> float:
    """The largest |cosine| between ``v`` and any row of ``decoder``: how far a control is from
    being one of the dictionary's own directions."""
    W = decoder.detach().float()
    c = (W @ v.float()) / (W.norm(dim=-1).clamp(min=1e-12) * v.float().norm().clamp(min=1e-12))
    return float(c.abs().max())


def describe(spec: ControlSpec) -> str:
    """Plain words for reports."""
    parts = []
    if spec.random:
        parts.append(f"{spec.random} random direction{'s' if spec.random > 1 else ''} of equal norm")
    if spec.latents:
        parts.append(f"{spec.latents} random SAE latent{'s' if spec.latents > 1 else ''} of matched firing rate")
    return " and ".join(parts) or "no control"


__all__ = ["DEFAULT_DRAWS", "POOLED", "WINDOW", "ControlSpec", "controls_for", "describe", "firing_of", "matched_latents", "matched_pool",
           "max_decoder_cosine", "parse_controls", "pooled_name", "random_controls"]
