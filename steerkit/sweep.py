"""Strength sweeps: a grid of steering strengths x questions x samples -> judged records ->
a summary per (condition, strength) with 95% Wilson intervals.

A *condition* is one direction steered one way (``add``/``clamp``/``ablate``); a sweep runs
one or more conditions (the direction and its random control) over the same questions and
samples. Every (condition, strength, question, sample) cell is one generated answer. Rows with
different strengths and conditions share forward passes (one :class:`~steerkit.generate.Row`
per cell, each with its own intervention), and a question+sample gets the same sampling seed
at every strength, so strength is the only thing that differs between paired rows. A no-op
cell (``add`` at strength 0, or the unsteered side of ``ablate``) is generated once and shared
by every condition: it is the same computation.

With ``out_dir``, records are appended to ``results.jsonl`` as each batch is generated and
judged (one flushed line per answer), the settings go to ``sweep.json``, and a rerun with the
same folder and settings skips the finished cells (a kill loses at most the batch in flight);
other settings are refused unless ``force``. The summary of the records is
:mod:`steerkit.sweep_summary`; tables and plots are in :mod:`steerkit.report`.

What it leaves out: judging itself (any object with the :class:`Judge` protocol), loading models
and directions (the CLI does it), and choosing strengths.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steerkit.controls import ControlSpec, controls_for
from steerkit.directions import Direction, vector_digest
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_write_text
from steerkit.generate import Completion, Row, Sampling, TokenCallback, chat_tokens, generate
from steerkit.interventions import MODES, Intervention, Mode, Positions
from steerkit.judge import Judge, judge_name, score_all, verdict_fields
from steerkit.models import LoadedModel
from steerkit.prompts import Prompt
from steerkit.sweep_summary import (  # noqa: F401 - re-exported: the summary was part of this module
    CONFIG,
    MAX_INCOHERENT,
    PLOT_PNG,
    RESULTS,
    SUMMARY_CSV,
    SummaryRow,
    SweepResult,
    Trend,
    coherent_range,
    load_sweep,
    read_results,
    summarize,
)

CONFIG_FORMAT = "steerkit.sweep/1"
ABLATE_STRENGTHS = (0.0, 1.0)  # ablate: 0 = unsteered, 1 = direction projected out
# sweeps and screens sample like the demo (steerkit.demo.DemoConfig): at temperature 1.0 about a
# third of the default model's unsteered answers to open questions are unreadable, which leaves
# the judge nothing to score; at 0.7 / top-p 0.9 they read
TEMPERATURE = 0.7
TOP_P = 0.9


# --- strengths and conditions -----------------------------------------------------------------

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_strengths(spec: str) -> tuple[float, ...]:
    """``"-0.6:0.6:9"`` (start:stop:count, both ends included) or ``"-0.3,0,0.3"`` -> sorted,
    de-duplicated strengths (rounded to 10 decimals, so 0.15 stays 0.15)."""
    text = spec.strip()
    hint = f"--strengths {spec!r}: give START:STOP:N (e.g. -0.6:0.6:9) or a comma list (e.g. -0.3,0,0.3)"
    m = re.fullmatch(rf"\s*({_NUM})\s*:\s*({_NUM})\s*:\s*(\d+)\s*", text)
    if m:
        a, b, n = float(m.group(1)), float(m.group(2)), int(m.group(3))
        if n < 1 or n > 1000:
            raise SteerkitError(f"{hint}; N must be 1..1000, got {n}")
        if n == 1 and a != b:
            raise SteerkitError(f"{hint}; N = 1 needs START = STOP")
        values = [a] if n == 1 else [a + (b - a) * i / (n - 1) for i in range(n)]
    else:
        parts = [p.strip() for p in text.split(",")]
        if not text or any(not re.fullmatch(_NUM, p) for p in parts):
            raise SteerkitError(hint)
        values = [float(p) for p in parts]
    if not all(math.isfinite(v) for v in values):
        raise SteerkitError(f"{hint}; strengths must be finite")
    return tuple(sorted({round(v, 10) + 0.0 for v in values}))  # + 0.0 turns -0.0 into 0.0


@dataclass(frozen=True)
class Condition:
    """One direction steered one way over a grid of strengths."""

    name: str  # label in records and tables, unique within a sweep
    direction: Direction
    mode: Mode = "add"
    strengths: tuple[float, ...] = (0.0,)
    control: bool = False
    raw: bool = False
    layer: int | None = None
    # controls of one kind made for one direction share a group (e.g. "persona-random"); the
    # sweep summary pools their answers into a "<group>-pooled" row
    group: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SteerkitError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.strengths:
            raise SteerkitError(f"condition {self.name!r} has no strengths")
        for v in self.strengths:
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SteerkitError(f"condition {self.name!r}: strength {v!r} is not a finite number")
        # a repeated strength would count its answers twice; -0.0 is 0.0
        object.__setattr__(self, "strengths", tuple(dict.fromkeys(float(v) + 0.0 for v in self.strengths)))

    def intervention(self, strength: float) -> Intervention | None:
        """The edit at this strength; None when the cell is unsteered (shared by all conditions)."""
        if self.mode == "ablate":
            return Intervention(self.direction, "ablate", 0.0, raw=self.raw, layer=self.layer) if strength else None
        if self.mode == "add" and strength == 0:
            return None  # exactly the unsteered model
        return Intervention(self.direction, self.mode, strength, raw=self.raw, layer=self.layer)

    def config(self) -> dict[str, Any]:
        d = self.direction
        return {
            "name": self.name, "direction": d.name, "direction_sha256": vector_digest(d), "kind": d.kind,
            "mode": self.mode, "strengths": list(self.strengths), "control": self.control,
            "layer": d.layer if self.layer is None else self.layer, "raw": self.raw,
        } | ({"group": self.group} if self.group else {})


def make_conditions(
    direction: Direction,
    mode: Mode = "add",
    strengths: Sequence[float] = (0.0,),
    control: str | ControlSpec | None = "random",
    control_seed: int = 0,
    raw: bool = False,
    layer: int | None = None,
) -> list[Condition]:
    """The direction, plus its controls (``control``: ``random[:K]``, ``latents[:K]``, both
    comma-separated, or None; see :mod:`steerkit.controls`) at the same strengths and mode.
    ``ablate`` ignores ``strengths``: it runs 0 (unsteered) and 1."""
    grid = ABLATE_STRENGTHS if mode == "ablate" else tuple(strengths)
    out = [Condition(direction.name, direction, mode, grid, False, raw, layer)]
    for group, ctl in controls_for(direction, control, control_seed):
        out.append(Condition(ctl.name, ctl, mode, grid, True, raw, layer, group=group))
    return out


# --- the plan -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    condition: Condition
    strength: float
    qi: int  # index into the question list (the row seed uses it)
    sample: int

    def key(self, questions: Sequence[Prompt]) -> tuple[str, float, str, int]:
        return (self.condition.name, self.strength, questions[self.qi].id, self.sample)

    def gen_key(self) -> tuple[Any, ...]:
        iv = self.condition.intervention(self.strength)
        if iv is None:
            return (self.qi, self.sample)
        return (self.qi, self.sample, self.condition.name, self.strength)


def plan_cells(conditions: Sequence[Condition], n_questions: int, samples: int) -> list[Cell]:
    return [
        Cell(c, s, qi, k)
        for qi in range(n_questions)
        for k in range(samples)
        for c in conditions
        for s in c.strengths
    ]


def record_key(rec: dict[str, Any]) -> tuple[str, float, str, int]:
    return (rec["condition"], float(rec["strength"]), str(rec["question_id"]), int(rec["sample"]))


# --- running ----------------------------------------------------------------------------------


def sweep_config(
    model: LoadedModel,
    conditions: Sequence[Condition],
    questions: Sequence[Prompt],
    samples: int,
    sampling: Sampling,
    judge: Judge | None,
    positions: Positions,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything that decides a sweep's records; a resumed folder must match it exactly."""
    qdigest = hashlib.sha256(json.dumps([[q.id, q.messages] for q in questions], sort_keys=True).encode()).hexdigest()[:16]
    cfg: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "model": getattr(model, "name", str(model)),
        "conditions": [c.config() for c in conditions],
        "questions": [q.id for q in questions],
        "questions_sha256": qdigest,
        "samples": samples,
        "sampling": asdict(sampling),
        "positions": positions,
        "judge": judge_name(judge),
        "max_incoherent": MAX_INCOHERENT,
    }
    dtype = str(getattr(model, "dtype", "torch.float32")).removeprefix("torch.")
    if dtype != "float32":  # a half-precision sweep never resumes onto a float32 folder (or back)
        cfg["dtype"] = dtype
    err = getattr(judge, "error_rates", None)
    if err:  # the judge's held-out sensitivity and specificity: rates are also reported corrected for them
        cfg["judge_error"] = err
    cfg.update(extra or {})
    return json.loads(json.dumps(cfg))  # as it reads back from disk


def _prepare_out(out_dir: Path, config: dict[str, Any], force: bool) -> list[dict[str, Any]]:
    """Create or check the folder; return the finished records to resume from."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, res = out_dir / CONFIG, out_dir / RESULTS
    if force:
        for name in (RESULTS, SUMMARY_CSV, PLOT_PNG):
            (out_dir / name).unlink(missing_ok=True)
    elif cfg_path.exists():
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
        if old != config:
            diff = _diff(old, config)
            raise SteerkitError(
                f"{out_dir} holds a sweep with other settings ({', '.join(diff)}): "
                f"use the same settings to resume, another --out, or --force to start afresh"
            )
        records = read_results(res)
        _truncate_torn_tail(res)
        return records
    elif res.exists():
        raise SteerkitError(f"{res} exists but {cfg_path} does not: pass --force to start afresh, or another --out")

    atomic_write_text(cfg_path, json.dumps(config, indent=2) + "\n", force=True)
    return []


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
    """Where two configs differ, e.g. ``conditions[0].strengths``, ``sampling.seed``."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [x for k in sorted(set(old) | set(new)) for x in _diff(old.get(k), new.get(k), f"{where}.{k}" if where else k)]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and all(isinstance(x, dict) for x in old + new):
        return [x for i, (a, b) in enumerate(zip(old, new)) for x in _diff(a, b, f"{where}[{i}]")]
    return [] if old == new else [where or "config"]


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def run_sweep(
    model: LoadedModel,
    conditions: Sequence[Condition],
    questions: Sequence[Prompt],
    samples: int = 8,
    sampling: Sampling = Sampling(max_new_tokens=64, temperature=TEMPERATURE, top_p=TOP_P),
    judge: Judge | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    positions: Positions = "all",
    force: bool = False,
    config_extra: dict[str, Any] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    on_token: TokenCallback | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Generate, judge and summarize every (condition, strength, question, sample) cell.

    ``on_batch(done, total)`` after each batch (cells); ``on_record(record)`` for each new record
    after it is written (raising from it stops the sweep, as a kill would).
    """
    if samples < 1:
        raise SteerkitError(f"--samples must be at least 1, got {samples}")
    if not questions:
        raise SteerkitError("no questions to sweep")
    if batch_size < 1:
        raise SteerkitError(f"--batch-size must be at least 1, got {batch_size}")
    names = [c.name for c in conditions]
    if not names or len(set(names)) != len(names):
        raise SteerkitError(f"conditions need distinct names, got {names}")
    config = sweep_config(model, conditions, questions, samples, sampling, judge, positions, config_extra)
    out = Path(out_dir).expanduser() if out_dir is not None else None
    records = _prepare_out(out, config, force) if out is not None else []
    cells = plan_cells(conditions, len(questions), samples)
    wanted = {c.key(questions) for c in cells}
    kept: dict[tuple[str, float, str, int], dict[str, Any]] = {}
    for r in records:  # first record per cell; cells of a wider earlier run are not ours
        if record_key(r) in wanted:
            kept.setdefault(record_key(r), r)
    records = list(kept.values())
    done = set(kept)
    resumed = len(done)
    todo = [c for c in cells if c.key(questions) not in done]

    # one generation per distinct computation; longest prompts first (less padding), and the
    # cells of one question+sample side by side, so each batch mixes strengths and conditions
    units: dict[tuple[Any, ...], list[Cell]] = {}
    for c in todo:
        units.setdefault(c.gen_key(), []).append(c)
    plen = [len(chat_tokens(model, q.messages)) for q in questions]
    order = sorted(units, key=lambda k: (-plen[k[0]], k[0], k[1]))
    total, finished = len(cells), resumed
    if on_batch is not None:
        on_batch(finished, total)
    fh = open(out / RESULTS, "a", encoding="utf-8") if out is not None else None
    try:
        for start in range(0, len(order), batch_size):
            keys = order[start : start + batch_size]
            rows = []
            for k in keys:
                c0 = units[k][0]
                iv = c0.condition.intervention(c0.strength)
                q = questions[c0.qi]
                rows.append(Row(q.messages, c0.qi, c0.sample, (iv,) if iv else (), tag=k))
            comps = generate(model, rows, sampling, batch_size=len(rows), positions=positions, on_token=on_token)
            scores = score_all(judge, [(questions[c.row.prompt_index].question, c.text) for c in comps])
            for comp, sc in zip(comps, scores):
                for cell in units[comp.row.tag]:
                    rec = _record(model, cell, questions[cell.qi], comp, sc, judge)
                    if fh is not None:
                        fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        fh.flush()
                    records.append(rec)
                    finished += 1
                    if on_record is not None:
                        on_record(rec)
            if on_batch is not None:
                on_batch(finished, total)
    finally:
        if fh is not None:
            fh.close()
    rank = {c.key(questions): i for i, c in enumerate(cells)}
    records.sort(key=lambda r: rank[record_key(r)])
    rows_, trends = summarize(records, config.get("max_incoherent", MAX_INCOHERENT), config.get("judge_error"))
    return SweepResult(config, records, rows_, trends, out, len(records) - resumed, resumed)


def _record(model: LoadedModel, cell: Cell, q: Prompt, comp: Completion, sc: Mapping[str, Any] | None, judge: Judge | None) -> dict[str, Any]:
    c = cell.condition
    rec: dict[str, Any] = {
        "condition": c.name,
        "direction": c.direction.name,
        "control": c.control,
        "control_group": c.group,
        "mode": c.mode,
        "strength": cell.strength,
        "layer": c.direction.layer if c.layer is None else c.layer,
        "question_id": q.id,
        "prompt_index": cell.qi,
        "sample": cell.sample,
        "seed": comp.seed,
        "model": getattr(model, "name", None),
        **({"tuned": dict(model.tuned)} if getattr(model, "tuned", None) else {}),  # the tuned model beside its base
        "question": q.question,
        "completion": comp.text,
        "tokens": comp.n_tokens,
        "finish_reason": comp.finish_reason,
        **verdict_fields(sc, judge),
    }
    return rec


__all__ = [
    "Condition", "Judge", "SummaryRow", "SweepResult", "Trend", "coherent_range", "load_sweep", "make_conditions",
    "parse_strengths", "read_results", "run_sweep", "summarize", "sweep_config",
]
