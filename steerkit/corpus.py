"""Read a text corpus from files and folders: documents for SAE training and interpretation.

A document is either plain text (``str``) or a chat (a list of ``{"role", "content"}``
messages, rendered later with the model's chat template). Formats, by file name:

* ``.txt``, ``.md``, anything else that decodes as UTF-8: one document per file;
* ``.jsonl`` / ``.json`` (optionally ``.gz``), one object per line:
  ``{"messages": [...]}`` chats; ``steerkit generate`` records (``prompt``/``system``/
  ``messages`` + ``completion``) become chats; hh-rlhf ``{"chosen": "\\n\\nHuman: ...\\n\\n
  Assistant: ..."}`` becomes a chat; anthropic-evals persona rows give their ``statement``,
  advanced-ai-risk rows their ``question``; ``{"text": ...}`` is plain text;
* ``.zip``: every text member (one document each).

Folders are walked in sorted order (``x.jsonl.gz`` sorts as ``x.jsonl``, so a gzipped copy of
a corpus reads identically); ``LICENSE*``, ``README*`` and hidden files are skipped. Tokenizing
and packing are left to :mod:`steerkit.sae_train`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from steerkit.chat import Messages
from steerkit.errors import SteerkitError

if TYPE_CHECKING:  # the model type only: importing models would load torch
    from steerkit.models import LoadedModel

Document = Union[str, Messages]

_SKIP = re.compile(r"^(LICENSE|LICENCE|README|COPYING|NOTICE)|^\.", re.I)
_BINARY = {".safetensors", ".gguf", ".bin", ".pt", ".png", ".jpg", ".jpeg", ".gif", ".pdf", ".npy", ".npz", ".pkl", ".tar"}


def _sort_key(p: Path) -> str:
    s = str(p)
    return s[:-3] if s.endswith(".gz") else s


def corpus_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every readable file under ``paths``, in a stable order."""
    if not paths:
        raise SteerkitError("no corpus given: pass --corpus FILE_OR_FOLDER")
    out: list[Path] = []
    for p in map(lambda x: Path(x).expanduser(), paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = [q for q in p.rglob("*") if q.is_file() and not any(_SKIP.search(part) for part in q.relative_to(p).parts)]
            out += sorted((q for q in found if _suffix(q) not in _BINARY), key=_sort_key)
        else:
            raise SteerkitError(f"corpus path {p} does not exist")
    if not out:
        raise SteerkitError(f"no corpus files found under {', '.join(map(str, paths))}")
    return out


def _suffix(p: Path) -> str:
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return Path(name).suffix


def _open_text(p: Path) -> str:
    raw = p.read_bytes()
    if p.name.lower().endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def hh_to_messages(text: str) -> Messages:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = re.split(r"\n\n(Human|Assistant):", "\n\n" + text.lstrip("\n"))
    msgs: Messages = []
    for who, body in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if who == "Human" else "assistant", "content": body.strip()})
    return msgs


def row_document(row: Any) -> Document | None:
    """One JSON row -> a document (None when the row has nothing to read)."""
    if isinstance(row, str):
        return row or None
    if not isinstance(row, dict):
        return None
    if isinstance(row.get("completion"), str) and ("prompt" in row or "messages" in row):
        msgs = list(row.get("messages") or [])
        if not msgs:
            if row.get("system"):
                msgs.append({"role": "system", "content": row["system"]})
            msgs.append({"role": "user", "content": str(row.get("prompt", ""))})
        return msgs + [{"role": "assistant", "content": row["completion"]}]
    if isinstance(row.get("messages"), list):
        msgs = [m for m in row["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
        return msgs or None
    if isinstance(row.get("chosen"), str):
        msgs = hh_to_messages(row["chosen"])
        return msgs or None
    for key in ("statement", "text", "question", "prompt", "content"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    return None


def _json_documents(text: str, where: Path) -> Iterator[Document]:
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise SteerkitError(f"{where} is not valid JSON ({e.msg})") from None
        for r in rows:
            d = row_document(r)
            if d:
                yield d
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SteerkitError(f"{where}:{n} is not valid JSON ({e.msg})") from None
        d = row_document(row)
        if d:
            yield d


def file_documents(p: Path) -> Iterator[Document]:
    """Documents of one corpus file."""
    suf = _suffix(p)
    if suf == ".zip":
        try:
            with zipfile.ZipFile(p) as z:
                for info in sorted(z.infolist(), key=lambda i: i.filename):
                    name = info.filename.rsplit("/", 1)[-1]
                    if info.is_dir() or not name or _SKIP.search(name):
                        continue
                    body = z.read(info)
                    if b"\x00" in body[:1024]:
                        continue
                    t = io.TextIOWrapper(io.BytesIO(body), encoding="utf-8", errors="replace").read()
                    if name.endswith((".jsonl", ".json")):
                        yield from _json_documents(t, p / info.filename)
                    elif t.strip():
                        yield t
        except zipfile.BadZipFile:
            raise SteerkitError(f"{p} is not a readable zip file") from None
        return
    text = _open_text(p)
    if suf in (".jsonl", ".json"):
        yield from _json_documents(text, p)
    elif text.strip():
        yield text


def read_documents(paths: Sequence[str | os.PathLike]) -> list[Document]:
    """All documents of the corpus, in file order."""
    return [d for f in corpus_files(paths) for d in file_documents(f)]


# --- tokens ----------------------------------------------------------------------------------------

_EOS: dict[int, list[int]] = {}


def doc_tokens(model: LoadedModel, d: Document) -> list[int]:
    """Token ids of one document: plain text + EOS, or a chat rendered with the chat template."""
    tok = model.tokenizer
    if isinstance(d, str):
        ids = list(tok(d, add_special_tokens=False)["input_ids"])
        if id(tok) not in _EOS:  # eos_token_ids() is slow (~0.1 s): once per tokenizer
            _EOS[id(tok)] = list(model.eos_token_ids())[:1]
        return ids + _EOS[id(tok)]
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(d, add_generation_prompt=False, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)
    return list(tok("".join(f"{m['role']}: {m['content']}\n" for m in d))["input_ids"])


def docs_tokens(model: LoadedModel, docs: Sequence[Document]) -> list[list[int]]:
    """:func:`doc_tokens` for many documents at once (same ids, one batched tokenizer call)."""
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None) and any(not isinstance(d, str) for d in docs):
        return [doc_tokens(model, d) for d in docs]
    texts = [d if isinstance(d, str) else tok.apply_chat_template(d, add_generation_prompt=False, tokenize=False) for d in docs]
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    if id(tok) not in _EOS:
        _EOS[id(tok)] = list(model.eos_token_ids())[:1]
    return [list(ids) + (_EOS[id(tok)] if isinstance(d, str) else []) for d, ids in zip(docs, enc)]
