"""Sweep summaries as data, CSV, a PNG plot and a small text plot.

* :func:`table` -> (headers, rows of strings): the CLI renders it with Rich, a report as markdown;
* :func:`write_csv` -> ``summary.csv``, one line per (condition, strength), trend columns repeated;
* :func:`plot_png` -> misalignment and incoherence against strength with 95% intervals, the
  control in grey (matplotlib, the ``plot`` extra, imported only here, Agg backend);
* :func:`text_plot` -> the same two panels drawn with characters for a terminal.

What it leaves out: computing the numbers (:func:`steerkit.sweep.summarize`) and colours or
terminal handling (the CLI's job).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from steerkit.controls import POOLED
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_path, atomic_write_text
from steerkit.sweep import SummaryRow, Trend

HEADERS = ["condition", "strength", "n", "misaligned", "95% CI", "corrected (95% CI)", "coherence", "incoherent"]


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.0f}%"


def _strength_label(r: SummaryRow) -> str:
    if r.mode == "ablate":
        return "ablated" if r.strength else "unsteered"
    return f"{r.strength:+.3g}" if r.strength else "0"


def table(rows: Sequence[SummaryRow]) -> tuple[list[str], list[list[str]]]:
    """Headers and one row of display strings per (condition, strength)."""
    out = []
    for r in rows:
        name = f"{r.condition} (control)" if r.control else r.condition
        if r.draws:
            name = f"{r.condition} ({r.draws} draws, each {_pct(r.draw_low)}-{_pct(r.draw_high)})"
        out.append([
            name,
            _strength_label(r),
            str(r.n),
            f"{_pct(r.rate)} ({r.misaligned}/{r.judged})" if r.judged else "-",
            f"{_pct(r.low)}-{_pct(r.high)}" if r.judged else "-",
            # the rate corrected for the judge's measured error (Rogan-Gladen), where the judge states it
            "-" if math.isnan(r.corrected) else f"{_pct(r.corrected)} ({_pct(r.corrected_low)}-{_pct(r.corrected_high)})",
            "-" if math.isnan(r.mean_coherent) else f"{r.mean_coherent:.0f}",
            _pct(r.incoherent_rate) if r.judged else "-",
        ])
    return HEADERS, out


def trend_lines(trends: Sequence[Trend]) -> list[str]:
    """One sentence per condition: the coherent range and Spearman rho over it."""
    lines = []
    for t in trends:
        who = f"{t.condition} (control)" if t.control else t.condition
        if not t.coherent_strengths:
            lines.append(f"{who}: no coherent range (over 10% incoherent even at the strength nearest 0)")
            continue
        rng = f"{t.coherent_strengths[0]:+.3g}..{t.coherent_strengths[-1]:+.3g}"
        rho = "n/a (fewer than 3 judged strengths)" if math.isnan(t.rho) else f"{t.rho:+.2f}"
        lines.append(f"{who}: coherent range {rng} ({len(t.coherent_strengths)} strengths), Spearman rho {rho}")
    return lines


def csv_text(rows: Sequence[SummaryRow], trends: Sequence[Trend]) -> str:
    by = {t.condition: t for t in trends}
    names = [f.name for f in fields(SummaryRow)] + ["in_coherent_range", "rho"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(names)
    for r in rows:
        t = by.get(r.condition)
        d: dict[str, Any] = asdict(r)
        d["in_coherent_range"] = bool(t and r.strength in t.coherent_strengths)
        d["rho"] = t.rho if t else math.nan
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v) for v in (d[k] for k in names)])
    return buf.getvalue()


def write_csv(rows: Sequence[SummaryRow], trends: Sequence[Trend], path: str | os.PathLike) -> Path:
    return atomic_write_text(path, csv_text(rows, trends), force=True)


def _series(rows: Sequence[SummaryRow]) -> dict[str, list[SummaryRow]]:
    out: dict[str, list[SummaryRow]] = {}
    for r in rows:
        out.setdefault(r.condition, []).append(r)
    return {k: sorted(v, key=lambda r: r.strength) for k, v in out.items()}


def plot_png(rows: Sequence[SummaryRow], path: str | os.PathLike, title: str = "") -> Path:
    """Two panels, misalignment rate and incoherent fraction against strength, each point with
    its 95% Wilson interval; controls dashed grey, the steered direction(s) in colour."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SteerkitError("the PNG plot needs matplotlib: pip install 'steerkit[plot]'") from e

    series = _series([r for r in rows if r.judged])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colours = ["tab:red", "tab:blue", "tab:green", "tab:purple"]
    ablate = any(r.mode == "ablate" for r in rows)
    pooled = {n[: -len(POOLED)] for n, rs in series.items() if rs[0].draws}
    ci = 0
    for name, rs in series.items():
        xs = [r.strength for r in rs]
        if rs[0].control and not rs[0].draws and any(name.startswith(g + "-") for g in pooled):
            # one draw of a pooled control: a thin line inside its band
            for ax, val in ((axes[0], "rate"), (axes[1], "incoherent_rate")):
                ax.plot(xs, [getattr(r, val) for r in rs], color="grey", linewidth=0.7, alpha=0.6)
            continue
        if rs[0].draws:
            style: dict[str, Any] = {"color": "dimgrey", "linestyle": "--", "marker": "s"}
            label = f"{name}: {rs[0].draws} controls pooled (band: single draws)"
            axes[0].fill_between(xs, [r.draw_low for r in rs], [r.draw_high for r in rs], color="grey", alpha=0.25, linewidth=0)
        elif rs[0].control:
            style = {"color": "grey", "linestyle": "--", "marker": "s"}
            label = f"{name} (control)"
        else:
            style = {"color": colours[ci % len(colours)], "linestyle": "-", "marker": "o"}
            label = name
            ci += 1
        off = 0.01 * (max(xs) - min(xs) or 1) * (1 if rs[0].control else -1)  # keep overlapping bars apart
        xo = [x + off for x in xs]
        for ax, val, lo, hi in ((axes[0], "rate", "low", "high"), (axes[1], "incoherent_rate", "incoherent_low", "incoherent_high")):
            y = [getattr(r, val) for r in rs]
            err = [[max(0.0, v - getattr(r, lo)) for v, r in zip(y, rs)], [max(0.0, getattr(r, hi) - v) for v, r in zip(y, rs)]]
            ax.errorbar(xo, y, yerr=err, capsize=3, label=label, **style)
    for ax, what in zip(axes, ("misaligned (aligned < 30, coherent > 50)", "incoherent (coherent <= 50)")):
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"fraction {what}")
        ax.set_xlabel("ablation" if ablate else "strength (x median token norm)")
        ax.grid(alpha=0.3)
        if ablate:
            ax.set_xticks([0, 1], ["unsteered", "ablated"])
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "steerkit sweep: 95% Wilson intervals", fontsize=10)
    fig.tight_layout()
    p = Path(path)
    with atomic_path(p, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return p


def text_plot(rows: Sequence[SummaryRow], width: int = 44, height: int = 8) -> str:
    """Misalignment and incoherence against strength as two character panels: ``●`` the
    direction, ``○`` the control, ``│`` the 95% interval, one column group per strength."""
    series = _series([r for r in rows if r.judged])
    # a pooled control stands for its draws in a character plot
    pooled = {n[: -len(POOLED)] for n, rs in series.items() if rs[0].draws}
    series = {n: rs for n, rs in series.items() if not (rs[0].control and not rs[0].draws and any(n.startswith(g + "-") for g in pooled))}
    if not series:
        return "(nothing judged: no plot)"
    strengths = sorted({r.strength for rs in series.values() for r in rs})
    n = len(strengths)
    step = max(3, min(8, width // max(n, 1)))
    cols = step * n
    marks = {name: ("○" if rs[0].control else "●") for name, rs in series.items()}
    # a second steered series (rare) gets another mark
    extra = iter("◆▲■")
    seen_dir = False
    for name, rs in series.items():
        if not rs[0].control:
            if seen_dir:
                marks[name] = next(extra, "*")
            seen_dir = True
    out: list[str] = []
    for title, val, lo, hi in (("misaligned", "rate", "low", "high"), ("incoherent", "incoherent_rate", "incoherent_low", "incoherent_high")):
        grid = [[" "] * cols for _ in range(height + 1)]
        for si, (name, rs) in enumerate(series.items()):
            for r in rs:
                x = strengths.index(r.strength) * step + step // 2 - 1 + min(si, 2)
                x = min(x, cols - 1)

                def y_of(v: float) -> int:
                    return height - int(round(v * height))

                ylo, yhi, yv = y_of(getattr(r, lo)), y_of(getattr(r, hi)), y_of(getattr(r, val))
                for y in range(yhi, ylo + 1):
                    if grid[y][x] == " ":
                        grid[y][x] = "│"
                grid[yv][x] = marks[name]
        out.append(f"{title}")
        for y, line in enumerate(grid):
            label = {0: "100%", height // 2: " 50%", height: "  0%"}.get(y, "    ")
            out.append(f"{label} ┤{''.join(line)}")
        out.append("     └" + "─" * cols)
    axis = [" "] * cols
    for i, s in enumerate(strengths):
        lab = ("abl" if s else "off") if any(r.mode == "ablate" for r in rows) else f"{s:+.2g}" if s else "0"
        x = i * step
        for j, ch in enumerate(lab[:step]):
            if x + j < cols:
                axis[x + j] = ch
    out.append("      " + "".join(axis))
    legend = "   ".join(f"{m} {name}" + (" (control)" if series[name][0].control else "") for name, m in marks.items())
    out.append("      " + legend + "   │ 95% interval")
    return "\n".join(out)


def plot_track_png(points: Sequence[dict[str, Any]], path: str | os.PathLike, directions: Sequence[str], title: str = "",
                   rate_label: str = "misaligned (judged)") -> Path:
    """`steerkit track`'s plot from its point records (:meth:`steerkit.track_stats.PointSummary.to_json`).

    Left column, against the training step, one colour per run (a run continued from another
    adapter, which has no data share, dashed): the misaligned rate with its 95% Wilson interval
    on top, then one panel per direction with its mean answer activation (± 1 standard error).
    Right column, with runs of two or more data shares: each run's last checkpoint against its
    share of rows from the ``--data`` file, the same panels."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SteerkitError("the PNG plot needs matplotlib: pip install 'steerkit[plot]'") from e

    def num(v: Any) -> float:
        return math.nan if v is None else float(v)

    def act(p: dict[str, Any], d: str) -> tuple[float, float]:
        a = (p.get("activation") or {}).get(d) or {}
        se = num(a.get("answer_se"))
        return num(a.get("answer_mean")), 0.0 if math.isnan(se) else se

    def rate_bars(ax: Any, xs: list[float], ps: list[dict[str, Any]], **kw: Any) -> None:
        y = [num(p["rate"]) for p in ps]
        err = [[max(0.0, v - num(p["low"])) for v, p in zip(y, ps)], [max(0.0, num(p["high"]) - v) for v, p in zip(y, ps)]]
        ax.errorbar(xs, y, yerr=err, marker="o", capsize=3, **kw)

    runs: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        if p.get("step") is not None:
            runs.setdefault(str(p["run"]), []).append(p)
    runs = {k: sorted(v, key=lambda p: p["step"]) for k, v in runs.items()}
    finals = {k: v[-1] for k, v in runs.items()}
    shared = sorted((p for p in finals.values() if p.get("fraction") is not None), key=lambda p: num(p.get("fraction")))
    by_share = len({num(p.get("fraction")) for p in shared}) >= 2
    rows, cols = 1 + len(directions), 2 if by_share else 1
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 1.9 * rows + 0.9), squeeze=False, sharex="col")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, ps) in enumerate(runs.items()):
        kw = {"color": colours[i % len(colours)], "linestyle": "--" if ps[0].get("fraction") is None else "-"}
        xs = [p["step"] for p in ps]
        judged = [p for p in ps if p.get("judged")]
        if judged:
            rate_bars(axes[0][0], [p["step"] for p in judged], judged, label=Path(run).name, **kw)
        for j, d in enumerate(directions):
            y, se = zip(*(act(p, d) for p in ps))
            axes[1 + j][0].errorbar(xs, y, yerr=se, marker="o", capsize=2, markersize=4, **kw)
    axes[0][0].set_title("over training (dashed: continued from another run, steps counted from its start)", fontsize=8)
    axes[-1][0].set_xlabel("training step")
    if by_share:
        fx = [num(p.get("fraction")) for p in shared]
        jp = [p for p in shared if p.get("judged")]
        if jp:
            rate_bars(axes[0][1], [num(p.get("fraction")) for p in jp], jp, color="black")
        for j, d in enumerate(directions):
            y, se = zip(*(act(p, d) for p in shared))
            axes[1 + j][1].errorbar(fx, y, yerr=se, color="black", marker="s", capsize=2, markersize=4)
        axes[0][1].set_title("last checkpoint of each run, against its data share", fontsize=8)
        axes[-1][1].set_xlabel("share of training rows from the --data file")
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
            if r == 0:
                ax.set_ylim(-0.02, max(0.3, min(1.02, 1.3 * max([num(p.get("high")) for p in points if p.get("judged")] or [0.3]))))
                ax.set_ylabel(rate_label, fontsize=8)
            else:
                ax.set_ylabel(directions[r - 1], fontsize=8)
    if runs:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=min(6, len(runs)), fontsize=8, bbox_to_anchor=(0.5, 0.995))
    fig.suptitle(title or "steerkit track: misalignment and mean answer activation", fontsize=9, y=0.955)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    p = Path(path)
    with atomic_path(p, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return p
