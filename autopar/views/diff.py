"""What changed between two plans, and by how much (``autopar diff a.json b.json``).

Data flow: two Plans (from JSON) → :func:`compare` → :class:`Difference` rows (what, the two
values, the change) → :func:`render_diff` (a rich table). Rows cover the problem (model,
cluster, batch), the degrees and schedule, the stage split and recomputation, memory, the
predicted step time and each part of its breakdown, the slowest stage per microbatch, the dtype
and cost options the predictions were priced with (all stored in the plans), and the graph
passes. Only rows that differ are shown, plus the step time always; identical plans say so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from autopar import fmt
from autopar.plans import BREAKDOWN_KEYS, Plan
from autopar.views.text import BREAKDOWN_LABELS


@dataclass(frozen=True)
class Difference:
    what: str
    a: str
    b: str
    change: str

    @property
    def changed(self) -> bool:
        return self.a != self.b


def _runs(values: list[Any]) -> str:
    """[12, 12, 12, 10] → '12×3 10'."""
    groups = [(value, len(list(group))) for value, group in groupby(values)]
    return " ".join(str(value) if count == 1 else f"{value}×{count}" for value, count in groups)


def _relative(a: float | None, b: float | None, show: Callable[[float], str]) -> str:
    if a is None or b is None:
        return ""
    if a == b:
        return "="
    sign = "+" if b > a else "−"
    share = f" ({sign}{abs(b - a) / a * 100:.1f} %)" if a else ""
    return f"{sign}{show(abs(b - a))}{share}"


def _number(what: str, a: float | None, b: float | None, show: Callable[[float], str]) -> Difference:
    def text(value: float | None) -> str:
        return "—" if value is None else show(value)
    return Difference(what, text(a), text(b), _relative(a, b, show))


def _points(what: str, a: float | None, b: float | None) -> Difference:
    """A fraction shown in percent; its change in percentage points."""
    def text(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f} %"
    change = "" if a is None or b is None else "=" if a == b else f"{100 * (b - a):+.1f} pts"
    return Difference(what, text(a), text(b), change.replace("-", "−"))


def _degree(what: str, a: int, b: int) -> Difference:
    change = "=" if a == b else (f"×{b // a}" if b % a == 0 else f"÷{a // b}" if a % b == 0 else f"{a} → {b}")
    return Difference(what, str(a), str(b), change)


def _word(what: str, a: object, b: object) -> Difference:
    return Difference(what, str(a), str(b), "=" if a == b else "changed")


def _passes(plan: Plan) -> str:
    return ", ".join(p.name for p in plan.passes) or "none"


def _slowest_stage_s(plan: Plan) -> float | None:
    """The most work one stage does per microbatch, from the stored per-stage predictions."""
    return max((s.work_s for s in plan.predicted.stages), default=None)


def _options(plan: Plan) -> str:
    used = plan.predicted.options
    if used is None:
        return "—"
    return (f"dp_overlap {used.dp_overlap:g}, tp_overlap {used.tp_overlap:g}"
            + (", sequence parallel" if used.sequence_parallel else "")
            + ("" if used.p2p_scatter_gather else ", no P2P scatter-gather"))


def compare(a: Plan, b: Plan) -> list[Difference]:
    """Every compared field, changed or not, in display order."""
    pa, pb, ra, rb = a.parallelism, b.parallelism, a.predicted, b.predicted
    rows = [
        _word("model", a.model, b.model), _word("cluster", a.cluster["text"], b.cluster["text"]),
        _degree("global batch", a.global_batch_size, b.global_batch_size),
        _word("sequence length", a.seq_len, b.seq_len),
        *(_degree(axis, getattr(pa, axis), getattr(pb, axis)) for axis in ("dp", "tp", "pp", "ep", "cp")),
        _word("sequence parallelism", "on" if pa.sequence_parallel else "off",
              "on" if pb.sequence_parallel else "off"),
        _word("schedule", a.schedule.name, b.schedule.name),
        _degree("microbatch size", a.schedule.microbatch_size, b.schedule.microbatch_size),
        _degree("microbatches", a.schedule.num_microbatches, b.schedule.num_microbatches),
        _degree("virtual stages", a.schedule.virtual_stages, b.schedule.virtual_stages),
        _word("ZeRO stage", a.zero, b.zero),
        _word("layers per stage", _runs([s.layers[1] - s.layers[0] for s in a.stages]),
              _runs([s.layers[1] - s.layers[0] for s in b.stages])),
        _word("recompute per stage", _runs([s.recompute for s in a.stages]),
              _runs([s.recompute for s in b.stages])),
        _word("tensor-parallel nodes", len(a.shardings), len(b.shardings)),
        _number("step time", ra.step_time_s, rb.step_time_s, fmt.seconds),
        _number("tokens/s", ra.tokens_per_s, rb.tokens_per_s, lambda v: f"{v:,.0f}"),
        _points("MFU", ra.mfu, rb.mfu),
        _number("peak memory (max)", max(ra.peak_memory_bytes or [0]) or None,
                max(rb.peak_memory_bytes or [0]) or None, fmt.nbytes),
        _number("peak memory (min)", min(ra.peak_memory_bytes or [0]) or None,
                min(rb.peak_memory_bytes or [0]) or None, fmt.nbytes),
    ]
    da, db = ra.breakdown_dict(), rb.breakdown_dict()
    rows += [_number(f"  {BREAKDOWN_LABELS[k]}", da.get(k), db.get(k), fmt.seconds)
             for k in BREAKDOWN_KEYS if k in da or k in db]
    rows += [_number("slowest stage / microbatch", _slowest_stage_s(a), _slowest_stage_s(b), fmt.seconds),
             _word("priced in", ra.dtype or "—", rb.dtype or "—"),
             _word("cost options", _options(a), _options(b)),
             _word("graph passes", _passes(a), _passes(b))]
    return rows


def render_diff(a: Plan, b: Plan, *, names: tuple[str, str] = ("a", "b"), show_all: bool = False
                ) -> RenderableType:
    rows = compare(a, b)
    shown = [r for r in rows if show_all or r.changed or r.what == "step time"]
    if a == b:
        return Text(f"the plans are identical ({names[0]} = {names[1]})")
    table = Table(title=Text(f"a = {names[0]}\nb = {names[1]}"), title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("what", no_wrap=True)
    table.add_column("a", overflow="fold")
    table.add_column("b", overflow="fold")
    table.add_column("change (b − a)", justify="right", no_wrap=True)
    for row in shown:
        table.add_row(row.what, Text(row.a), Text(row.b), row.change, style="bold" if row.changed else None)
    unchanged = sum(not r.changed for r in rows)
    note = "" if any(r.changed for r in rows) else "; the plans differ only in fields not compared here " \
                                                   "(device ids, node names, cost details)"
    return Group(table, Text(f"{unchanged} of {len(rows)} compared fields unchanged{note}", style="dim"))
