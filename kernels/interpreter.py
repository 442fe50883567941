"""Whether Triton's CPU interpreter is asked for: read by the fused-attention op and by each kernel
at every launch (tests set ``TRITON_INTERPRET=1`` after torch may already have imported Triton).
Its own module so that the kernels and the op that launches them need not import each other."""

from __future__ import annotations

import os

_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE
