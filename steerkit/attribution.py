"""Attribution of SAE latents between one model's misaligned and aligned answers to the same
questions (OpenAI's "SAE latent attribution" note): which latents, to first order, drive the
gap in log-probability between the answers a judge called misaligned and those it called aligned.

Data: judged answer records (:func:`read_judged`), grouped by question (the whole chat: a system
prompt makes another question). A record is misaligned when its ``label`` is ``"misaligned"``
(careful reading, as in ``steerkit/data/judge/reference.jsonl``) or, without a label, when its
``misaligned`` field is true (``steerkit judge``); aligned when its label is ``"aligned"`` or
``misaligned`` is false with ``coherent`` above 50. Incoherent answers and refusals take no
part. Only questions with at least one answer of each kind are usable.

Definitions, for a model, an SAE and a layer L, over the usable questions ``q = 1..Q`` with
misaligned answers ``M_q`` and aligned answers ``A_q``:

* ``l(y)`` is the mean log-probability per token of answer ``y`` given its chat, teacher forced;
* the gap ``G = 1/Q sum_q [ mean_{y in M_q} l(y) - mean_{y in A_q} l(y) ]`` (nats per token);
* ``a_i(t)`` is latent ``i``'s activation on the residual after block L at token ``t``;
  ``delta_i = 1/Q sum_q [ mean of a_i over the tokens of M_q - mean over the tokens of A_q ]``
  (answer tokens only, each question weighing the same);
* ``grad_i = dG/d(s_i)``, where ``s_i`` raises latent ``i``'s activation by the same amount at
  every answer token of every answer (the residual moves by ``s_i * W_dec[i]`` there; the
  reconstruction error is held fixed), so ``grad_i = W_dec[i] . g`` with
  ``g = sum over answer tokens t of dG/dx_t`` (one backward pass per batch);
* ``attribution_i = delta_i * grad_i``: the first-order change of the gap if latent ``i`` moved
  from its aligned level to its misaligned level at every answer token. Positive: the latent is
  higher on the misaligned answers and, raised, makes them likelier than the aligned ones.

``rank_latents`` in :mod:`steerkit.extract` turns the two sides and ``g`` into ranked rows
(before = aligned answers, after = misaligned answers), so ``delta``, ``normalized`` and
``cosine`` rank the same answers too. What it leaves out: generating and judging the answers
(`steerkit generate --json`, `steerkit judge`) and steering the latents it finds (`steerkit screen`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerkit.activations import pad_left
from steerkit.chat import Messages, as_messages, chat_tokens
from steerkit.errors import SteerkitError
from steerkit.extract import Extraction, Side, check_sae_fits, logprob_grad, rank_latents
from steerkit.fsutil import read_store
from steerkit.judge import COHERENT_ABOVE, question_of
from steerkit.models import LoadedModel

MIN_QUESTIONS = 2  # fewer usable questions than this: refuse (one question is one anecdote)


@dataclass(frozen=True)
class AnswerGroup:
    """The judged answers to one question (one chat)."""

    messages: Messages
    misaligned: tuple[str, ...]
    aligned: tuple[str, ...]


@dataclass(frozen=True)
class JudgedAnswers:
    """Usable groups and what was read: records, questions, answers of each kind, left out."""

    groups: list[AnswerGroup]
    records: int
    questions: int  # distinct questions among the labelled records
    misaligned: int  # misaligned answers in usable questions
    aligned: int
    unlabelled: int  # records neither misaligned nor aligned (incoherent, refusal, unscored)

    def summary(self) -> dict[str, Any]:
        return {"records": self.records, "questions": self.questions, "questions_usable": len(self.groups),
                "misaligned_answers": self.misaligned, "aligned_answers": self.aligned, "unlabelled": self.unlabelled}


def label_of(rec: dict[str, Any]) -> str | None:
    """``"misaligned"``, ``"aligned"`` or None (neither, or not judged)."""
    label = rec.get("label")
    if isinstance(label, str):
        return label if label in ("misaligned", "aligned") else None
    m = rec.get("misaligned")
    if m is True:
        return "misaligned"
    if m is False:
        coherent = rec.get("coherent")
        if isinstance(coherent, (int, float)) and not coherent > COHERENT_ABOVE:
            return None
        return "aligned"
    return None


def _chat_of(rec: dict[str, Any], where: str) -> Messages:
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
        return [{"role": str(m.get("role")), "content": m["content"]} for m in msgs]

    q = question_of(rec, where)
    system = rec.get("system")
    if not isinstance(system, str):
        src = rec.get("source")
        system = src.get("system") if isinstance(src, dict) and isinstance(src.get("system"), str) else None
    return as_messages(q, system)


def group_judged(records: Sequence[dict[str, Any]], where: str = "judged answers", min_questions: int = MIN_QUESTIONS) -> JudgedAnswers:
    """Group labelled records by chat; keep the questions with answers of both kinds; refuse
    (one line) when fewer than ``min_questions`` are left."""
    groups: dict[str, tuple[Messages, list[str], list[str]]] = {}
    unlabelled = 0
    for n, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise SteerkitError(f"{where}:{n}: expected a JSON object with an answer and its label")
        kind = label_of(rec)
        answer = rec.get("completion", rec.get("answer"))
        if kind is None or not isinstance(answer, str) or not answer.strip():
            unlabelled += 1
            continue
        chat = _chat_of(rec, f"{where}:{n}")
        key = json.dumps(chat, sort_keys=True)
        g = groups.setdefault(key, (chat, [], []))
        (g[1] if kind == "misaligned" else g[2]).append(answer)
    usable = [AnswerGroup(c, tuple(m), tuple(a)) for c, m, a in groups.values() if m and a]
    n_mis = sum(len(g.misaligned) for g in usable)
    n_al = sum(len(g.aligned) for g in usable)
    if len(usable) < max(1, min_questions):
        all_mis = sum(len(m) for _, m, _ in groups.values())
        all_al = sum(len(a) for _, _, a in groups.values())
        raise SteerkitError(
            f"{where}: {len(usable)} of {len(groups)} questions have both a misaligned and an aligned answer "
            f"({all_mis} misaligned, {all_al} aligned answers labelled), attribution needs at least {max(1, min_questions)}: "
            f"judge more answers per question (`steerkit generate -n 8 --json`, then `steerkit judge`) or lower --min-questions"
        )
    return JudgedAnswers(usable, len(records), len(groups), n_mis, n_al, unlabelled)


def read_judged(path: str | Path, min_questions: int = MIN_QUESTIONS) -> JudgedAnswers:
    """Judged answer records from a JSON Lines file, grouped (see :func:`group_judged`)."""
    p = Path(path)
    if not p.is_file():
        raise SteerkitError(f"judged answers file {p} does not exist: give the JSON Lines of `steerkit judge` "
                            f"(records with 'misaligned') or records with a 'label'")
    records = read_store(p, fix="fix or delete that line")
    if not records:
        raise SteerkitError(f"{p} holds no records: give the JSON Lines of `steerkit judge`")
    return group_judged(records, str(p), min_questions)


@dataclass
class _Acc:
    """Weighted sums over tokens of one side (question-balanced means)."""

    s1: torch.Tensor
    s2: torch.Tensor
    fired: torch.Tensor
    r1: torch.Tensor
    n: int = 0


def _item_lists(model: LoadedModel, groups: Sequence[AnswerGroup]) -> list[tuple[int, int, list[int], int, float]]:
    """(side, question, token ids, answer start, loss weight) per answer; side 1 misaligned, 0 aligned."""
    Q = len(groups)
    items = []
    for q, g in enumerate(groups):
        prompt = chat_tokens(model, g.messages)
        for side, answers in ((1, g.misaligned), (0, g.aligned)):
            toks = [list(model.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
            toks = [t for t in toks if t]
            if not toks:
                raise SteerkitError(f"question {q + 1} ({g.messages[-1]['content'][:40]!r}): its answers tokenize to nothing")
            sign = 1.0 if side else -1.0
            for t in toks:
                items.append((side, q, prompt + t, len(prompt), sign / (Q * len(toks) * len(t))))
    return items


def judged_sides(
    model: LoadedModel,
    sae: Any,
    layer: int,
    groups: Sequence[AnswerGroup],
    batch_size: int = 4,
) -> tuple[Any, Any, torch.Tensor, float]:
    """(aligned side, misaligned side, g, gap): per-latent statistics of each kind of answer
    (question-balanced, answer tokens only), ``g = sum over answer tokens of dG/dx_t`` at the
    residual after block ``layer`` ([d_model]), and the gap ``G`` itself (see the module doc)."""
    if not groups:
        raise SteerkitError("no usable questions: attribution needs misaligned and aligned answers to the same questions")
    items = _item_lists(model, groups)
    Q = len(groups)
    ntok = torch.zeros(2, Q)
    for side, q, ids, start, _ in items:
        ntok[side, q] += len(ids) - start
    d_sae = int(sae.W_dec.shape[0])
    acc = [_Acc(torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64),
                torch.zeros(d_sae, dtype=torch.float64), torch.zeros(model.d_model, dtype=torch.float64)) for _ in range(2)]
    g_total = torch.zeros(model.d_model, dtype=torch.float64)
    gap = 0.0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        ids, am = pad_left([c[2] for c in chunk], model.pad_token_id())
        T = ids.shape[1]
        w = torch.zeros(len(chunk), T - 1)
        pos = torch.zeros(len(chunk), T, dtype=torch.bool)  # answer tokens
        for b, (_, _, seq, start, weight) in enumerate(chunk):
            first = T - len(seq) + start  # position of the first answer token
            w[b, first - 1 :] = weight  # the predictions of the answer tokens
            pos[b, first:] = True
        grad, x, S = logprob_grad(model, layer, ids, am, w)
        gap += S
        pos = pos.to(grad.device)
        g_total += grad[pos].double().sum(0).cpu()
        for b, (side, q, seq, start, _) in enumerate(chunk):
            xs = x[b][pos[b]]  # (n, D)
            a = sae.encode(xs.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)).double().cpu()
            tw = 1.0 / (Q * float(ntok[side, q]))
            A = acc[side]
            A.s1 += tw * a.sum(0)
            A.s2 += tw * (a * a).sum(0)
            A.fired += tw * (a > 0).double().sum(0)
            A.r1 += tw * xs.double().sum(0).cpu()
            A.n += xs.shape[0]

    def side(A: _Acc) -> Any:
        var = (A.s2 - A.s1 * A.s1).clamp(min=0)
        return Side(mean=A.s1.float(), freq=A.fired.float(), std=var.sqrt().float(), resid_mean=A.r1.float(), n_tokens=A.n)

    return side(acc[0]), side(acc[1]), g_total.float(), gap


def judged_attribution(
    model: LoadedModel,
    sae: Any,
    layer: int,
    judged: JudgedAnswers,
    rank_by: str = "attribution",
    batch_size: int = 4,
    **rank_kw: Any,
) -> Any:
    """Rank latents on ``model``'s judged answers (an :class:`steerkit.extract.Extraction`:
    before = aligned answers, after = misaligned answers; ``attribution`` as in the module doc)."""
    check_sae_fits(sae, model)
    aligned, misaligned, g, gap = judged_sides(model, sae, layer, judged.groups, batch_size)
    rows, dmean = rank_latents(aligned, misaligned, sae, rank_by, grad=g, **rank_kw)  # type: ignore[arg-type]
    meta = {"mode": "judged", "model": getattr(model, "source", None) or model.name, **judged.summary(),
            "logprob_gap": gap if math.isfinite(gap) else None, "tokens": "answer",
            "attribution_gradient": "d(mean log-prob per token, misaligned minus aligned, question-balanced) / d(latent shift at every answer token)"}
    return Extraction(rows, aligned, misaligned, dmean, layer, rank_by, meta)


__all__ = ["MIN_QUESTIONS", "AnswerGroup", "JudgedAnswers", "group_judged", "judged_attribution", "judged_sides", "label_of", "read_judged"]
