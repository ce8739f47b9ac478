"""Track judged misalignment and a direction's activation over the checkpoints of fine-tuning runs.

The points are the runs' checkpoints (:func:`steerkit.track_points.find_all_points`).
:func:`run_track` loads the base model once and swaps each point's adapter into it in place
(:class:`steerkit.lora.AdapterSwap`); per point it generates answers to the evaluation questions
(the same row seeds at every point), judges them, and measures each direction's mean activation
over every answer and over its prompt (:func:`steerkit.monitor.chat_activations`, on the
checkpoint's own model). With ``out_dir`` each answer is appended to ``answers.jsonl`` as its
batch finishes, the settings go to ``track.json`` and the per-point summaries to
``points.jsonl``; a rerun keeps every answer whose checkpoint (folder and weights hash) and
settings match, so it generates only what is missing. The statistics (rates with intervals,
activations, Spearman's rho, which moves first) are :mod:`steerkit.track_stats`'.

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

from steerkit.directions import Direction, check_compatible, vector_digest
from steerkit.errors import SteerkitError
from steerkit.fsutil import atomic_write_text, check_writable_dir, read_store
from steerkit.generate import Row, Sampling, TokenCallback, generate
from steerkit.judge import Judge, judge_name, score_all, verdict_fields
from steerkit.lora import AdapterSwap
from steerkit.models import LoadedModel
from steerkit.monitor import chat_activations, direction_scorer
from steerkit.prompts import Prompt
from steerkit.track_points import TrackPoint
from steerkit.track_stats import Correlation, Lead, PointSummary, float_or_none, jsonable, summarize, summarize_point

ANSWERS = "answers.jsonl"
CONFIG = "track.json"
POINTS = "points.jsonl"
PLOT_PNG = "track.png"
CONFIG_FORMAT = "steerkit.track/1"


# --- settings and the store -----------------------------------------------------------------


def direction_config(d: Direction) -> dict[str, Any]:
    return {"name": d.name, "sha256": vector_digest(d), "kind": d.kind, "layer": d.layer, "median_norm": d.median_norm,
            **({"sae": str(d.sae_path()), "latents": list(d.latents)} if d.is_sae else {})}


def track_config(model_name: str, directions: Sequence[Direction], questions: Sequence[Prompt], samples: int,
                 sampling: Sampling, judge: Judge | None) -> dict[str, Any]:
    """Everything that decides an answer's record other than its checkpoint; a resumed folder
    must match it exactly."""
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


def _prepare_out(d: Path, config: dict[str, Any], force: bool) -> list[dict[str, Any]]:
    check_out(d, config, force)
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / CONFIG
    same = False
    if cfg.is_file():
        try:
            same = json.loads(cfg.read_text(encoding="utf-8")) == config
        except ValueError:
            same = False
    if same:
        res = d / ANSWERS
        records = read_answers(res)
        if res.exists():
            data = res.read_bytes()
            if data and not data.endswith(b"\n"):
                res.write_bytes(data[: data.rfind(b"\n") + 1])
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
) -> TrackResult:
    """Generate, judge and measure every (point, question, sample) answer on one model.

    ``model`` is the loaded base model (a LoadedModel) or a function that loads it: it is called
    only when some answer is missing, so a finished track resumes without a model load.
    ``model_name`` names it in the settings (default: ``model.name``). Adapters are swapped in
    place (:class:`AdapterSwap`) and taken out again at the end. In ``out_dir``, answers of the
    same settings are always kept (a point's answers are keyed by its folder and weights hash);
    other settings are refused unless ``force``, which then starts afresh. ``on_progress(done, total,
    point)`` after each batch; ``on_point(summary)`` when a point is complete.
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
    config = track_config(name, directions, questions, samples, sampling, judge)
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
    todo = {p.key: [(qi, k) for qi, k in cells if (p.key[0], p.key[1], questions[qi].id, k) not in kept] for p in points}
    total = len(points) * len(cells)
    done = resumed
    if on_progress is not None:
        on_progress(done, total, None)
    order = [p.key for p in points]

    def point_done(p: TrackPoint, write: bool = True) -> None:
        recs = [r for r in records if (r["checkpoint"], r["sha256"]) == p.key]
        if out is not None and write:
            _write_points(out, records, names, config.get("judge_error"), order)
        if on_point is not None and recs:
            on_point(summarize_point(recs, names, config.get("judge_error")))

    if not any(todo.values()):  # all resumed: no model load, points.jsonl written once
        for p in points:
            point_done(p, write=False)
        if out is not None:
            _write_points(out, records, names, config.get("judge_error"), order)
    else:
        lm = model() if callable(model) and not hasattr(model, "hf_model") else model
        for d in directions:
            check_compatible(d, lm, allow_other_model)
        scorers = {d.name: direction_scorer(d, lm.device) for d in directions}
        fh = open(out / ANSWERS, "a", encoding="utf-8") if out is not None else None
        try:
            with AdapterSwap(lm) as swap:
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
                        acts: list[dict[str, Any]] = [{} for _ in comps]
                        for d in directions:
                            ca = chat_activations(lm, d, chats, batch_size=len(chats), scorer=scorers[d.name], allow_other_model=True)
                            for a, x in zip(acts, ca):
                                a[d.name] = {"answer_mean": float_or_none(x.answer_mean), "prompt_mean": float_or_none(x.prompt_mean)}
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
    pts, corr, lead = summarize(records, names, config.get("judge_error"), order)
    return TrackResult(config, records, pts, corr, lead, out, len(records) - resumed, resumed, stale)


def _write_points(out: Path, records: Sequence[dict[str, Any]], names: Sequence[str], judge_error: dict[str, Any] | None,
                  order: Sequence[tuple[str, str]]) -> None:
    """points.jsonl: one line per point done so far, then the summary line (rewritten atomically)."""
    pts, corr, lead = summarize(records, names, judge_error, order)
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
    names = [x["name"] for x in config.get("directions", [])]
    pts, corr, lead = summarize(records, names, config.get("judge_error"))
    return TrackResult(config, records, pts, corr, lead, d, 0, len(records))


__all__ = [
    "ANSWERS", "CONFIG", "PLOT_PNG", "POINTS", "TrackResult", "check_out", "direction_config", "load_track", "read_answers",
    "run_track", "track_config",
]
