"""Safe file writing: never overwrite without ``force``, always write atomically.

A write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted run never leaves half a file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from steerkit.errors import SteerkitError


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to clobber an existing file unless ``force``; return the path."""
    p = Path(path)
    if p.exists() and not force:
        raise SteerkitError(f"{p} already exists: pass --force to overwrite it")
    if p.is_dir():
        raise SteerkitError(f"{p} is a folder, not a file: give a file name")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    p = check_writable(path, force)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 files (and some writers recreate the file): give the usual mode
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, p)
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
