"""Silence a chatty logger for the length of a ``with`` block (torch logs tracebacks and whole graphs
for failures that autopar reports itself, in one line). Used by capture, passes and the CLI."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.CRITICAL) -> Iterator[None]:
    """Raise logger ``name``'s level to ``level`` inside the block; restore it after."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)
