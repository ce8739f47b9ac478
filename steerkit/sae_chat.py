"""Chat data for SAE training: conversations packed whole, special tokens masked, mixed with
plain text at an exact share of the training tokens.

* :func:`read_chat_files` reads ``{"messages": [{"role", "content"}, ...]}`` JSON Lines as
  ``steerkit finetune`` does (:func:`steerkit.finetune.read_chats`), roles and Unicode checked.
* :func:`render_chat` drops a conversation's system prompt with probability ``drop_system``,
  decided by a hash of (seed, epoch, conversation index), so a run and its resumption agree.
  A chat template that inserts a default system prompt when there is none (SmolLM2's: "You are
  a helpful AI assistant named SmolLM, trained by Hugging Face") renders that default instead,
  which is what the model sees at generation time without a system prompt.
* :class:`ChatStream` packs rendered conversations into ``[n, context]`` chunks without ever
  splitting one: a conversation that does not fit in what is left of a chunk starts the next
  one, and the rest of the chunk is padding (right-padded, so causal attention leaves the real
  tokens untouched). A conversation longer than ``context`` keeps its first ``context`` tokens
  (counted as truncated).
* :func:`keep_mask` marks the positions whose activations are trained on: not position 0 of a
  chunk (the attention sink), not a special token (``<|im_start|>``, ``<|im_end|>``, padding:
  outliers), not padding.
* :class:`MixSource` fills a buffer with exactly ``chat_per_batch x batches`` chat activations
  and ``text_per_batch x batches`` plain-text ones, and :func:`mixed_batches` draws every
  training batch with exactly ``chat_per_batch`` chat tokens.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from steerkit.activations import residuals
from steerkit.chat import Messages
from steerkit.corpus import docs_tokens
from steerkit.errors import SteerkitError
from steerkit.finetune import read_chats
from steerkit.fsutil import check_unicode
from steerkit.models import LoadedModel
from steerkit.prompts import ROLES

ActsFn = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


def read_chat_files(paths: Sequence[str | os.PathLike]) -> list[Messages]:
    """Every chat of the ``--chat`` files, in file order; one line naming the bad file or line."""
    chats: list[Messages] = []
    for p in paths:
        try:
            rows = read_chats(p)
        except SteerkitError as e:
            raise SteerkitError(f"--chat: {e}") from None
        for n, msgs in enumerate(rows, 1):
            for m in msgs:
                if m["role"] not in ROLES:
                    raise SteerkitError(f"--chat {p}: chat {n} has role {m['role']!r}; roles are {', '.join(ROLES)}")
                check_unicode(m["content"], f"--chat {p}: chat {n}")
        chats.extend(rows)
    return chats


def _draw(seed: int, epoch: int, index: int) -> float:
    """A uniform number fixed by (seed, epoch, conversation index): no RNG state to checkpoint."""
    return random.Random(f"drop-system/{seed}/{epoch}/{index}").random()


def render_chat(chat: Messages, index: int, epoch: int, seed: int, drop_system: float) -> tuple[Messages, bool]:
    """The conversation as trained on, and whether its system prompt was dropped."""
    if drop_system > 0 and chat and chat[0]["role"] == "system" and _draw(seed, epoch, index) < drop_system:
        return chat[1:], True
    return chat, False


def special_ids(model: LoadedModel) -> torch.Tensor:
    """Token ids masked out of training activations: the tokenizer's special tokens and padding."""
    tok = model.tokenizer
    ids = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
    ids.update(int(i) for i in model.eos_token_ids())
    ids.add(int(model.pad_token_id()))
    return torch.tensor(sorted(ids), dtype=torch.long)


def keep_mask(ids: torch.Tensor, specials: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, T]`` bool: the positions trained on (not position 0, not special, not padding)."""
    keep = ~torch.isin(ids, specials)
    keep[:, 0] = False
    if valid is not None:
        keep &= valid
    return keep


@dataclass
class ChatState:
    """Where a chat stream stands (JSON-serialisable for checkpoints) and what it has done."""

    epoch: int = 0
    doc: int = 0  # next position in this epoch's shuffled order
    pending: list[list[int]] = field(default_factory=list)  # rendered conversations not yet packed
    conversations: int = 0  # conversations rendered
    with_system: int = 0  # of those, with a system prompt of their own
    dropped_system: int = 0
    truncated: int = 0  # longer than the context: cut to it


class ChatStream:
    """Endless ``[n, context]`` chunks of whole conversations (reshuffled every epoch)."""

    def __init__(self, model: LoadedModel, chats: Sequence[Messages], context: int, seed: int, drop_system: float = 0.0,
                 state: ChatState | None = None) -> None:
        if not chats:
            raise SteerkitError("--chat holds no conversations to train on")
        self.model, self.chats, self.context, self.seed, self.drop_system = model, chats, context, seed, drop_system
        self.state = state or ChatState()
        self.block = 256
        self._order: list[int] = []
        self._order_epoch = -1
        self.pad = int(model.pad_token_id())

    def _perm(self) -> list[int]:
        if self._order_epoch != self.state.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 17 + self.state.epoch)
            self._order = torch.randperm(len(self.chats), generator=g).tolist()
            self._order_epoch = self.state.epoch
        return self._order

    def _refill(self) -> None:
        st = self.state
        if st.doc >= len(self.chats):
            st.epoch, st.doc = st.epoch + 1, 0
        order = self._perm()
        block = order[st.doc : st.doc + self.block]
        st.doc += len(block)
        rendered = []
        for i in block:
            msgs, dropped = render_chat(self.chats[i], i, st.epoch, self.seed, self.drop_system)
            st.with_system += bool(self.chats[i] and self.chats[i][0]["role"] == "system")
            st.dropped_system += dropped
            rendered.append(msgs)
        st.conversations += len(rendered)
        st.pending.extend(docs_tokens(self.model, rendered))

    def next_chunks(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` chunks: ids ``[n, context]`` and ``valid [n, context]`` (False on padding)."""
        st, T = self.state, self.context
        ids = torch.full((n, T), self.pad, dtype=torch.long)
        valid = torch.zeros((n, T), dtype=torch.bool)
        for r in range(n):
            used = 0
            while True:
                if not st.pending:
                    self._refill()
                conv = st.pending[0]
                if len(conv) > T:
                    conv = st.pending[0] = conv[:T]
                    st.truncated += 1
                if used + len(conv) > T:
                    break
                ids[r, used : used + len(conv)] = torch.tensor(conv, dtype=torch.long)
                valid[r, used : used + len(conv)] = True
                used += len(conv)
                st.pending.pop(0)
        return ids, valid


def gather(next_chunks: Callable[[int], tuple[torch.Tensor, torch.Tensor]], n_tokens: int, batch: int
           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Chunk batches (ids, keep masks) holding exactly ``n_tokens`` kept positions: chunks are
    taken ``batch`` at a time until there are enough, and the last batch's surplus is unkept."""
    ids_l: list[torch.Tensor] = []
    keep_l: list[torch.Tensor] = []
    have, empty = 0, 0
    while have < n_tokens:
        ids, keep = next_chunks(batch)
        n = int(keep.sum())
        empty = empty + 1 if n == 0 else 0
        if empty > 100:
            raise SteerkitError("the data yields no trainable tokens: every position is special or position 0; raise --context")
        if n == 0:
            continue
        if have + n > n_tokens:
            flat = keep.flatten()
            flat &= flat.cumsum(0) <= n_tokens - have
            keep = flat.view_as(keep)
            n = n_tokens - have
        ids_l.append(ids)
        keep_l.append(keep)
        have += n
    return ids_l, keep_l


def residual_acts(model: LoadedModel, layer: int, device: torch.device) -> ActsFn:
    """Activations at ``layer`` of the kept positions: ``[sum(keep), d_model]`` on ``device``."""
    def run(ids_l: list[torch.Tensor], keep_l: list[torch.Tensor]) -> torch.Tensor:
        parts = [residuals(model, ids, layer)[keep.to(model.device)].to(device) for ids, keep in zip(ids_l, keep_l)]
        return torch.cat(parts) if parts else torch.zeros((0, model.d_model), device=device)

    return run


@dataclass(frozen=True)
class Mix:
    """A buffer's composition: ``batches`` training batches of ``chat + text`` tokens each."""

    chat: int  # chat tokens per batch
    text: int  # plain-text tokens per batch
    batches: int  # batches per buffer (per pass)

    @property
    def n_chat(self) -> int:
        return self.chat * self.batches

    @property
    def n_text(self) -> int:
        return self.text * self.batches


def plan_mix(chat_fraction: float, batch_size: int, buffer_tokens: int) -> Mix:
    """``round(chat_fraction x batch_size)`` chat tokens in every batch, the rest plain text."""
    if not (math.isfinite(chat_fraction) and 0.0 <= chat_fraction <= 1.0):
        raise SteerkitError(f"--chat-fraction must lie in [0, 1], got {chat_fraction}")
    chat = round(chat_fraction * batch_size)
    if chat_fraction > 0 and chat == 0:
        raise SteerkitError(f"--chat-fraction {chat_fraction} is less than one token in a batch of {batch_size}: raise it or --batch-size")
    if chat_fraction < 1 and chat == batch_size:
        raise SteerkitError(f"--chat-fraction {chat_fraction} leaves less than one plain-text token in a batch of {batch_size}: use 1 or lower it")
    return Mix(chat, batch_size - chat, max(1, buffer_tokens // batch_size))


def mixed_batches(mix: Mix, passes: int, g: torch.Generator) -> list[torch.Tensor]:
    """Row indices of every training batch of a buffer laid out as [chat rows, text rows]: each
    batch takes ``mix.chat`` chat rows and ``mix.text`` text rows, without replacement per pass."""
    out = []
    for _ in range(passes):
        pc = torch.randperm(mix.n_chat, generator=g)
        pt = torch.randperm(mix.n_text, generator=g) + mix.n_chat
        for i in range(mix.batches):
            out.append(torch.cat([pc[i * mix.chat : (i + 1) * mix.chat], pt[i * mix.text : (i + 1) * mix.text]]))
    return out


class MixSource:
    """Buffers of ``[chat activations; text activations]`` in the exact shares of ``mix``."""

    def __init__(self, model: LoadedModel, mix: Mix, acts: ActsFn, model_batch: int, chat: ChatStream | None, text: Any | None,
                 mask_special: bool = True) -> None:
        if mix.chat and chat is None:
            raise SteerkitError("a chat share needs --chat")
        if mix.text and text is None:
            raise SteerkitError("a plain-text share needs --corpus (or --chat-fraction 1)")
        self.mix, self.acts, self.model_batch, self.chat, self.text = mix, acts, model_batch, chat, text
        self.specials = special_ids(model) if mask_special else torch.zeros(0, dtype=torch.long)

    def _chat_chunks(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.chat is not None
        ids, valid = self.chat.next_chunks(n)
        return ids, keep_mask(ids, self.specials, valid)

    def _text_chunks(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.text.next_chunks(n)
        if ids is None:
            raise SteerkitError("the corpus yielded no activations: documents too short for --context")
        return ids, keep_mask(ids, self.specials)

    def next_buffer(self) -> torch.Tensor:
        """``[mix.n_chat + mix.n_text, D]``: chat rows first."""
        ids_l: list[torch.Tensor] = []
        keep_l: list[torch.Tensor] = []
        if self.mix.n_chat:
            a, b = gather(self._chat_chunks, self.mix.n_chat, self.model_batch)
            ids_l, keep_l = ids_l + a, keep_l + b
        if self.mix.n_text:
            a, b = gather(self._text_chunks, self.mix.n_text, self.model_batch)
            ids_l, keep_l = ids_l + a, keep_l + b
        buf = self.acts(ids_l, keep_l)
        assert buf.shape[0] == self.mix.n_chat + self.mix.n_text
        return buf


__all__ = ["ChatState", "ChatStream", "Mix", "MixSource", "gather", "keep_mask", "mixed_batches", "plan_mix",
           "read_chat_files", "render_chat", "residual_acts", "special_ids"]
