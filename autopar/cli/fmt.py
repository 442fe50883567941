"""Human-readable numbers for terminal views (counts, bytes, FLOPs)."""

from __future__ import annotations

_DECIMAL = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))
_BINARY = ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))


def count(value: float) -> str:
    """1.75e11 → '175.2 G'."""
    for scale, suffix in _DECIMAL:
        if abs(value) >= scale:
            return f"{value / scale:.1f} {suffix}"
    return f"{value:g}"


def flops(value: float) -> str:
    """7.3e14 → '734.8 TFLOP'."""
    return count(value) + "FLOP" if abs(value) >= 1e3 else f"{value:g} FLOP"


def nbytes(value: float) -> str:
    """3.2e9 → '3.0 GiB'."""
    for scale, suffix in _BINARY:
        if abs(value) >= scale:
            return f"{value / scale:.1f} {suffix}"
    return f"{int(value)} B"
