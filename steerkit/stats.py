"""Small statistics for sweeps, screens and the judge: Wilson intervals, Spearman's rho, ROC AUC,
Cohen's kappa, the Rogan-Gladen correction and paired differences, written out so that they
need neither scipy nor pandas."""

from __future__ import annotations

import math
from collections.abc import Sequence

from steerkit.errors import SteerkitError

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


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (linear between order statistics, as numpy's default); nan
    when empty."""
    v = sorted(xs)
    if not v:
        return math.nan
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def control_band(value: float, controls: Sequence[float]) -> tuple[float, float, float]:
    """Where a statistic (e.g. a direction's Spearman rho) sits among the same statistic of random
    controls: the controls' central 95% (2.5% and 97.5% quantiles) and the share of controls at
    least as extreme, ``(1 + #{|c| >= |value|}) / (1 + n)`` (a permutation-style p-value: small
    when the direction does what few random directions do). Controls that are nan are left out;
    all nan without controls or without a value."""
    cs = [c for c in controls if not math.isnan(c)]
    if not cs or math.isnan(value):
        return math.nan, math.nan, math.nan
    p = (1 + sum(abs(c) >= abs(value) - 1e-12 for c in cs)) / (1 + len(cs))
    return quantile(cs, 0.025), quantile(cs, 0.975), p


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


def kappa(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Cohen's kappa of two binary labellings (1.0 when both are constant and equal)."""
    n = len(a)
    if n == 0 or n != len(b):
        raise SteerkitError("kappa needs two labellings of equal, non-zero length")
    po = sum(bool(x) == bool(y) for x, y in zip(a, b)) / n
    pa, pb = sum(map(bool, a)) / n, sum(map(bool, b)) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def mcnemar_exact(first_only: int, second_only: int) -> float:
    """Two-sided exact McNemar test on paired yes/no verdicts: the p-value of the discordant
    pairs splitting ``first_only`` / ``second_only`` (yes in one of the two only) if either way
    were equally likely, i.e. a binomial test at 1/2 on the discordant pairs, doubled and capped
    at 1. No discordant pairs: 1.0."""
    if first_only < 0 or second_only < 0:
        raise ValueError(f"discordant counts must be >= 0, got {first_only} and {second_only}")
    n = first_only + second_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(first_only, second_only) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers up to the one division


def paired_difference(both: int, first_only: int, second_only: int, neither: int,
                      z: float = Z95) -> tuple[float, float, float]:
    """The difference of two rates measured on the same items, second minus first, with
    Newcombe's square-and-add interval for paired data (Newcombe 1998, method 10; as
    recommended by Fagerland, Lydersen & Laake 2014): each rate's Wilson interval, combined with
    the correlation of the paired verdicts. The four counts are the pairs called yes by both,
    by the first only, by the second only and by neither. Returns (difference, low, high);
    (nan, -1, 1) with no pairs."""
    counts = (both, first_only, second_only, neither)
    if min(counts) < 0:
        raise ValueError(f"pair counts must be >= 0, got {counts}")
    n = sum(counts)
    if n == 0:
        return math.nan, -1.0, 1.0
    k1, k2 = both + first_only, both + second_only  # yes in the first, in the second
    p1, l1, u1 = wilson(k1, n, z)
    p2, l2, u2 = wilson(k2, n, z)
    # the correlation of the two verdicts (phi), with Newcombe's continuity correction on the
    # positive side; 0 where a margin is empty
    margins = k1 * (n - k1) * k2 * (n - k2)
    cross = both * neither - first_only * second_only
    if margins == 0 or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > 0 else cross) / math.sqrt(margins)
    d = p2 - p1
    down = math.sqrt(max((p2 - l2) ** 2 + (u1 - p1) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1), 0.0))
    up = math.sqrt(max((u2 - p2) ** 2 + (p1 - l1) ** 2 - 2 * phi * (u2 - p2) * (p1 - l1), 0.0))
    return d, max(-1.0, d - down), min(1.0, d + up)
