"""`steerkit audit`: rank training examples, before any training, by how far their answers move
a direction.

:func:`audit` scores every training chat by the projection difference: the direction's mean
activation over its assistant answer (:func:`steerkit.monitor.chat_activations`) minus that over
the model's own answer to the same prompt (greedy by default). High scores are examples that
would teach the model to move along the direction. :func:`audit_examples` ranks them and, where
rows carry a label, gives the ROC AUC of the score for the positive class
(:func:`steerkit.monitor.separation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from steerkit.directions import Direction, check_compatible
from steerkit.errors import SteerkitError
from steerkit.generate import Messages, Row, Sampling, generate
from steerkit.models import LoadedModel
from steerkit.monitor import Scorer, chat_activations, direction_scorer, json_number, separation

AUDIT_SAMPLING = Sampling(max_new_tokens=96, temperature=0.0, seed=0)


@dataclass(frozen=True)
class AuditRow:
    """One training chat: its answer's activation, the model's own answer's, and the difference."""

    index: int  # position in the input
    answer_mean: float  # the chat's final assistant turn
    baseline_mean: float | None  # the model's own answer to the same prompt (None without a baseline)
    baseline_answer: str | None

    @property
    def score(self) -> float:
        """The projection difference (the answer's activation alone without a baseline)."""
        if self.baseline_mean is None:
            return self.answer_mean
        return self.answer_mean - self.baseline_mean


def audit(
    model: LoadedModel,
    direction: Direction,
    chats: Sequence[Messages],
    *,
    baseline: bool = True,
    sampling: Sampling = AUDIT_SAMPLING,
    batch_size: int = 16,
    scorer: Scorer | None = None,
    allow_other_model: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> list[AuditRow]:
    """Score every training chat (each ends in the assistant answer to train on), in input order.

    With ``baseline`` the model answers each prompt itself (``sampling``: greedy, 96 tokens by
    default, batched with :func:`steerkit.generate.generate`) and the score is the answer's mean
    activation minus that of the model's own answer: how far the training answer would move the
    direction beyond what the model does anyway. ``progress(stage, n)`` reports ``"generate"``
    and ``"score"`` steps.
    """
    check_compatible(direction, model, allow_other_model)
    for i, m in enumerate(chats):
        if not m or m[-1].get("role") != "assistant" or len(m) < 2:
            raise SteerkitError(f"example {i}: a training chat must end with the assistant's answer after a prompt")
    score = scorer or direction_scorer(direction, model.device)
    tick = (lambda stage: (lambda n: progress(stage, n))) if progress is not None else (lambda stage: None)
    data = chat_activations(model, direction, chats, batch_size, score, allow_other_model, tick("score"))
    own: list[str | None] = [None] * len(chats)
    base_means: list[float | None] = [None] * len(chats)
    if baseline:
        rows = [Row(messages=list(m[:-1]), prompt_index=i) for i, m in enumerate(chats)]
        done = tick("generate")
        comps = generate(model, rows, sampling, batch_size=batch_size, on_complete=(lambda c: done(1)) if progress is not None else None)
        for c in comps:
            own[c.row.prompt_index] = c.text
        own_chats = [list(m[:-1]) + [{"role": "assistant", "content": own[i] or ""}] for i, m in enumerate(chats)]
        base = chat_activations(model, direction, own_chats, batch_size, score, allow_other_model, tick("score"))
        base_means = [b.answer_mean for b in base]
    return [AuditRow(index=i, answer_mean=a.answer_mean, baseline_mean=base_means[i], baseline_answer=own[i]) for i, a in enumerate(data)]


def rank(rows: Sequence[AuditRow]) -> list[AuditRow]:
    """Highest score first (ties in input order; a score that is not a number goes last)."""
    return sorted(rows, key=lambda r: (math.isnan(r.score), -r.score if not math.isnan(r.score) else 0.0, r.index))


def label_of(value: Any, positive: Collection[str]) -> bool | None:
    """A row's class: booleans and numbers as they are, strings by ``positive``; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    return str(value).strip().lower() in positive


def positive_labels(spec: str) -> set[str]:
    """The label values of the positive (risky) class from a comma-separated list."""
    pos = {x.strip().lower() for x in spec.split(",") if x.strip()}
    if not pos:
        raise SteerkitError("--positive is empty: give the label values of the risky class, e.g. misaligned")
    return pos


@dataclass(frozen=True)
class AuditResult:
    records: list[dict[str, Any]]  # every example, highest score first (rank 1 first)
    summary: dict[str, Any]  # the line after the records


def audit_examples(
    model: LoadedModel,
    direction: Direction,
    lines: Sequence[tuple[int, dict[str, Any]]],
    chats: Sequence[Messages],
    *,
    label_field: str = "label",
    positive: Collection[str] = ("misaligned",),
    baseline: bool = True,
    sampling: Sampling = AUDIT_SAMPLING,
    batch_size: int = 16,
    allow_other_model: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> AuditResult:
    """:func:`audit` the training examples (``lines`` from :func:`read_lines`, ``chats[i]`` the
    chat of ``lines[i]``), ranked (:func:`rank`), each with its line, prompt, answers and label
    (``label_field``, positive when in ``positive``: :func:`label_of`); the summary has the ROC
    AUC of the score for the positive class against the rest."""
    labels = [label_of(rec.get(label_field), positive) for _, rec in lines]
    rows = audit(model, direction, chats, baseline=baseline, sampling=sampling, batch_size=batch_size,
                 allow_other_model=allow_other_model, progress=progress)
    sep = separation([r.score for r in rows], labels)
    summary = {
        "summary": True,
        "direction": direction.name,
        "layer": direction.layer,
        "model": model.name,
        "examples": len(rows),
        "score": "projection difference (answer - own answer)" if baseline else "answer activation",
        "label_field": label_field,
        "labelled": sep["n"],
        "positive": sep["positive"],
        "auc": sep["auc"],
        "mean_positive": sep["mean_positive"],
        "mean_rest": sep["mean_rest"],
        "max_new_tokens": sampling.max_new_tokens if baseline else None,
        "temperature": sampling.temperature if baseline else None,
        "seed": sampling.seed,
    }
    recs = [_audit_record(k + 1, r, chats[r.index], lines[r.index], labels[r.index], label_field) for k, r in enumerate(rank(rows))]
    return AuditResult(recs, summary)


def _audit_record(rank_: int, r: AuditRow, chat: Messages, line: tuple[int, dict[str, Any]], label: bool | None, field: str) -> dict[str, Any]:
    n, rec = line
    return {
        "rank": rank_,
        "index": r.index,
        "line": n,
        **({"id": rec["id"]} if "id" in rec else {}),
        "score": json_number(r.score),
        "answer_mean": json_number(r.answer_mean),
        "baseline_mean": json_number(r.baseline_mean),
        "prompt": chat[-2]["content"],
        "answer": chat[-1]["content"],
        "baseline_answer": r.baseline_answer,
        **({field: rec.get(field), "positive": label} if label is not None else {}),
    }


__all__ = ["AUDIT_SAMPLING", "AuditResult", "AuditRow", "audit", "audit_examples", "label_of", "positive_labels", "rank"]
