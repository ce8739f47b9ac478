"""Track judged misalignment and a direction's activation over the checkpoints of fine-tuning runs.

The points are the runs' checkpoints (:func:`steerkit.track_points.find_all_points`).
:func:`run_track` loads the base model once and swaps each point's adapter into it in place
(:class:`steerkit.lora.AdapterSwap`); per point it generates answers to the evaluation questions
(the same row seeds at every point), judges them, and measures each direction's mean activation
over every answer and over its prompt (:func:`steerkit.monitor.chat_activations`, on the
checkpoint's own model). With ``out_dir`` each answer is appended to ``answers.jsonl`` as its
batch finishes, the settings go to ``track.json`` and the per-point summaries to
``points.jsonl``; a rerun keeps every answer whose checkpoint (folder and weights hash) and
settings match, so it generates only what is missing. Directions are not part of that match: a
rerun with a direction added (or its file changed) measures it on the kept answers, on each
checkpoint's model, without generating again. ``controls=K`` adds K random directions per layer
read (matched to the first direction on it, :func:`steerkit.controls.random_controls`): each
direction's Spearman rho is then reported beside the band of the controls' rho, so "tracks
misalignment" can be told from "moves with any fine-tune". The statistics (rates with intervals,
activations, Spearman's rho, which moves first) are :mod:`steerkit.track_stats`'.

Why one module of this size: the settings, the store and its resume rules, and the run that
generates and measures are one contract (what a rerun keeps, measures again or refuses); split,
each half would have to re-derive the other's keys.

What it leaves out: training (``steerkit finetune``), loading the judge and the model (the CLI
does it), and plots (:func:`steerkit.report.plot_track_png`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steerkit.chat import Messages
from steerkit.controls import random_controls
from steerkit.directions import Direction, check_compatible, vector_digest
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_write_text, check_writable_dir, read_store
from steerkit.generate import Row, Sampling, TokenCallback, generate
from steerkit.judge import Judge, judge_name, score_all, verdict_fields
from steerkit.lora import AdapterSwap
from steerkit.models import LoadedModel
from steerkit.monitor import chat_activations_many, direction_scorer
from steerkit.prompts import Prompt
from steerkit.track_points import TrackPoint
from steerkit.track_stats import Correlation, Lead, PointSummary, float_or_none, jsonable, summarize, summarize_point

ANSWERS = "answers.jsonl"
CONFIG = "track.json"
POINTS = "points.jsonl"
PLOT_PNG = "track.png"
CONFIG_FORMAT = "steerkit.track/1"
MEASURED = ("directions", "controls")  # settings a rerun re-measures on kept answers instead of refusing


# --- settings and the store -----------------------------------------------------------------


def direction_config(d: Direction) -> dict[str, Any]:
    return {"name": d.name, "sha256": vector_digest(d), "kind": d.kind, "layer": d.layer, "median_norm": d.median_norm,
            **({"sae": str(d.sae_path()), "latents": list(d.latents)} if d.is_sae else {})}


def draw_controls(directions: Sequence[Direction], k: int, seed: int = 0) -> tuple[list[Direction], dict[str, list[str]]]:
    """``k`` random control directions per layer that ``directions`` read, each group matched
    (layer, strength unit) to the first direction on its layer and named ``random-L<layer>-<i>``;
    and which controls each direction is compared with (those of its layer)."""
    if k < 0:
        raise SteerkitError(f"--control random:K needs K >= 0, got {k}")
    first: dict[int, Direction] = {}
    for d in directions:
        first.setdefault(d.layer, d)
    ctrls = [c for layer, d in first.items() for c in random_controls(d, k, seed=seed, prefix=f"random-L{layer}")] if k else []
    clash = {d.name for d in directions} & {c.name for c in ctrls}
    if clash:
        raise SteerkitError(f"a direction is named like a control ({', '.join(sorted(clash))}): rename it or drop --control")
    return ctrls, {d.name: [c.name for c in ctrls if c.layer == d.layer] for d in directions} if ctrls else {}


def track_config(model_name: str, directions: Sequence[Direction], questions: Sequence[Prompt], samples: int,
                 sampling: Sampling, judge: Judge | None, controls: int = 0,
                 drawn: tuple[list[Direction], dict[str, list[str]]] | None = None) -> dict[str, Any]:
    """Everything that decides an answer's record other than its checkpoint; a resumed folder
    must match it exactly, except for what is measured on the answers (:data:`MEASURED`:
    directions and controls), which a rerun measures again where it changed. ``drawn``: the
    controls :func:`draw_controls` already gave for these directions (drawn here otherwise)."""
    qdigest = hashlib.sha256(json.dumps([[q.id, q.messages] for q in questions], sort_keys=True).encode()).hexdigest()[:16]
    cfg: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "model": model_name,
        "directions": [direction_config(d) for d in directions],
        "questions": [q.id for q in questions],
        "questions_sha256": qdigest,
        "samples": samples,
        "sampling": asdict(sampling),
        "judge": judge_name(judge),
    }
    if controls:
        ctrls, by_dir = drawn if drawn is not None else draw_controls(directions, controls)
        cfg["controls"] = {"random": controls, "draws": [direction_config(c) for c in ctrls], "by_direction": by_dir}
    err = getattr(judge, "error_rates", None)
    if err:
        cfg["judge_error"] = err
    return json.loads(json.dumps(cfg))  # as it reads back from disk


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [x for k in sorted(set(old) | set(new)) for x in _diff(old.get(k), new.get(k), f"{where}.{k}" if where else k)]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and all(isinstance(x, dict) for x in old + new):
        return [x for i, (a, b) in enumerate(zip(old, new)) for x in _diff(a, b, f"{where}[{i}]")]
    return [] if old == new else [where or "config"]


def read_answers(path: Path) -> list[dict[str, Any]]:
    """Records of answers.jsonl; a torn last line (a kill mid-write) is ignored."""
    return read_store(path)


def check_out(out_dir: str | os.PathLike, config: dict[str, Any] | None = None, force: bool = False,
              ignore: Sequence[str] = ()) -> Path:
    """An --out folder that can take this track: new, empty, or holding a track of the same
    settings (``config``; None: not known yet, only the folder is checked; ``ignore``: top-level
    settings not compared yet, e.g. the judge before it loads); other settings and foreign
    folders are refused without ``force``. Creates nothing."""
    d = Path(out_dir).expanduser()
    check_writable_dir(d)
    if not d.is_dir() or force:
        return d
    ignore = (*ignore, *MEASURED)
    cfg = d / CONFIG
    if cfg.is_file():
        try:
            old = json.loads(cfg.read_text(encoding="utf-8"))
        except ValueError as e:
            raise SteerkitError(f"{cfg} is not valid JSON ({e}): restore it, or pass --force to start afresh") from None
        if not isinstance(old, dict):
            raise SteerkitError(f"{cfg} is not a JSON object: restore it, or pass --force to start afresh")
        diff = _diff({k: v for k, v in old.items() if k not in ignore}, {k: v for k, v in config.items() if k not in ignore}) if config is not None else []
        if diff:
            raise SteerkitError(
                f"{d} holds a track with other settings ({', '.join(diff)}): use the same settings to resume, "
                f"another --out, or --force to start afresh"
            )
        return d
    if (d / ANSWERS).exists():
        raise SteerkitError(f"{d / ANSWERS} exists but {cfg} does not: pass --force to start afresh, or another --out")
    if any(d.iterdir()):
        raise SteerkitError(f"{d} already exists and holds no track (no {CONFIG}): give a new folder for --out, or --force to write into it")
    return d


def _measured(config: dict[str, Any]) -> dict[str, Any]:
    """Name -> settings of every direction and control a config measures."""
    ds = list(config.get("directions", [])) + list((config.get("controls") or {}).get("draws", []))
    return {x["name"]: x for x in ds}


def _unmeasured(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide the answers themselves (a changed one means generating again)."""
    return {k: v for k, v in config.items() if k not in MEASURED}


def _prepare_out(d: Path, config: dict[str, Any], force: bool) -> list[dict[str, Any]]:
    check_out(d, config, force)
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / CONFIG
    old: Any = None
    if cfg.is_file():
        try:
            old = json.loads(cfg.read_text(encoding="utf-8"))
        except ValueError:
            old = None
    if isinstance(old, dict) and _unmeasured(old) == _unmeasured(config):
        res = d / ANSWERS
        records = read_answers(res)
        if res.exists():
            data = res.read_bytes()
            if data and not data.endswith(b"\n"):
                res.write_bytes(data[: data.rfind(b"\n") + 1])
        if old != config:  # directions added, dropped or changed: drop values that no longer hold, then measure
            was, now = _measured(old), _measured(config)
            changed = {n for n, x in now.items() if was.get(n) != x} | (set(was) - set(now))
            if changed and records:
                for r in records:
                    r["activation"] = {k: v for k, v in (r.get("activation") or {}).items() if k not in changed}
                atomic_write_text(res, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), force=True)
            atomic_write_text(cfg, json.dumps(config, indent=2) + "\n", force=True)
        return records
    for name in (ANSWERS, POINTS, PLOT_PNG):  # --force with other settings: start afresh
        (d / name).unlink(missing_ok=True)
    atomic_write_text(cfg, json.dumps(config, indent=2) + "\n", force=True)
    return []


# --- running ----------------------------------------------------------------------------------


@dataclass
class TrackResult:
    config: dict[str, Any]
    records: list[dict[str, Any]]
    points: list[PointSummary]
    correlations: list[Correlation]
    leads: list[Lead]
    out_dir: Path | None = None
    generated: int = 0  # answers generated in this call
    resumed: int = 0  # answers kept from an earlier call
    stale: int = 0  # answers of an earlier call whose checkpoint's weights have changed since (ignored)

    def summary(self) -> dict[str, Any]:
        """The line after the points: correlations, leads and counts."""
        return jsonable({
            "summary": True,
            "points": len(self.points),
            "answers": len(self.records),
            "generated": self.generated,
            "resumed": self.resumed,
            "correlations": [asdict(c) for c in self.correlations],
            "leads": [asdict(x) for x in self.leads],
            **({"out": str(self.out_dir)} if self.out_dir is not None else {}),
        })


def _answer_record(point: TrackPoint, model_name: str, qi: int, q: Prompt, comp: Any, sc: Mapping[str, Any] | None,
                   acts: dict[str, Any], judge: Judge | None) -> dict[str, Any]:
    rec: dict[str, Any] = {
        **point.info(),
        "model": model_name,
        "question_id": q.id,
        "prompt_index": qi,
        "sample": comp.row.sample_index,
        "seed": comp.seed,
        "question": q.question,
        "completion": comp.text,
        "tokens": comp.n_tokens,
        "finish_reason": comp.finish_reason,
        **verdict_fields(sc, judge),
        "activation": acts,
    }
    if sc is not None and sc.get("judge_detail"):
        rec["judge_detail"] = sc["judge_detail"]
    return rec


def run_track(
    points: Sequence[TrackPoint],
    directions: Sequence[Direction],
    questions: Sequence[Prompt],
    model: LoadedModel,
    samples: int = 8,
    sampling: Sampling = Sampling(max_new_tokens=64, temperature=1.0),
    judge: Judge | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    model_name: str | None = None,
    batch_size: int = 32,
    force: bool = False,
    allow_other_model: bool = False,
    on_progress: Callable[[int, int, TrackPoint | None], None] | None = None,
    on_token: TokenCallback | None = None,
    on_point: Callable[[PointSummary], None] | None = None,
    controls: int = 0,
) -> TrackResult:
    """Generate, judge and measure every (point, question, sample) answer on one model.

    ``model`` is the loaded base model (a LoadedModel) or a function that loads it: it is called
    only when some answer is missing, so a finished track resumes without a model load.
    ``model_name`` names it in the settings (default: ``model.name``). Adapters are swapped in
    place (:class:`AdapterSwap`) and taken out again at the end. In ``out_dir``, answers of the
    same settings are always kept (a point's answers are keyed by its folder and weights hash);
    other settings are refused unless ``force``, which then starts afresh. ``on_progress(done, total,
    point)`` after each batch; ``on_point(summary)`` when a point is complete. ``controls``: K
    random control directions per layer (:func:`draw_controls`), measured like the directions;
    each direction's rho then comes with the controls' band. Answers kept from an earlier call
    that lack a direction's activation (one added since) get it measured, without generating.
    """
    if samples < 1:
        raise SteerkitError(f"--samples must be at least 1, got {samples}")
    if not questions:
        raise SteerkitError("no questions to track")
    if not directions:
        raise SteerkitError("give at least one --direction")
    if batch_size < 1:
        raise SteerkitError(f"--batch-size must be at least 1, got {batch_size}")
    names = [d.name for d in directions]
    if len(set(names)) != len(names):
        raise SteerkitError(f"directions need distinct names, got {', '.join(names)}: rename a file's direction")
    if not points:
        raise SteerkitError("no checkpoints to track")
    name = model_name if model_name is not None else getattr(model, "name", None)
    if name is None:
        raise SteerkitError("run_track needs model_name when model is a loader")
    ctrl_dirs, by_dir = draw_controls(directions, controls)
    config = track_config(name, directions, questions, samples, sampling, judge, controls, drawn=(ctrl_dirs, by_dir))
    measure = [*directions, *ctrl_dirs]
    all_names = [d.name for d in measure]
    out = Path(out_dir).expanduser() if out_dir is not None else None
    old = _prepare_out(out, config, force) if out is not None else []

    wanted = {p.key for p in points}
    cells = [(qi, k) for qi in range(len(questions)) for k in range(samples)]
    cell_ids = {(q.id, k) for q in questions for k in range(samples)}
    kept: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    stale_paths = {str(p.path) for p in points}
    stale = 0
    for r in old:
        pk = (r.get("checkpoint"), r.get("sha256"))
        if pk in wanted and (r.get("question_id"), r.get("sample")) in cell_ids:
            kept.setdefault((pk[0], pk[1], r["question_id"], int(r["sample"])), r)
        elif r.get("checkpoint") in stale_paths and pk not in wanted:
            stale += 1
    records = list(kept.values())
    resumed = len(records)
    refill = {p.key: [r for r in records if (r["checkpoint"], r["sha256"]) == p.key
                      and any(n not in (r.get("activation") or {}) for n in all_names)] for p in points}
    todo = {p.key: [(qi, k) for qi, k in cells if (p.key[0], p.key[1], questions[qi].id, k) not in kept] for p in points}
    total = len(points) * len(cells)
    done = resumed
    if on_progress is not None:
        on_progress(done, total, None)
    order = [p.key for p in points]

    def point_done(p: TrackPoint, write: bool = True) -> None:
        recs = [r for r in records if (r["checkpoint"], r["sha256"]) == p.key]
        if out is not None and write:
            _write_points(out, records, all_names, config.get("judge_error"), order, by_dir)
        if on_point is not None and recs:
            on_point(summarize_point(recs, names, config.get("judge_error")))

    def measure_chats(lm: LoadedModel, comps_chats: Sequence[Messages], which: Sequence[Direction]) -> list[dict[str, Any]]:
        got = chat_activations_many(lm, which, comps_chats, batch_size=len(comps_chats), scorers=scorers, allow_other_model=True)
        acts: list[dict[str, Any]] = [{} for _ in comps_chats]
        for d in which:
            for a, x in zip(acts, got[d.name]):
                a[d.name] = {"answer_mean": float_or_none(x.answer_mean), "prompt_mean": float_or_none(x.prompt_mean)}
        return acts

    scorers: dict[str, Any] = {}
    by_qid = {q.id: q for q in questions}
    if not any(todo.values()) and not any(refill.values()):  # all resumed: no model load, points.jsonl written once
        for p in points:
            point_done(p, write=False)
        if out is not None:
            _write_points(out, records, all_names, config.get("judge_error"), order, by_dir)
    else:
        lm = model() if callable(model) and not hasattr(model, "hf_model") else model
        for d in measure:
            check_compatible(d, lm, allow_other_model)
        scorers.update({d.name: direction_scorer(d, lm.device) for d in measure})
        with AdapterSwap(lm) as swap:
            if any(refill.values()):  # answers kept from an earlier call that lack a direction added since
                for p in points:
                    recs = refill[p.key]
                    if not recs:
                        continue
                    swap.apply(p.path, {"path": str(p.path), "sha256": p.sha256})
                    for start in range(0, len(recs), batch_size):
                        chunk = recs[start : start + batch_size]
                        which = [d for d in measure if any(d.name not in (r.get("activation") or {}) for r in chunk)]
                        chats = [list(by_qid[r["question_id"]].messages) + [{"role": "assistant", "content": r["completion"]}] for r in chunk]
                        for r, a in zip(chunk, measure_chats(lm, chats, which)):
                            r["activation"] = {**(r.get("activation") or {}), **{k: v for k, v in a.items() if k not in (r.get("activation") or {})}}
                    if on_progress is not None:
                        on_progress(done, total, p)
                if out is not None:
                    atomic_write_text(out / ANSWERS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), force=True)
            fh = open(out / ANSWERS, "a", encoding="utf-8") if out is not None else None
            try:
                for p in points:
                    cells_p = todo[p.key]
                    if cells_p:
                        swap.apply(p.path, {"path": str(p.path), "sha256": p.sha256})
                    for start in range(0, len(cells_p), batch_size):
                        chunk = cells_p[start : start + batch_size]
                        rows = [Row(questions[qi].messages, qi, k) for qi, k in chunk]
                        comps = generate(lm, rows, sampling, batch_size=len(rows), on_token=on_token)
                        scores = score_all(judge, [(questions[c.row.prompt_index].question, c.text) for c in comps])
                        chats = [list(questions[c.row.prompt_index].messages) + [{"role": "assistant", "content": c.text}] for c in comps]
                        acts = measure_chats(lm, chats, measure)
                        for c, sc, a in zip(comps, scores, acts):
                            qi = c.row.prompt_index
                            rec = _answer_record(p, name, qi, questions[qi], c, sc, a, judge)
                            if fh is not None:
                                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                                fh.flush()
                            records.append(rec)
                        done += len(chunk)
                        if on_progress is not None:
                            on_progress(done, total, p)
                    point_done(p)
            finally:
                if fh is not None:
                    fh.close()
    rank = {k: i for i, k in enumerate(order)}
    cell_rank = {(q.id, k): i for i, (q, k) in enumerate((questions[qi], k) for qi, k in cells)}
    records.sort(key=lambda r: (rank[(r["checkpoint"], r["sha256"])], cell_rank[(r["question_id"], int(r["sample"]))]))
    pts, corr, lead = summarize(records, all_names, config.get("judge_error"), order, by_dir)
    return TrackResult(config, records, pts, corr, lead, out, len(records) - resumed, resumed, stale)


def _write_points(out: Path, records: Sequence[dict[str, Any]], names: Sequence[str], judge_error: dict[str, Any] | None,
                  order: Sequence[tuple[str, str]], controls: dict[str, list[str]] | None = None) -> None:
    """points.jsonl: one line per point done so far, then the summary line (rewritten atomically)."""
    pts, corr, lead = summarize(records, names, judge_error, order, controls)
    lines = [json.dumps(p.to_json(), ensure_ascii=False) for p in pts]
    lines.append(json.dumps(jsonable({"summary": True, "points": len(pts), "correlations": [asdict(c) for c in corr],
                                    "leads": [asdict(x) for x in lead]}), ensure_ascii=False))
    atomic_write_text(out / POINTS, "\n".join(lines) + "\n", force=True)


def load_track(out_dir: str | os.PathLike) -> TrackResult:
    """Re-read a track folder (answers.jsonl + track.json) and summarize it, without a model."""
    d = Path(out_dir).expanduser()
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise SteerkitError(f"{d} has no {CONFIG}: give the --out folder of a track")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SteerkitError(f"{cfg_path} is not valid JSON ({e}): restore it") from None
    records = read_answers(d / ANSWERS)
    if not records:
        raise SteerkitError(f"{d / ANSWERS} holds no answers yet")
    latest: dict[str, str] = {}
    for r in records:  # a checkpoint retrained in place: its newest weights' answers only
        latest[r["checkpoint"]] = r["sha256"]
    records = [r for r in records if latest[r["checkpoint"]] == r["sha256"]]
    names = list(_measured(config))
    by_dir = (config.get("controls") or {}).get("by_direction") or {}
    pts, corr, lead = summarize(records, names, config.get("judge_error"), None, by_dir)
    return TrackResult(config, records, pts, corr, lead, d, 0, len(records))


__all__ = [
    "ANSWERS", "CONFIG", "MEASURED", "PLOT_PNG", "POINTS", "TrackResult", "check_out", "direction_config", "draw_controls", "load_track", "read_answers",
    "run_track", "track_config",
]
