"""The calibration's clock: measurements as tasks sharing a time budget, one progress line each.

Data flow: ``calibrate`` / ``group`` / ``device`` list their measurements as :class:`Task` s →
:func:`run_tasks` gives each a slot of the seconds left (in proportion to its weight, so what one
leaves unused goes to the ones after it), runs it, prints one line on stderr (:class:`Progress`)
and records its name, slot and seconds → the profile keeps the records (``measurements["timings"]``).

Every measurement is bounded by time, never by a repeat count: a task receives its slot in seconds
and times calls until the slot is spent (``measure.timed_s``); a task that can tell beforehand
that one call would not fit raises :class:`Skip` with the reason, which the line shows.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any


class Skip(Exception):  # noqa: N818 - a task's outcome, not an error
    """A task that did not measure; the message says why (shown and recorded)."""


class Progress:
    """One line per measurement on ``stream`` (stderr): seconds since ``start``, the measurement,
    its result and the seconds it took. ``enabled=False`` prints nothing."""

    def __init__(self, *, stream: IO[str] | None = None, start: float | None = None,
                 prefix: str = "calibrate", enabled: bool = True) -> None:
        self.stream = stream
        self.start = time.perf_counter() if start is None else start
        self.prefix = prefix
        self.enabled = enabled

    def line(self, text: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"{self.prefix} [{elapsed:6.1f} s] {text}", file=self.stream or sys.stderr, flush=True)


@dataclass(frozen=True)
class Task:
    """One measurement: ``run(slot_s)`` measures within about ``slot_s`` seconds and returns its
    value; ``show(value)`` is the text of its progress line; ``weight`` its share of the budget."""

    name: str
    run: Callable[[float], Any]
    weight: float = 1.0
    show: Callable[[Any], str] = str


def run_tasks(tasks: Sequence[Task], *, seconds: float, progress: Progress,
              agree: Callable[[float], float] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``tasks`` in order within about ``seconds`` (module docstring): ``({name: value or
    None if skipped}, [{"name", "slot_s", "seconds", "result"}])``. ``agree(slot)`` makes the
    ranks of a group use one slot (rank 0's) for a task."""
    start, left = time.perf_counter(), sum(t.weight for t in tasks)
    values: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    for task in tasks:
        remaining = max(0.0, seconds - (time.perf_counter() - start))
        slot = remaining * task.weight / left if left > 0 else 0.0
        slot = agree(slot) if agree is not None else slot
        left -= task.weight
        began = time.perf_counter()
        try:
            value = task.run(slot)
            text = task.show(value)
        except Skip as skipped:
            value, text = None, f"skipped: {skipped}"
        took = time.perf_counter() - began
        progress.line(f"{task.name}: {text} ({took:.2f} s)")
        values[task.name] = value
        records.append({"name": task.name, "slot_s": round(slot, 3), "seconds": round(took, 3),
                        "result": text})
    return values, records
