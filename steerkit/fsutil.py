"""Safe file reading and writing: never overwrite without ``force``, always write atomically,
find out that a path cannot be written before any work is done, and read text as UTF-8 with
one-line errors.

A write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted run never leaves half a file behind. :func:`cache_dir` and :func:`user_data_dir`
say where steerkit keeps its own files.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steerkit.errors import SteerkitError


def _reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


def _probe_folder(p: Path, folder: Path) -> None:
    """Create and remove a temporary file in ``folder`` (which exists): the only sure test of
    writability (permission bits lie to root, read-only mounts and full disks)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".steerkit-probe.", dir=folder)
    except OSError as e:
        raise SteerkitError(f"cannot write {p}: folder {folder} is not writable ({_reason(e)}): choose another path") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _existing_ancestor(p: Path) -> Path:
    """The nearest ancestor of ``p`` that exists; refuses a file where a folder must be."""
    a = p.parent
    while True:
        if a.exists() or a == a.parent:
            break
        a = a.parent
    if a.exists() and not a.is_dir():
        raise SteerkitError(f"cannot write {p}: {a} is a file, not a folder: choose a path inside a folder")
    return a


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to clobber an existing file unless ``force``, a folder where a file is expected,
    and a path that cannot be written (read-only folder, a file where a folder should be);
    return the path. Creates nothing that stays behind."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise SteerkitError(f"{p} is a folder, not a file: give a file name, e.g. {p / ('out' + (p.suffix or '.jsonl'))}")
    if p.exists() and not force:
        raise SteerkitError(f"{p} already exists: pass --force to overwrite it")
    folder = _existing_ancestor(p)
    _probe_folder(p, folder)
    return p


def check_writable_dir(path: str | os.PathLike) -> Path:
    """For an output *folder*: refuse a file in its place and a location that cannot be
    written; return the path. Creates nothing that stays behind."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise SteerkitError(f"{p} is a file, not a folder: give a folder (it is created if missing)")
    folder = p if p.is_dir() else _existing_ancestor(p)
    _probe_folder(p, folder)
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    p = check_writable(path, force)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    except OSError as e:
        raise SteerkitError(f"cannot write {p}: {_reason(e)}: choose another path") from None
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 files (and some writers recreate the file): give the usual mode
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, p)
        except OSError as e:
            raise SteerkitError(f"cannot write {p}: {_reason(e)}: choose another path") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, force: bool = False) -> Path:
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, force: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), force)


# --- reading text -------------------------------------------------------------------------------


def decode_utf8(data: bytes, where: str) -> str:
    """Bytes -> str, or one line naming the first bad byte and the fix."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 1].hex()
        kind = "a binary file, not text" if b"\x00" in data[:8192] else "not UTF-8 text"
        raise SteerkitError(f"{where} is {kind} (byte 0x{bad} at offset {e.start}): save it as UTF-8 text") from None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A whole file as UTF-8 text, with one-line errors for missing, unreadable or non-UTF-8 files."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SteerkitError(f"{what} {p} does not exist") from None
    except IsADirectoryError:
        raise SteerkitError(f"{what} {p} is a folder: give a file") from None
    except OSError as e:
        raise SteerkitError(f"cannot read {what} {p}: {_reason(e)}") from None
    return decode_utf8(data, str(p))


def read_store(path: str | os.PathLike, fix: str = "fix or delete that line") -> list[dict[str, Any]]:
    """Records of an append-only JSON Lines store (a sweep's results, a track's answers); none
    when it does not exist yet. A torn last line (a run killed mid-write) is ignored; a bad line
    elsewhere is one error naming it and ``fix``."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_text(encoding="utf-8").split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # the torn tail of a killed run
                break
            raise SteerkitError(f"{p}:{n} is not valid JSON ({e.msg}); {fix}") from None
    return out


def read_json_lines(path: str | os.PathLike, what: str = "records", text: str | None = None, hint: str = "give a JSON Lines file",
                    shape: str = "a JSON object") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each record of a JSON Lines file; ``text`` instead of reading
    ``path`` (stdin: ``path`` then only names it in errors, e.g. ``<stdin>``). ``what`` names
    the file, ``hint`` says what to give when it is missing, ``shape`` what a line must hold."""
    p = Path(path).expanduser()
    if text is None:
        if not p.is_file():
            raise SteerkitError(f"{what} file {p} does not exist: {hint}")
        text = read_text(p, f"{what} file")
    recs: list[tuple[int, dict[str, Any]]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SteerkitError(f"{p}:{n} is not valid JSON ({e.msg}): each line must be one record") from None
        if not isinstance(rec, dict):
            raise SteerkitError(f"{p}:{n}: expected {shape}")
        recs.append((n, rec))
    if not recs:
        raise SteerkitError(f"{p} holds no records")
    return recs


def read_json(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A JSON object file (a config), with one-line errors for a missing or unreadable file,
    invalid JSON, or JSON that is not an object."""
    try:
        data = json.loads(read_text(path, what))
    except ValueError as e:
        raise SteerkitError(f"{path} is not valid JSON ({e}): fix or replace it") from None
    if not isinstance(data, dict):
        raise SteerkitError(f"{path} is not a JSON object: fix or replace it")
    return data


def check_unicode(text: str, where: str) -> str:
    """Refuse a string holding a lone surrogate (a JSON escape such as \\ud800 without its
    pair, or undecodable bytes passed through): it is not valid Unicode and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise SteerkitError(f"{where} holds a lone surrogate (\\u{ord(bad):04x}), which is not valid Unicode: fix the text or its \\u escapes") from None
    return text


def read_stdin_text(where: str = "<stdin>") -> str:
    """All of stdin as UTF-8 text (strictly decoded, unlike the locale's text stream)."""
    stream = sys.stdin
    buf = getattr(stream, "buffer", None)
    if buf is not None:
        return decode_utf8(buf.read(), where)
    return check_unicode(stream.read(), where)


# --- where steerkit keeps its files -----------------------------------------------------------


def cache_dir() -> Path:
    """Where dequantized weights (and other derived files) live; ``$STEERKIT_CACHE`` moves it."""
    env = os.environ.get("STEERKIT_CACHE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("steerkit"))


def user_data_dir() -> Path:
    """Where the user's own directions live; ``$STEERKIT_HOME`` moves it."""
    env = os.environ.get("STEERKIT_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("steerkit"))
