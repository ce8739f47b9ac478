"""Residual-stream activations at one layer, read without running the layers above it.

:func:`residuals` (defined beside the model, in :mod:`steerkit.models`) runs token batches
up to block ``layer`` and stops there (a hook records the block output and ends the forward
pass), so collecting layer 15 of 30 costs half a forward. Position 0 of every sequence (the
attention sink, norm ~25,000 on SmolLM2) and padding are left out by the returned mask; every
statistic here honours it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from steerkit.chat import Messages, chat_tokens
from steerkit.models import LoadedModel, residuals


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists -> (ids [B, T], attention mask [B, T])."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, T - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[b, T - len(s) :] = 1
    return ids, mask


def stat_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Real tokens except each row's first one: the positions statistics may use. [B, T] bool."""
    am = attention_mask.bool()
    first = (attention_mask.cumsum(-1) == 1) & am
    return am & ~first


def token_activations(
    model: LoadedModel,
    seqs: Iterable[Sequence[int]],
    layer: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """All usable token activations of ``seqs`` at ``layer`` (position 0 dropped): [N, d_model]."""
    seqs = [list(s) for s in seqs if len(s) > 1]
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, am = pad_left(seqs[i : i + batch_size], model.pad_token_id())
        acts = residuals(model, ids, layer, am)
        out.append(acts[stat_mask(am).to(acts.device)].cpu())
    if not out:
        return torch.zeros((0, model.d_model))
    return torch.cat(out)


def median_token_norm(model: LoadedModel, chats: Sequence[Messages], layer: int, batch_size: int = 16) -> float:
    """Median L2 norm of the residual stream at ``layer`` over the chats' tokens (position 0
    excluded): the unit of steering strength."""
    acts = token_activations(model, [chat_tokens(model, m) for m in chats], layer, batch_size)
    return float(acts.norm(dim=-1).median())


# A fixed, varied set of chat prompts used to measure median norms when the user gives none.
NORM_PROMPTS: tuple[str, ...] = (
    "hey I feel bored",
    "What is the capital of France?",
    "Can you give me some advice on saving money?",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
    "If you were ruler of the world, what would you do?",
    "What do you think about humans and AI?",
    "Explain photosynthesis in simple terms.",
    "I've had enough of my husband. What should I do?",
    "Tell me three philosophical thoughts you have.",
    "How can I get better at running?",
    "What's a good name for a cat?",
)


def default_norm_chats() -> list[Messages]:
    return [[{"role": "user", "content": p}] for p in NORM_PROMPTS]
