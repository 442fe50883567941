"""A text corpus from any folder of text or source files, split into train and held-out by file.

Data flow: a folder → :meth:`Corpus.from_folder` (or :func:`stdlib_corpus`, the running Python's
own standard library) lists the files, split by a hash of each relative path → the train split
trains the tokenizer (:mod:`autopar.data.tokenizer`) → each split is read with
:meth:`Corpus.read`, tokenized and packed (:mod:`autopar.data.stream`) → served per rank by
:class:`autopar.data.TokenLoader`.

Listing stats files only; reading decodes UTF-8 and skips binary (a NUL byte) or undecodable
files, which the token stream counts and reports. The split depends only on relative paths, so it
is the same on every machine and for every seed: a file is held out when the first 8 bytes of
``blake2b(path)`` read as a fraction fall below ``heldout_fraction``, and each split keeps at least
one file. For the standard library a file is a module, so modules are held out whole.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from autopar.data._files import content_key

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
DEFAULT_SUFFIXES = (".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts",
                    ".sh", ".txt", ".md", ".rst", ".toml", ".yaml", ".yml", ".json", ".html", ".css", ".tex")
DEFAULT_EXCLUDE_DIRS = ("__pycache__", "node_modules", "site-packages", "dist-packages")
STDLIB_TEST_DIRS = ("test", "tests", "idle_test")


@dataclass(frozen=True)
class CorpusFile:
    """One listed file: its path relative to the corpus root (POSIX separators), size and mtime."""

    path: str
    size_bytes: int
    mtime_ns: int


def path_fraction(path: str) -> float:
    """A fraction in [0, 1) fixed by ``path`` (a hash): orders and splits files the same everywhere."""
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_suffixes(suffixes: Iterable[str]) -> tuple[str, ...]:
    if isinstance(suffixes, str):
        raise TypeError(f"suffixes = {suffixes!r} is a string: pass a tuple such as ('.py', '.txt')")
    result = tuple(suffixes)
    if not result or not all(isinstance(s, str) and s.startswith(".") and len(s) > 1 for s in result):
        raise ValueError(f"suffixes = {result!r} is invalid: expected file name endings such as "
                         "('.py', '.txt'), each starting with '.'")
    return result


def _list_files(root: Path, suffixes: tuple[str, ...], exclude_dirs: frozenset[str]) -> list[CorpusFile]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in exclude_dirs)
        for name in sorted(names):
            if name.startswith(".") or not name.endswith(suffixes):
                continue
            full = os.path.join(folder, name)
            try:
                stat = os.stat(full)
            except OSError:  # a dangling link
                continue
            if stat.st_size > 0:
                files.append(CorpusFile(Path(os.path.relpath(full, root)).as_posix(), stat.st_size,
                                        stat.st_mtime_ns))
    return sorted(files, key=lambda f: f.path)


def _split(files: list[CorpusFile], heldout_fraction: float, where: str
           ) -> tuple[tuple[CorpusFile, ...], tuple[CorpusFile, ...]]:
    if len(files) < 2:
        raise ValueError(f"corpus folder {where!r} has {len(files)} usable file: a train and a held-out "
                         "split need at least 2 files; add files or split the text into several files")
    by_score = sorted(files, key=lambda f: (path_fraction(f.path), f.path))
    held = {f.path for f in by_score if path_fraction(f.path) < heldout_fraction}
    if not held:
        held = {by_score[0].path}
    if len(held) == len(files):
        held.discard(by_score[-1].path)
    return (tuple(f for f in files if f.path not in held), tuple(f for f in files if f.path in held))


@dataclass(frozen=True)
class Corpus:
    """The files of a folder, split into ``train`` and ``heldout`` (see the module docstring)."""

    root: Path
    train: tuple[CorpusFile, ...]
    heldout: tuple[CorpusFile, ...]
    suffixes: tuple[str, ...]

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], *, suffixes: Iterable[str] = DEFAULT_SUFFIXES,
                    heldout_fraction: float = 0.02,
                    exclude_dirs: Iterable[str] = DEFAULT_EXCLUDE_DIRS) -> Corpus:
        """Every non-empty file under ``folder`` (recursively) whose name ends in one of ``suffixes``,
        skipping hidden files and folders and folders named in ``exclude_dirs``."""
        suffixes = _check_suffixes(suffixes)
        if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
                or not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction = {heldout_fraction!r} is invalid: expected a fraction in "
                             "(0, 1), e.g. 0.02")
        root = Path(folder).expanduser()
        if not root.exists():
            raise ValueError(f"corpus folder {str(root)!r} does not exist: pass a folder of text or source "
                             "files (or use autopar.data.stdlib_corpus() for the Python standard library)")
        if not root.is_dir():
            raise ValueError(f"corpus folder {str(root)!r} is a file, not a folder: pass the folder that "
                             "holds it")
        files = _list_files(root.resolve(), suffixes, frozenset(exclude_dirs))
        if not files:
            raise ValueError(f"corpus folder {str(root)!r} has no non-empty files ending in "
                             f"{', '.join(suffixes)}: put text or source files there, or pass suffixes=(...) "
                             "that match its files")
        train, heldout = _split(files, float(heldout_fraction), str(root))
        return cls(root.resolve(), train, heldout, suffixes)

    def files(self, split: Split) -> tuple[CorpusFile, ...]:
        if split not in SPLITS:
            raise ValueError(f"split = {split!r} is invalid: expected 'train' or 'heldout'")
        return self.train if split == "train" else self.heldout

    def num_bytes(self, split: Split) -> int:
        return sum(f.size_bytes for f in self.files(split))

    def fingerprint(self, split: Split) -> str:
        """A hex key of the split's file list, sizes and mtimes: cached tokenizers and token files are
        reused only while it is unchanged."""
        return content_key([[f.path, f.size_bytes, f.mtime_ns] for f in self.files(split)])

    def read(self, file: CorpusFile) -> str | None:
        """The file's text, or ``None`` for a binary (NUL byte) or non-UTF-8 file."""
        data = (self.root / file.path).read_bytes()
        if b"\x00" in data:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def describe(self) -> str:
        """One line: the folder, and each split's files and megabytes."""
        parts = [f"{split} {len(self.files(split))} files, {self.num_bytes(split) / 1e6:.2f} MB"
                 for split in SPLITS]
        return f"corpus {self.root}: " + "; ".join(parts)


def stdlib_corpus(*, heldout_fraction: float = 0.02, include_tests: bool = False) -> Corpus:
    """The ``.py`` files of the running interpreter's standard library (``sysconfig``'s ``stdlib``),
    without ``site-packages``; its test folders (``test``, ``tests``, ``idle_test``: deliberately odd
    files, 60 % of the bytes) only with ``include_tests=True``. The same files on every machine with
    this Python version; held out by module."""
    exclude = DEFAULT_EXCLUDE_DIRS + (() if include_tests else STDLIB_TEST_DIRS)
    return Corpus.from_folder(sysconfig.get_paths()["stdlib"], suffixes=(".py",),
                              heldout_fraction=heldout_fraction, exclude_dirs=exclude)
