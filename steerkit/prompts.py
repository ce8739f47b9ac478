"""Read prompts: arguments, plain text (one per line), JSON Lines, or the YAML question files of
the emergent-misalignment papers.

Every prompt becomes a :class:`Prompt` with an id, its chat messages and, for question files,
the file's judge prompts (the endpoint judge uses them). A YAML question with several
paraphrases yields one prompt per paraphrase.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerkit.chat import Messages
from steerkit.errors import SteerkitError
from steerkit.fsutil import check_unicode, read_stdin_text, read_text

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    id: str
    messages: Messages
    judge_prompts: dict[str, str] = field(default_factory=dict)

    @property
    def question(self) -> str:
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""


def with_system(messages: Messages, system: str | None) -> Messages:
    """Put ``system`` first, replacing a system message the prompt already had."""
    if not system:
        return list(messages)
    return [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]


def check_messages(msgs: Any, where: str) -> Messages:
    """A chat's ``messages`` checked (roles, string content, valid Unicode, a non-empty last user
    prompt), as the prompt: a final assistant turn (the answer) is left out."""
    if not isinstance(msgs, list) or not msgs:
        raise SteerkitError(f"{where}: 'messages' must be a non-empty list")
    out: Messages = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SteerkitError(f"{where}: each message needs a role ({', '.join(ROLES)}) and string content")
        out.append({"role": m["role"], "content": check_unicode(m["content"], f"{where}: a {m['role']} message")})
    if out[-1]["role"] == "assistant":
        out = out[:-1]  # a chat with its answer: prompt with everything before the answer
    if not out or out[-1]["role"] != "user":
        raise SteerkitError(f"{where}: the conversation must end with a user message")
    _check_prompt(out[-1]["content"], where)
    return out


def _check_prompt(text: str, where: str) -> str:
    """A user prompt must be valid Unicode and not empty (an empty one generates from the chat
    template alone, which is never what was meant)."""
    check_unicode(text, where)
    if not text.strip():
        raise SteerkitError(f"{where} is an empty prompt: give some text")
    return text


def from_texts(texts: Iterable[str], system: str | None = None, where: str = "prompt") -> list[Prompt]:
    """One prompt per text; refuses empty texts and lone surrogates (``where`` names the source)."""
    return [
        Prompt(id=str(i), messages=with_system([{"role": "user", "content": _check_prompt(t, f"{where} {i}")}], system))
        for i, t in enumerate(texts)
    ]


def read_yaml_questions(path: Path) -> list[Prompt]:
    import yaml

    try:
        data = yaml.safe_load(read_text(path, "question file"))
    except yaml.YAMLError as e:
        raise SteerkitError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, list):
        raise SteerkitError(f"{path}: expected a list of questions with 'id' and 'paraphrases'")
    prompts: list[Prompt] = []
    for n, q in enumerate(data):
        if not isinstance(q, dict) or "paraphrases" not in q:
            raise SteerkitError(f"{path}: question {n} has no 'paraphrases'")
        qid = str(q.get("id", n))
        paras = q["paraphrases"]
        if isinstance(paras, str):
            paras = [paras]
        judge = {k: v for k, v in (q.get("judge_prompts") or {}).items() if isinstance(v, str)}
        for k, p in enumerate(paras):
            _check_prompt(str(p), f"{path}: question {qid!r}")
            msgs = with_system([{"role": "user", "content": str(p)}], q.get("system"))
            pid = qid if len(paras) == 1 else f"{qid}#{k}"
            prompts.append(Prompt(id=pid, messages=msgs, judge_prompts=judge))
    return prompts


def read_jsonl(path: Path, lines: Iterable[str] | None = None) -> list[Prompt]:
    prompts: list[Prompt] = []
    src = lines if lines is not None else read_text(path, "prompt file").splitlines()
    for n, line in enumerate(src, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SteerkitError(f"{where} is not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise SteerkitError(f"{where}: expected an object with 'prompt' or 'messages'")
        pid = str(rec.get("id", len(prompts)))
        if "messages" in rec:
            msgs = check_messages(rec["messages"], where)
        elif isinstance(rec.get("prompt"), str):
            if isinstance(rec.get("system"), str):
                check_unicode(rec["system"], f"{where}: the system prompt")
            msgs = with_system([{"role": "user", "content": _check_prompt(rec["prompt"], where)}], rec.get("system"))
        else:
            raise SteerkitError(f"{where}: expected a 'prompt' string or a 'messages' list")
        prompts.append(Prompt(id=pid, messages=msgs))
    return prompts


def read_file(path: str | Path) -> list[Prompt]:
    """Prompts from a file: .yaml/.yml question files, .jsonl/.json lines, else one per line."""
    p = Path(path).expanduser()
    if str(path) == "-":
        return read_stream(read_stdin_text())
    if not p.is_file():
        raise SteerkitError(f"prompt file {p} does not exist")
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        prompts = read_yaml_questions(p)
    elif suffix in (".jsonl", ".json"):
        prompts = read_jsonl(p)
    else:
        prompts = from_texts([ln for ln in read_text(p, "prompt file").splitlines() if ln.strip()], where=f"{p}: prompt")
    if not prompts:
        raise SteerkitError(f"{p} holds no prompts")
    return prompts


def read_stream(text: str) -> list[Prompt]:
    """Prompts from stdin: JSON Lines when the first line is an object, else one per line."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].lstrip().startswith("{"):
        return read_jsonl(Path("<stdin>"), lines)
    return from_texts(lines, where="<stdin>: prompt")


def select(prompts: Sequence[Prompt], patterns: Sequence[str]) -> list[Prompt]:
    """Keep prompts whose id matches any glob pattern (all when no pattern is given)."""
    if not patterns:
        return list(prompts)
    kept = [p for p in prompts if any(fnmatch.fnmatchcase(p.id.split("#")[0], pat) or fnmatch.fnmatchcase(p.id, pat) for pat in patterns)]
    if not kept:
        ids = ", ".join(sorted({p.id.split("#")[0] for p in prompts})[:12])
        raise SteerkitError(f"no prompt id matches {', '.join(patterns)} (ids: {ids}...)")
    return kept


def plain_em_questions(prompts: Sequence[Prompt]) -> list[Prompt]:
    """The plain variants of an emergent-misalignment question file (no _json/_template)."""
    return [p for p in prompts if not p.id.split("#")[0].endswith(("_json", "_template"))]


def eval_questions(path: str | os.PathLike | None = None, ids: Sequence[str] = (), all_variants: bool = False) -> list[Prompt]:
    """The evaluation questions of `sweep` and `track`: ``path`` (default: the shipped EM
    questions), the plain variants of an EM YAML file unless ``all_variants``, filtered by the
    ``ids`` globs."""
    src = Path(path) if path is not None else default_questions_path()
    items = read_file(src)
    if not all_variants and str(src).lower().endswith((".yaml", ".yml")):
        items = plain_em_questions(items) or items
    return select(items, ids)


def default_questions_path() -> Path:
    """The emergent-misalignment question file shipped with steerkit (MIT, see its README)."""
    return Path(__file__).resolve().parent / "data" / "eval" / "em_first_plot_questions.yaml"
