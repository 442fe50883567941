"""Human-readable numbers for the CLI, the terminal views and the HTML report (counts, bytes,
FLOPs, seconds, percentages, id ranges)."""

from __future__ import annotations

from collections.abc import Iterable

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


def seconds(value: float | None) -> str:
    """0.0123 → '12.3 ms'; None → '—'."""
    if value is None:
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f} s"
    for scale, suffix in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(value) >= scale:
            return f"{value / scale:#.3g}".rstrip(".") + f" {suffix}"
    return "0 s" if value == 0 else f"{value * 1e9:.3g} ns"


def percent(fraction: float | None) -> str:
    """0.4213 → '42.1 %'; None → '—'."""
    return "—" if fraction is None else f"{100 * fraction:.1f} %"


def id_ranges(ids: Iterable[int]) -> str:
    """[0, 1, 2, 3, 8, 9, 11] → '0–3, 8–9, 11' (sorted, runs folded)."""
    runs: list[list[int]] = []
    for value in sorted(set(ids)):
        if runs and runs[-1][1] == value - 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)
