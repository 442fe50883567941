"""Small helpers for the data package: the cache folder, content keys, atomic writes, a lock so that
processes on one machine build a cached file once (the others wait, then read it), and the check of
integer settings.

Data flow: used by :mod:`autopar.data.tokenizer` and :mod:`autopar.data.stream` when they save a
trained tokenizer or a tokenized split; nothing here knows about tokens.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

CACHE_ENV = "AUTOPAR_DATA_CACHE"


def cache_folder(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir``, else ``$AUTOPAR_DATA_CACHE``, else ``$XDG_CACHE_HOME/autopar/data`` (default
    ``~/.cache/autopar/data``); created if missing."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autopar" / "data"
    folder = Path(cache_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cache_dir = {str(folder)!r} is a file: pass a folder for cached tokenizers and "
                         "token files")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def content_key(data: Any) -> str:
    """A hex SHA-256 of ``data`` as canonical JSON: names a cached file by everything it depends on."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temp file in ``path``'s folder, fsync, then ``os.replace`` it onto
    ``path``: readers see the old file or the whole new one, never a part."""
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path.lock`` (POSIX ``flock``): one builder per cached file."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def check_int(name: str, value: Any, low: int) -> None:
    """Refuse ``value`` unless it is an int (not a bool) >= ``low``, naming the setting."""
    if type(value) is not int or value < low:
        raise ValueError(f"{name} = {value!r} is invalid: expected an int >= {low}")
