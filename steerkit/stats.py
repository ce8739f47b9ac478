"""Small statistics for sweeps and screens: Wilson intervals and Spearman's rho, written out
so that they need neither scipy nor pandas."""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """Rate and its Wilson score interval: (p, low, high). n = 0 gives (nan, 0, 1)."""
    if n <= 0:
        return math.nan, 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} not in 0..{n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # ties share the mean rank
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on ranks, ties averaged); nan when undefined."""
    if len(xs) != len(ys):
        raise ValueError("spearman needs sequences of equal length")
    if len(xs) < 2:
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return math.nan
    return cov / math.sqrt(vx * vy)


def rogan_gladen(successes: int, n: int, sensitivity: float, specificity: float,
                 n_positive: int | None = None, n_negative: int | None = None, z: float = Z95) -> tuple[float, float, float]:
    """A rate measured by an imperfect judge, corrected for its error (Rogan & Gladen 1978):
    ``(p + specificity - 1) / (sensitivity + specificity - 1)``, clipped to [0, 1].

    The interval is a normal one by the delta method (Greenland 1996): the binomial variance of
    the observed rate and, when ``n_positive`` / ``n_negative`` (the validation answers behind
    sensitivity and specificity) are given, the variance of those two as well. Returns
    (estimate, low, high); (nan, 0, 1) when n = 0 or the judge is no better than chance
    (sensitivity + specificity <= 1).
    """
    if n <= 0:
        return math.nan, 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} not in 0..{n}")
    for name, v in (("sensitivity", sensitivity), ("specificity", specificity)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} {v} not in [0, 1]")
    j = sensitivity + specificity - 1.0  # Youden's J
    if j <= 0:
        return math.nan, 0.0, 1.0
    p = successes / n
    raw = (p + specificity - 1.0) / j
    est = min(max(raw, 0.0), 1.0)
    var = p * (1 - p) / n
    if n_positive:
        var += est * est * sensitivity * (1 - sensitivity) / n_positive
    if n_negative:
        var += (1 - est) ** 2 * specificity * (1 - specificity) / n_negative
    half = z * math.sqrt(var) / j
    clip = lambda v: min(max(v, 0.0), 1.0)  # noqa: E731 - a rate's bounds stay in [0, 1]
    return est, clip(raw - half), clip(raw + half)


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Probability that a random positive outscores a random negative (ties count half); nan
    when either class is missing."""
    if len(scores) != len(labels):
        raise ValueError("roc_auc needs as many labels as scores")
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return math.nan
    r = _ranks(list(scores))
    return (sum(ri for ri, y in zip(r, labels) if y) - pos * (pos + 1) / 2) / (pos * neg)
