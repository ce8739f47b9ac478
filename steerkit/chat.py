"""Chats as token ids: the one place a chat (a list of ``{"role", "content"}`` messages) meets
the tokenizer.

:func:`chat_tokens` renders a chat with the tokenizer's chat template, ending with the assistant
turn's opening (the prompt a model answers); a tokenizer without a template gets a plain
``role: content`` rendering. Generation, activation statistics, extraction and monitoring all
tokenize chats through it, so they agree token for token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the model type only: importing models would load torch
    from steerkit.models import LoadedModel

Messages = list[dict[str, str]]


def chat_tokens(model: LoadedModel, messages: Messages) -> list[int]:
    """Token ids for a chat, ending with the assistant turn's opening."""
    tok = model.tokenizer
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tok(text)["input_ids"])


def as_messages(prompt: str, system: str | None = None) -> Messages:
    """A one-turn chat: the user's ``prompt``, after a ``system`` message when one is given."""
    msgs: Messages = []
    if system:
        msgs.append({"role": "system", "content": system})
    msgs.append({"role": "user", "content": prompt})
    return msgs
