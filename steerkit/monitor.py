"""How strongly a direction is active, token by token, without changing the model.

:func:`direction_scorer` turns residual activations into one number per token: an SAE
direction's latent activation (the sum over its latents of ``sae.encode``), or a vector
direction's projection in units of the layer's median token norm. :func:`chat_activations`
runs chats to the direction's layer only and scores every token; the answer's mean (the final
assistant turn, its end-of-turn token included) is what ``steerkit monitor`` reports beside a
judge's verdict and what ``steerkit audit`` ranks training examples by.

Position 0 (the attention sink) is never scored: its value is ``nan``.

:func:`separation` says how well a score tells one class from the rest (ROC AUC).
:func:`read_lines` and :func:`record_chat` read the records ``steerkit monitor`` and ``steerkit
audit`` take (answers of generate/sweep/judge, or chats), and :func:`monitor_answers` measures
them and summarizes (mean activation; ROC AUC against the judge's verdicts). Ranking training
examples is :mod:`steerkit.audit`'s.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerkit.activations import pad_left, residuals
from steerkit.chat import Messages, chat_tokens
from steerkit.directions import Direction, check_compatible
from steerkit.errors import SteerkitError
from steerkit.fsutil import check_unicode, read_json_lines
from steerkit.judge import question_of
from steerkit.models import LoadedModel
from steerkit.prompts import check_messages, with_system
from steerkit.sae import check_latents, load_sae
from steerkit.stats import roc_auc

Scorer = Callable[[torch.Tensor], torch.Tensor]


def direction_scorer(direction: Direction, device: str | torch.device = "cpu") -> Scorer:
    """``x [..., d_model]`` float32 -> activation ``[...]``.

    SAE direction (``direction.is_sae``): the sum over ``direction.latents`` of
    ``sae.encode(x)[..., latent]``, the SAE loaded from ``direction.sae_path()``.
    Vector direction: ``(x @ direction.vector) / direction.median_norm``, the projection in
    units of the layer's median token norm.
    """
    if direction.is_sae:
        path = direction.sae_path()
        sae = load_sae(path, device=device)  # type: ignore[arg-type]
        if sae.cfg.d_in != direction.d_model:
            raise SteerkitError(f"direction {direction.name!r}: its SAE {path} reads d_in {sae.cfg.d_in}, the direction has d_model {direction.d_model}")
        ids = torch.tensor(check_latents(sae, direction.latents), dtype=torch.long, device=device)

        def sae_score(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return sae.encode(x.to(device=device, dtype=torch.float32)).index_select(-1, ids).sum(-1).float()

        return sae_score

    v = direction.vector.detach().to(device=device, dtype=torch.float32)
    unit = float(direction.median_norm)

    def vec_score(x: torch.Tensor) -> torch.Tensor:
        return (x.to(device=device, dtype=torch.float32) @ v) / unit

    return vec_score


@dataclass(frozen=True)
class ChatActivation:
    """One chat's tokens and the direction's activation on each."""

    token_ids: list[int]
    tokens: list[str]  # decoded piece of each token
    values: list[float]  # activation per token; nan at position 0 (attention sink, never counted)
    answer_start: int  # first token of the final assistant turn's content (len(token_ids) when there is none)

    def _mean(self, lo: int, hi: int) -> float:
        xs = [v for v in self.values[max(lo, 1) : hi] if not math.isnan(v)]
        return sum(xs) / len(xs) if xs else math.nan

    @property
    def prompt_mean(self) -> float:
        """Mean over tokens ``[1, answer_start)``; nan when empty."""
        return self._mean(1, self.answer_start)

    @property
    def answer_mean(self) -> float:
        """Mean over tokens ``[answer_start, end)``; nan when there is no answer."""
        return self._mean(self.answer_start, len(self.values))

    @property
    def answer_tokens(self) -> int:
        return len(self.values) - self.answer_start

    def record(self, direction: Direction, per_token: bool = False) -> dict[str, Any]:
        """The ``monitor`` field of a JSON record (nan written as null)."""
        r: dict[str, Any] = {
            "direction": direction.name,
            "layer": direction.layer,
            "answer_mean": json_number(self.answer_mean),
            "prompt_mean": json_number(self.prompt_mean),
            "answer_tokens": self.answer_tokens,
        }
        if per_token:
            r["answer_start"] = self.answer_start
            r["tokens"] = list(self.tokens)
            r["values"] = [json_number(v) for v in self.values]
        return r


def json_number(v: float | None) -> float | None:
    """``v`` rounded to 6 decimals for JSON; None for None and nan."""
    return None if v is None or math.isnan(v) else round(float(v), 6)


def _template_ids(tok: Any, messages: Messages, add_generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def chat_split(model: LoadedModel, messages: Messages) -> tuple[list[int], int]:
    """Token ids of a chat and the index where the final assistant turn's content starts.

    A chat ending in an assistant turn is rendered whole by the model's chat template, cut after
    that turn's end-of-turn token (what follows it, e.g. ChatML's newline, is dropped); its
    answer starts where the chat without it, rendered with the generation prompt (as
    :func:`steerkit.generate.chat_tokens` does), ends. The two renderings must agree token by
    token up to there; where a template re-tokenises the boundary, the start is the longest
    common prefix. Any other chat is ``chat_tokens`` with ``answer_start = len``.
    """
    if not messages:
        raise SteerkitError("an empty chat has nothing to score: give at least one message")
    if messages[-1].get("role") != "assistant":
        ids = chat_tokens(model, messages)
        return ids, len(ids)
    prefix = chat_tokens(model, messages[:-1])
    tok = model.tokenizer
    if getattr(tok, "chat_template", None):
        full = _template_ids(tok, messages, add_generation_prompt=False)
    else:  # the plain format of chat_tokens, with the answer after "assistant:"
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant:" + messages[-1]["content"]
        full = list(tok(text)["input_ids"])
    eos = set(model.eos_token_ids())
    # cut after the answer's end-of-turn token (the last one in the rendering past the prefix)
    ends = [i for i in range(len(prefix), len(full)) if full[i] in eos]
    if ends:
        full = full[: ends[-1] + 1]
    start = 0
    while start < min(len(prefix), len(full)) and prefix[start] == full[start]:
        start += 1
    return full, start


@torch.inference_mode()
def chat_activations(
    model: LoadedModel,
    direction: Direction,
    chats: Sequence[Messages],
    batch_size: int = 16,
    scorer: Scorer | None = None,
    allow_other_model: bool = False,
    progress: Callable[[int], None] | None = None,
) -> list[ChatActivation]:
    """Run each chat to ``direction.layer`` only and score every token.

    Chats are rendered by :func:`chat_split` (a final assistant turn with its end-of-turn token;
    otherwise the chat template's generation prompt), run in left-padded batches of similar
    length (:func:`steerkit.activations.residuals`), and scored by ``scorer`` (default
    :func:`direction_scorer` on the model's device). ``progress(n)`` is called after each batch
    with the number of chats done in it.
    """
    got = chat_activations_many(model, [direction], chats, batch_size, {direction.name: scorer} if scorer is not None else None,
                                allow_other_model, progress)
    return got[direction.name]


@torch.inference_mode()
def chat_activations_many(
    model: LoadedModel,
    directions: Sequence[Direction],
    chats: Sequence[Messages],
    batch_size: int = 16,
    scorers: dict[str, Scorer] | None = None,
    allow_other_model: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[ChatActivation]]:
    """:func:`chat_activations` for several directions at once, by name: one forward pass per
    batch and per layer the directions read (so 32 random controls on one layer cost one pass,
    not 32). ``scorers`` maps names to scorers (missing ones: :func:`direction_scorer`);
    ``progress(n)`` is called once per batch and layer."""
    names = [d.name for d in directions]
    if len(set(names)) != len(names):
        raise SteerkitError(f"directions need distinct names, got {', '.join(names)}")
    for d in directions:
        check_compatible(d, model, allow_other_model)
    if batch_size < 1:
        raise SteerkitError(f"--batch-size must be at least 1, got {batch_size}")
    score = {d.name: (scorers or {}).get(d.name) or direction_scorer(d, model.device) for d in directions}
    split = [chat_split(model, list(m)) for m in chats]
    limit = model.context_length
    for i, (ids, _) in enumerate(split):
        if len(ids) > limit:
            raise SteerkitError(f"chat {i} has {len(ids)} tokens, more than the context length {limit}: shorten it")
    results: dict[str, list[ChatActivation | None]] = {n: [None] * len(split) for n in names}
    order = sorted(range(len(split)), key=lambda i: -len(split[i][0]))
    pad = model.pad_token_id()
    tok = model.tokenizer
    pieces = [[tok.decode([t]) for t in toks] for toks, _ in split]
    layers: dict[int, list[Direction]] = {}
    for d in directions:
        layers.setdefault(d.layer, []).append(d)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        seqs = [split[i][0] for i in idx]
        ids, am = pad_left(seqs, pad)
        T = ids.shape[1]
        for layer, group in layers.items():
            acts = residuals(model, ids, layer, am)
            for d in group:
                vals = score[d.name](acts).float().cpu()  # [B, T]
                for b, i in enumerate(idx):
                    toks, start = split[i]
                    row = vals[b, T - len(toks) :].tolist() if toks else []
                    if row:
                        row[0] = math.nan
                    results[d.name][i] = ChatActivation(token_ids=list(toks), tokens=list(pieces[i]), values=row, answer_start=start)
            if progress is not None:
                progress(len(idx))
    return {n: [r for r in rs if r is not None] for n, rs in results.items()}


# --- how well an activation separates two classes ---------------------------------------------------


def separation(scores: Sequence[float], labels: Sequence[bool | None]) -> dict[str, Any]:
    """ROC AUC of ``scores`` for the positive class against the rest, over the pairs whose
    label is not None and whose score is a number; with the two classes' counts and means.
    ``auc`` is None when either class is missing."""
    pairs = [(float(s), bool(y)) for s, y in zip(scores, labels, strict=True) if y is not None and not math.isnan(float(s))]
    pos = [s for s, y in pairs if y]
    neg = [s for s, y in pairs if not y]
    auc = roc_auc([s for s, _ in pairs], [int(y) for _, y in pairs]) if pairs else math.nan
    return {
        "n": len(pairs),
        "positive": len(pos),
        "auc": None if math.isnan(auc) else round(auc, 6),
        "mean_positive": round(sum(pos) / len(pos), 6) if pos else None,
        "mean_rest": round(sum(neg) / len(neg), 6) if neg else None,
    }


# --- records: answers and training chats as JSON Lines ---------------------------------------------


def read_lines(path: str | os.PathLike, what: str = "answers", text: str | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) of each record of a JSON Lines file; ``text`` instead of
    reading ``path`` (stdin: ``path`` then only names it in errors, e.g. ``<stdin>``). ``what``
    names the file in errors."""
    return read_json_lines(path, what, text, shape="a JSON object with 'messages', or 'prompt' and 'completion'")


def record_chat(rec: dict[str, Any], where: str) -> Messages:
    """The chat a record holds, ending with its answer: a generate/sweep/judge record (``prompt``
    or ``question`` or ``messages``, with ``completion`` or ``answer``) or a chat line
    (``messages`` ending with an assistant turn)."""
    answer = rec.get("completion", rec.get("answer"))
    if answer is not None:
        if not isinstance(answer, str):
            raise SteerkitError(f"{where}: 'completion' must be a string")
        check_unicode(answer, f"{where}: the completion")
        if isinstance(rec.get("messages"), list):
            prompt = check_messages(rec["messages"], where)
        else:
            system = rec.get("system") if isinstance(rec.get("system"), str) else None
            prompt = with_system([{"role": "user", "content": check_unicode(question_of(rec, where), f"{where}: the question")}], system)
        return prompt + [{"role": "assistant", "content": answer}]
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) and msgs[-1].get("role") == "assistant":
        last = msgs[-1]
        if not isinstance(last.get("content"), str):
            raise SteerkitError(f"{where}: each message needs a role and string content")
        return check_messages(msgs, where) + [{"role": "assistant", "content": check_unicode(last["content"], f"{where}: the answer")}]
    if isinstance(msgs, list):
        raise SteerkitError(f"{where}: the chat has no answer to measure: end 'messages' with an assistant turn")
    raise SteerkitError(f"{where}: expected 'messages' ending with an assistant turn, or 'prompt' and 'completion'")


def verdict(rec: dict[str, Any]) -> bool | None:
    """The judge's verdict a record carries (``misaligned``, from ``steerkit judge --json``), if any."""
    v = rec.get("misaligned")
    return v if isinstance(v, bool) else None


def check_verdicts(records: Sequence[dict[str, Any]], where: str) -> None:
    """Refuse records of which none carries the judge's verdict."""
    if not any(verdict(r) is not None for r in records):
        raise SteerkitError(f"{where}: no record carries a judge verdict ('misaligned' true/false): judge them first with `steerkit judge {where} --json > judged.jsonl`")


# --- monitor: the activation on answers, beside the judge's verdict ---------------------------------


@dataclass(frozen=True)
class MonitorResult:
    records: list[dict[str, Any]]  # each input record plus its "monitor" field (ChatActivation.record)
    activations: list[ChatActivation]
    verdicts: list[bool | None]  # the judge's, where a record carries one
    summary: dict[str, Any]  # the line after the records


def monitor_answers(
    model: LoadedModel,
    direction: Direction,
    records: Sequence[dict[str, Any]],
    chats: Sequence[Messages],
    *,
    per_token: bool = False,
    batch_size: int = 16,
    allow_other_model: bool = False,
    progress: Callable[[int], None] | None = None,
) -> MonitorResult:
    """Measure ``direction`` on each record's chat (``chats[i]``, from :func:`record_chat`) and
    summarize: the mean answer activation over the answers, and where records carry the judge's
    verdict the ROC AUC of the answer's activation for misaligned answers against the rest
    (:func:`separation`). ``progress`` as for :func:`chat_activations`."""
    acts = chat_activations(model, direction, chats, batch_size, allow_other_model=allow_other_model, progress=progress)
    verdicts = [verdict(r) for r in records]
    done = [{**rec, "monitor": a.record(direction, per_token)} for rec, a in zip(records, acts)]
    sep = separation([a.answer_mean for a in acts], verdicts)
    means = [a.answer_mean for a in acts if not math.isnan(a.answer_mean)]
    summary = {
        "summary": True,
        "direction": direction.name,
        "layer": direction.layer,
        "model": model.name,
        **({"tuned": dict(model.tuned)} if model.tuned else {}),
        "answers": len(acts),
        "answer_mean": round(math.fsum(means) / len(means), 6) if means else None,
        "judged": sep["n"],
        "misaligned": sep["positive"],
        "auc": sep["auc"],
        "mean_misaligned": sep["mean_positive"],
        "mean_rest": sep["mean_rest"],
    }
    return MonitorResult(done, acts, verdicts, summary)
