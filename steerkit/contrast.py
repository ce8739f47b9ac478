"""Difference-of-means directions: mean activation on positive inputs minus mean on negative ones.

This is the extraction steering-vectors (mean aggregator), repeng's ``vector.mean_diff`` and
most contrastive-steering papers share. Inputs are chats (``[{"role", "content"}, ...]``,
formatted with the model's chat template and its assistant-turn opening, like
:func:`steerkit.generate.chat_tokens`) or plain strings (tokenized as the tokenizer does by
default, which is what steering-vectors and repeng do with their strings). Activations are read
at the output of block ``layer`` (``blocks.{layer}.hook_out``, the same point steering-vectors'
``decoder_block`` layer ``layer`` reads), in left-padded batches.

What is read from each input (``read_token_index``):

* an ``int``: that token of each sequence, counted over the real tokens (``-1``, the default,
  is the last token, steering-vectors' default; ``0`` is the attention sink, rarely useful);
* ``"mean"``: the mean over the sequence's tokens with position 0 (the attention sink, norm
  ~25,000 on SmolLM2) and padding left out, via :func:`steerkit.activations.stat_mask`. Each
  input then weighs the same however long it is.

The result is ``mean(positive reads) - mean(negative reads)``; the two sets need not be the same
size or paired.

From labelled answers (:func:`answers_direction`, `steerkit directions from-answers`): each
answer's mean over its own tokens (the tokens `monitor` and `audit` average), positive answers
minus negative ones; paired by prompt (the mean over prompts of each prompt's difference, so a
prompt with many answers weighs no more than one with two, and what the prompts differ in
cancels), or pooled. This is how persona vectors are made from answers a judge has labelled
(Chen et al. 2025, with written or read labels in place of a judge's scores). Not here:
PCA/classifier extraction, multi-layer extraction, SAE latents.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import torch

from steerkit.activations import default_norm_chats, median_token_norm, pad_left, residuals, stat_mask
from steerkit.chat import Messages, chat_tokens
from steerkit.directions import Direction, from_vector
from steerkit.errors import SteerkitError
from steerkit.models import LoadedModel, check_layer
from steerkit.monitor import chat_split

Input = Union[Messages, str]
ReadIndex = Union[int, Literal["mean"]]


def input_tokens(model: LoadedModel, item: Input) -> list[int]:
    """Token ids of one input: a chat via the chat template, a string via the tokenizer."""
    if isinstance(item, str):
        return list(model.tokenizer(item)["input_ids"])
    return chat_tokens(model, item)


def _check_read_index(read_token_index: ReadIndex) -> None:
    if read_token_index == "mean":
        return
    if isinstance(read_token_index, bool) or not isinstance(read_token_index, int):
        raise SteerkitError(f"read_token_index must be an int or 'mean', got {read_token_index!r}")


@torch.inference_mode()
def read_activations(
    model: LoadedModel,
    inputs: Sequence[Input],
    layer: int,
    read_token_index: ReadIndex = -1,
    batch_size: int = 16,
) -> torch.Tensor:
    """One activation per input at block ``layer``'s output: ``[N, d_model]`` float32 on CPU."""
    _check_read_index(read_token_index)
    check_layer(layer, model.n_layers)
    seqs = [input_tokens(model, x) for x in inputs]
    for i, s in enumerate(seqs):
        if not s:
            raise SteerkitError(f"input {i} has no tokens")
        if read_token_index == "mean" and len(s) < 2:
            raise SteerkitError(f"input {i} has one token; 'mean' leaves out position 0 and needs at least two")
        if isinstance(read_token_index, int) and not -len(s) <= read_token_index < len(s):
            raise SteerkitError(f"read_token_index {read_token_index} is outside input {i} ({len(s)} tokens)")
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        ids, am = pad_left(chunk, model.pad_token_id())  # [B, T]
        acts = residuals(model, ids, layer, am).cpu()  # [B, T, d]
        T = ids.shape[1]
        if read_token_index == "mean":
            m = stat_mask(am).to(acts.dtype)  # [B, T]
            out.append((acts * m[..., None]).sum(1) / m.sum(1, keepdim=True))
        else:
            lengths = torch.tensor([len(s) for s in chunk])
            # left padding: real token k of row b sits at T - len_b + k; token -1 at T - 1
            k = read_token_index if read_token_index >= 0 else lengths + read_token_index
            pos = T - lengths + k  # [B]
            out.append(acts[torch.arange(len(chunk)), pos])
    return torch.cat(out)  # [N, d]


def diff_of_means(
    model: LoadedModel,
    positive_chats: Sequence[Input],
    negative_chats: Sequence[Input],
    layer: int,
    read_token_index: ReadIndex = -1,
    batch_size: int = 16,
) -> torch.Tensor:
    """``mean(positive) - mean(negative)`` activations at block ``layer``'s output: ``[d_model]``.

    ``model`` is a :class:`steerkit.models.LoadedModel`; the inputs are chats or strings (see
    the module docstring); ``read_token_index`` is a token index (``-1``: last token) or
    ``"mean"`` (mean over tokens, position 0 and padding left out). The vector keeps its raw norm.
    """
    if not positive_chats or not negative_chats:
        raise SteerkitError("difference of means needs at least one positive and one negative input")
    pos = read_activations(model, positive_chats, layer, read_token_index, batch_size)
    neg = read_activations(model, negative_chats, layer, read_token_index, batch_size)
    return pos.mean(0) - neg.mean(0)


def diff_of_means_direction(
    model: LoadedModel,
    positive_chats: Sequence[Input],
    negative_chats: Sequence[Input],
    layer: int,
    *,
    name: str,
    read_token_index: ReadIndex = -1,
    norm_chats: Sequence[Messages] | None = None,
    description: str = "",
    batch_size: int = 16,
) -> Direction:
    """A ``diff-of-means`` :class:`Direction`: the unit difference of means, with the layer's
    median token norm (over ``norm_chats``, default :func:`steerkit.activations.default_norm_chats`)
    as its strength unit. Provenance records the counts, read index, raw norm and norm prompts."""
    v = diff_of_means(model, positive_chats, negative_chats, layer, read_token_index, batch_size)
    if float(v.norm()) == 0:
        raise SteerkitError("positive and negative inputs give identical mean activations: no direction")
    chats = list(norm_chats) if norm_chats is not None else default_norm_chats()
    med = median_token_norm(model, chats, layer, batch_size)
    prov = {
        "method": "diff-of-means",
        "n_positive": len(positive_chats),
        "n_negative": len(negative_chats),
        "read_token_index": read_token_index,
        "raw_norm": float(v.norm()),
        "norm_prompts": "default" if norm_chats is None else len(chats),
    }
    return from_vector(v, name=name, model=model, layer=layer, kind="diff-of-means", median_norm=med, description=description, provenance=prov)


@torch.inference_mode()
def answer_means(model: LoadedModel, chats: Sequence[Messages], layer: int, batch_size: int = 16,
                 progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """Each chat's mean activation at block ``layer``'s output over its final assistant turn
    (tokens ``[answer_start, end)`` of :func:`steerkit.monitor.chat_split`, its end-of-turn token
    included, as `monitor` and `audit` average them): ``[len(chats), d_model]`` float32 on CPU.
    ``progress(n)`` after each batch."""
    check_layer(layer, model.n_layers)
    split = [chat_split(model, list(c)) for c in chats]
    for i, (ids, start) in enumerate(split):
        if start >= len(ids):
            raise SteerkitError(f"answer {i} has no tokens: every chat must end with a non-empty assistant turn")
        if len(ids) > model.context_length:
            raise SteerkitError(f"answer {i} has {len(ids)} tokens, more than the context length {model.context_length}: shorten it")
    out = torch.empty(len(split), model.d_model)
    order = sorted(range(len(split)), key=lambda i: -len(split[i][0]))  # similar lengths batch together
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, am = pad_left([split[i][0] for i in idx], model.pad_token_id())
        acts = residuals(model, ids, layer, am).float().cpu()  # [B, T, d]
        T = ids.shape[1]
        for b, i in enumerate(idx):
            toks, start = split[i]
            out[i] = acts[b, T - len(toks) + start :].mean(0)
        if progress is not None:
            progress(len(idx))
    return out


def prompt_keys(chats: Sequence[Messages]) -> list[str]:
    """One key per chat for pairing its answer: the chat before the answer, as JSON."""
    return [json.dumps(list(c)[:-1], sort_keys=True) for c in chats]


def answer_groups(positive: Sequence[bool], keys: Sequence[str] | None = None) -> list[tuple[list[int], list[int]]]:
    """The (positive, negative) answer indices whose means are differenced: one group per key
    holding answers of both classes (answers under other keys are left out), or, without
    ``keys``, one pooled group. Fails in one line where there is nothing to difference."""
    pos = [bool(x) for x in positive]
    if keys is None:
        group = ([i for i, p in enumerate(pos) if p], [i for i, p in enumerate(pos) if not p])
        if not group[0] or not group[1]:
            raise SteerkitError(f"a difference of means needs positive and negative answers, got {len(group[0])} and {len(group[1])}")
        return [group]
    if len(keys) != len(pos):
        raise SteerkitError(f"{len(pos)} labels but {len(keys)} keys")
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for i, (k, p) in enumerate(zip(keys, pos)):
        groups.setdefault(k, ([], []))[0 if p else 1].append(i)
    both = [g for g in groups.values() if g[0] and g[1]]
    if not both:
        raise SteerkitError(f"no prompt has both a positive and a negative answer ({len(groups)} prompts): pair them, or use --unpaired")
    return both


def answers_diff_of_means(means: torch.Tensor, positive: Sequence[bool], keys: Sequence[str] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Positive minus negative answers' mean activations (``means [N, d]``). With ``keys`` (one per
    answer, e.g. its prompt), paired: the mean over keys holding both classes of the key's
    positive mean minus its negative mean, the other answers left out; without, pooled
    (:func:`answer_groups`). Returns the raw vector and counts (positive, negative, groups,
    answers left out)."""
    if len(positive) != means.shape[0]:
        raise SteerkitError(f"{means.shape[0]} answers but {len(positive)} labels")
    groups = answer_groups(positive, keys)
    v = torch.stack([means[g[0]].mean(0) - means[g[1]].mean(0) for g in groups]).mean(0)
    n_pos, n_neg = sum(len(g[0]) for g in groups), sum(len(g[1]) for g in groups)
    return v, {"paired": keys is not None, "n_positive": n_pos, "n_negative": n_neg,
               "groups": len(groups) if keys is not None else None, "left_out": len(positive) - n_pos - n_neg}


def answers_direction(
    model: LoadedModel,
    chats: Sequence[Messages],
    positive: Sequence[bool],
    layer: int,
    *,
    name: str,
    paired: bool = True,
    description: str = "",
    source: str | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> Direction:
    """A ``diff-of-means`` :class:`Direction` from labelled answers (chats ending with the answer):
    :func:`answer_means` then :func:`answers_diff_of_means`, paired by the chat before the answer
    when ``paired``. The strength unit is the layer's median token norm; provenance keeps the
    counts, the pairing and ``source``."""
    if len(chats) != len(positive):
        raise SteerkitError(f"{len(chats)} answers but {len(positive)} labels")
    keys = prompt_keys(chats) if paired else None
    answer_groups(positive, keys)  # fail on the labels before any forward pass
    means = answer_means(model, chats, layer, batch_size, progress)
    v, info = answers_diff_of_means(means, positive, keys)
    if float(v.norm()) == 0:
        raise SteerkitError("positive and negative answers give identical mean activations: no direction")
    med = median_token_norm(model, default_norm_chats(), layer, batch_size)
    prov = {"method": "answers-diff-of-means", "read": "mean over each answer's tokens", **info, "raw_norm": float(v.norm()),
            "norm_prompts": "default", **({"source": source} if source else {})}
    return from_vector(v, name=name, model=model, layer=layer, kind="diff-of-means", median_norm=med, description=description, provenance=prov)


def read_contrast(path: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """A contrast file: {"pairs": [{"pos", "neg"}], "questions": [...]} (``instruction`` also accepted for
    ``pairs``), as `steerkit extract --contrast` reads it: (pairs as (pos, neg), questions)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SteerkitError(f"contrast file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise SteerkitError(f"{path} is not valid JSON ({e.msg})") from None
    pairs_raw = data.get("pairs", data.get("instruction")) if isinstance(data, dict) else None
    qs = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(pairs_raw, list) or not pairs_raw or not isinstance(qs, list) or not qs:
        raise SteerkitError(f"{path}: expected {{'pairs': [{{'pos': ..., 'neg': ...}}], 'questions': [...]}}")
    pairs = []
    for i, p in enumerate(pairs_raw):
        if not isinstance(p, dict) or not isinstance(p.get("pos"), str) or not isinstance(p.get("neg"), str):
            raise SteerkitError(f"{path}: pair {i} needs 'pos' and 'neg' strings")
        pairs.append((p["pos"], p["neg"]))
    return pairs, [str(q) for q in qs]
