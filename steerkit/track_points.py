"""The checkpoints of fine-tuning runs as the points `steerkit track` evaluates, found and
checked without loading any weights.

A *run* is a folder written by ``steerkit finetune --save-every N``: a PEFT LoRA adapter (the
final one) holding ``checkpoints/step-NNNNNN/``, each a complete adapter folder with its own
``steerkit-finetune.json`` (``step``, ``steps``, ``base``, ``mix``). A folder without
``checkpoints/`` is one point, its final adapter. Every checkpoint is a *point*
(:class:`TrackPoint`): the base model with that adapter merged, named by its folder and the
hash of its weights. A run continued from another adapter (``steerkit finetune --tuned``)
saves every checkpoint as one standalone adapter (its ``continued_from`` is provenance only),
so its points are like any other's; they have no place on a mix-fraction axis (``fraction``
None).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerkit.errors import SteerkitError
from steerkit.finetune import META_FILE, canonical_name, check_adapter, tuned_info
from steerkit.fsutil import read_json
from steerkit.lora import ADAPTER_CONFIG

CHECKPOINTS = "checkpoints"

_STEP_NAME = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class TrackPoint:
    """One checkpoint of one run."""

    run: Path  # the run folder
    path: Path  # this point's adapter folder
    step: int | None
    steps: int | None  # the run's total
    sha256: str  # first 16 hex digits of the SHA-256 of this point's weights (:func:`steerkit.finetune.tuned_info`)
    base: str  # the base model spec the adapters name
    fraction: float | None = None  # share of the training rows from the --data file (1.0 without --mix)
    mix: tuple[dict[str, Any], ...] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (str(self.path), self.sha256)

    @property
    def label(self) -> str:
        return self.run.name

    def info(self) -> dict[str, Any]:
        """The fields every record and summary of this point carries."""
        return {
            "run": str(self.run), "checkpoint": str(self.path), "step": self.step, "steps": self.steps,
            "fraction": self.fraction, "sha256": self.sha256,
        }


def _meta(folder: Path) -> dict[str, Any]:
    f = folder / META_FILE
    return read_json(f) if f.is_file() else {}


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _weights_sha(folder: Path) -> str:
    return tuned_info(folder, list(folder.glob("adapter_model*.safetensors")))["sha256"]


def _fraction(meta: dict[str, Any]) -> tuple[float | None, tuple[dict[str, Any], ...] | None]:
    """(share of the rows from --data, the mix) of a run; a run continued from another adapter
    (re-alignment) has no place on a mix-fraction axis: None."""
    mix = meta.get("mix")
    if meta.get("continued_from"):
        return None, tuple(dict(m) for m in mix if isinstance(m, dict)) if isinstance(mix, list) else None
    if isinstance(mix, list) and mix and isinstance(mix[0], dict) and isinstance(mix[0].get("fraction"), (int, float)):
        return float(mix[0]["fraction"]), tuple(dict(m) for m in mix if isinstance(m, dict))
    return (1.0, None) if meta else (None, None)


def find_points(run: str | os.PathLike, base: str | None = None) -> list[TrackPoint]:
    """The points of a run folder, by step: its ``checkpoints/step-*`` adapters, and its final
    adapter where no checkpoint has the final step; a folder without checkpoints is one point
    (an adapter folder of any kind: a run, or one of its checkpoints). ``base`` overrides the
    base model the adapters name. Everything is checked without loading weights."""
    r = Path(run).expanduser()
    if not r.exists():
        raise SteerkitError(f"run folder {r} does not exist: give a folder written by `steerkit finetune --out`")
    if not r.is_dir():
        raise SteerkitError(f"{r} is a file: give a run folder written by `steerkit finetune --out`")
    r = r.resolve()
    ck = r / CHECKPOINTS
    folders = [d for d in sorted(ck.iterdir()) if d.is_dir() and not d.name.startswith(".")] if ck.is_dir() else []
    bad = [d for d in folders if not (d / ADAPTER_CONFIG).is_file()]
    if bad:
        raise SteerkitError(f"checkpoint {bad[0]} holds no adapter (no {ADAPTER_CONFIG}): delete that folder or copy the checkpoint back")
    if not folders and not (r / ADAPTER_CONFIG).is_file():
        raise SteerkitError(
            f"{r} holds no adapter (no {ADAPTER_CONFIG}) and no {CHECKPOINTS}/: give a run folder written by `steerkit finetune --out`"
        )
    run_meta = _meta(r) if (r / ADAPTER_CONFIG).is_file() else {}
    cands: list[tuple[Path, dict[str, Any], int | None]] = []
    for d in folders:
        m = _meta(d)
        step = _int(m.get("step"))
        if step is None:
            mm = _STEP_NAME.search(d.name)
            step = int(mm.group(1)) if mm else None
        if step is None:
            raise SteerkitError(f"checkpoint {d} names no step ('step' in {META_FILE}, or a folder named step-N): fix it")
        cands.append((d, m, step))
    if (r / ADAPTER_CONFIG).is_file():
        final = _int(run_meta.get("step"))
        final = final if final is not None else _int(run_meta.get("steps"))
        if not folders:
            cands.append((r, run_meta, final))
        elif final is not None and final not in {s for _, _, s in cands}:
            cands.append((r, run_meta, final))
    steps_seen = [s for _, _, s in cands]
    dup = {s for s in steps_seen if s is not None and steps_seen.count(s) > 1}
    if dup:
        raise SteerkitError(f"{r} has two checkpoints of step {min(dup)}: delete one")
    points = []
    bases: set[str] = set()
    for d, m, step in cands:
        bases.add(check_adapter(d, base))
        frac, mix = _fraction(m or run_meta)
        total = _int(m.get("steps"))
        points.append(TrackPoint(r, d, step, total if total is not None else _int(run_meta.get("steps")), _weights_sha(d),
                                 next(iter(bases)), frac, mix))
    if len(bases) > 1:
        raise SteerkitError(f"the adapters of {r} name different base models ({', '.join(sorted(bases))}): pass --model to choose one")
    return sorted(points, key=lambda p: (p.step is None, p.step or 0))


def find_all_points(runs: Sequence[str | os.PathLike], base: str | None = None) -> list[TrackPoint]:
    """The points of every run, in run order; all on one base model (one model load serves all)."""
    if not runs:
        raise SteerkitError("give at least one run folder")
    points: list[TrackPoint] = []
    seen: set[Path] = set()
    for r in runs:  # a run named twice, or a checkpoint beside its run, is tracked once
        for p in find_points(r, base):
            if p.path not in seen:
                seen.add(p.path)
                points.append(p)
    bases = sorted({p.base for p in points})
    if len(bases) > 1:
        try:
            names = {canonical_name(b) for b in bases}
        except SteerkitError:
            names = set(bases)
        if len(names) > 1:
            where = {b: next(str(p.run) for p in points if p.base == b) for b in bases}
            raise SteerkitError(
                f"the runs are tuned from different base models ({'; '.join(f'{b}: {w}' for b, w in where.items())}): "
                f"track them separately (one model load serves one base), or pass --model to force one"
            )
    return points


__all__ = ["CHECKPOINTS", "TrackPoint", "find_all_points", "find_points"]
