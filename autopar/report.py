"""``compiled.report()``: one measured step printed beside the Plan's predictions.

Data flow: ``Compiled`` → its executor measures one training step on every rank
(``autopar.runtime.measure``: per-stage forward/backward, communication, bubble, peak memory) →
:func:`gather_reports` brings every rank's record to every rank → :func:`format_report`, a rich
table beside the executing Plan's ``predicted`` numbers (priced by ``autopar.lower.predict``), and
with MoE layers :func:`format_moe_report`, their expert loads in the measured step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import statistics
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from rich import box
from rich.console import Console, Group
from rich.table import Table

from autopar import fmt
from autopar.plans import Plan, device_stages
from autopar.runtime.measure import MEMORY_CATEGORIES, PHASES, StepReport, gather_reports, without_profiler

if TYPE_CHECKING:
    from autopar.compile import Compiled


def _seconds(values: Iterable[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def _predicted(plan: Plan, step_s: float) -> str:
    """A rank's cell: the predicted step time and its error against the measured one (process
    memory is never compared with a prediction: see the memory table)."""
    predicted = plan.predicted.step_time_s
    if predicted is None:
        return "not estimated"
    return f"{predicted:.3f} s ({(predicted - step_s) / step_s:+.0%})" if step_s > 0 else f"{predicted:.3f} s"


def _predicted_breakdown(plan: Plan) -> str:
    """The plan-wide predicted breakdown (seconds per step), nonzero terms only."""
    terms = [f"{key} {value:.3f}" for key, value in plan.predicted.breakdown_dict().items()
             if round(value, 3) > 0]
    return f"predicted s: {', '.join(terms)}" if terms else ""


COLUMNS = ("rank", "stages", "fwd s", "bwd s", "optim s", "comm s", "bubble s", "step s", "peak mem",
           "predicted step")
MEMORY_NOTE = {"rss": "process peak RSS", "cuda_allocated": "torch.cuda.max_memory_allocated"}


def _profiler_note(reports: list[StepReport]) -> str:
    profiled = [(r.profiled_step_s, r.step_s) for r in reports if r.profiled_step_s]
    if not profiled:
        return ""
    slowest = max(profiled, key=lambda p: p[1])
    return (f"step: without the profiler ({slowest[1]:.3f} s on the slowest rank; {slowest[0]:.3f} s "
            "under it) · phases: the profiled step's split, scaled to it")


def format_report(reports: list[StepReport], plan: Plan) -> Table:
    """One row per rank: measured times and memory beside the Plan's predictions."""
    par, sched = plan.parallelism, plan.schedule
    memory_kinds = sorted({MEMORY_NOTE[r.memory_kind] for r in reports})
    notes = ["fwd/bwd: per local stage, time in collectives excluded · comm: a collective in flight · "
             "bubble: neither (pipeline send/recv waits included) · peak mem: " + ", ".join(memory_kinds),
             _profiler_note(reports), _predicted_breakdown(plan)]
    table = Table(title=f"measured step · {plan.model} · pp{par.pp} × dp{par.dp} × tp{par.tp} · "
                        f"{sched.name}, {sched.num_microbatches} microbatches",
                  caption="\n".join(note for note in notes if note), box=box.SIMPLE_HEAD, show_edge=False,
                  padding=0)
    for column in COLUMNS:
        wide = column == "predicted step"  # the only column that may wrap on a narrow terminal
        table.add_column(column, justify="left" if column in ("stages", "predicted step") else "right",
                         no_wrap=not wide, overflow="fold" if wide else "ellipsis")
    for r in reports:
        memory = fmt.nbytes(r.peak_memory_bytes)
        table.add_row(str(r.rank), ", ".join(map(str, r.stages)), _seconds(r.forward_s),
                      _seconds(r.backward_s), f"{r.optimizer_s:.3f}", f"{r.comm_s:.3f}",
                      f"{r.bubble_s:.3f}", f"{r.step_s:.3f}", memory, _predicted(plan, r.step_s))
    return table


MOE_COLUMNS = ("layer", "tokens", "capacity", "load min", "mean", "max", "dropped", "tokens lost")


def format_moe_report(reports: list[StepReport], *, ranks: bool) -> Table | None:
    """One row per MoE layer (and rank if ``ranks``): its load in the measured step; None without MoE."""
    rows = [(r.rank, layer, stats) for r in reports for layer, stats in r.moe]
    if not rows:
        return None
    where = "each rank's last microbatch" if ranks else "the measured step"
    table = Table(title=f"MoE layers · expert load in {where}",
                  caption="load: (token, expert) assignments an expert computed (at most the capacity) · "
                          "dropped: assignments over capacity · tokens lost: tokens that lost every "
                          "assignment (they pass through the residual)",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=0)
    for column in ("rank", *MOE_COLUMNS) if ranks else MOE_COLUMNS:
        table.add_column(column, justify="right", no_wrap=True)
    for rank, layer, s in sorted(rows, key=lambda row: row[:2]):
        load = s.tokens_per_expert
        cells = [str(layer), str(s.tokens), str(s.capacity), str(min(load)), f"{sum(load) / len(load):.1f}",
                 str(max(load)), str(s.dropped_assignments),
                 f"{s.dropped_tokens} ({s.dropped_tokens / max(s.tokens, 1):.1%})"]
        table.add_row(*([str(rank)] if ranks else []), *cells)
    return table


def _with_moe(mine: StepReport, compiled: Any) -> StepReport:
    loads = sorted((layer, stats) for layer, stats in compiled.moe_stats().items() if stats is not None)
    return dataclasses.replace(mine, moe=tuple(loads))


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepNumbers:
    """One side of the comparison: step seconds, bytes by category (:data:`MEMORY_CATEGORIES`) and
    seconds by phase (:data:`~autopar.runtime.measure.PHASES`); None / empty where that side has no
    number (a plan without predictions)."""

    step_s: float | None
    memory_bytes: dict[str, int]
    phases_s: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankReport:
    """One rank: what it measured and what the Plan predicted for it, and the measured details."""

    rank: int
    measured: StepNumbers
    predicted: StepNumbers
    step: StepReport


@dataclasses.dataclass(frozen=True, kw_only=True)
class Report:
    """``compiled.report(...)``: one entry per rank in rank order (the same on every rank); prints as
    the tables (time by phase, memory by category, MoE loads) in a terminal, under rich, or ``str``."""

    ranks: tuple[RankReport, ...]
    plan: Plan

    def __rich__(self) -> Group:
        steps = [r.step for r in self.ranks]
        tables: list[Table] = [format_report(steps, self.plan), format_phase_report(self),
                               format_memory_report(self)]
        moe = format_moe_report(steps, ranks=len(steps) > 1)
        return Group(*tables, *([moe] if moe is not None else []))

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=100, color_system=None)
        console.print(self)
        return console.file.getvalue()  # type: ignore[attr-defined]


def predicted_memory_bytes(plan: Plan, rank: int) -> dict[str, int]:
    """The Plan's memory prediction for ``rank``'s stages by category ({} when it stores none):
    weights, gradients, optimizer; activations with the logits; the reserve as temporaries."""
    held = device_stages(plan)[rank] if rank < plan.world_size else ()
    found = next((m for m in plan.predicted.memory if m.stages == held), None)
    if found is None:
        return {}
    return {"parameters": int(found.weights_bytes), "gradients": int(found.gradients_bytes),
            "optimizer": int(found.optimizer_bytes),
            "activations": int(found.activations_bytes + found.logits_bytes),
            "temporaries": int(found.reserve_bytes)}


def predicted_phases_s(plan: Plan, rank: int) -> dict[str, float]:
    """The Plan's predicted seconds by phase (:data:`PHASES`; {} when it has no breakdown). The
    cost model's ``compute`` is split into forward and backward in the proportion of the rank's
    predicted per-microbatch stage times."""
    breakdown = plan.predicted.breakdown_dict()
    if not breakdown:
        return {}
    held = set(device_stages(plan)[rank]) if rank < plan.world_size else set()
    stages = [s for s in plan.predicted.stages if s.index in held]
    forward = sum(s.forward_s for s in stages)
    total = forward + sum(s.backward_s + s.backward_weight_s for s in stages)
    share = forward / total if total > 0 else 1 / 3
    compute = breakdown.get("compute", 0.0)
    phases = {"forward": share * compute, "backward": (1 - share) * compute}
    return {name: phases.get(name, breakdown.get(name, 0.0)) for name in PHASES}


def _error(predicted: float | None, measured: float | None) -> str:
    return f"{(predicted - measured) / measured:+.1%}" if measured and predicted is not None else "–"


def format_phase_report(report: Report) -> Table:
    """Measured seconds by phase on every rank beside the prediction, and the error against the rank
    that took longest (the cost model prices the pipeline rank that finishes last)."""
    slowest = max(report.ranks, key=lambda r: r.measured.step_s or 0.0)
    table = Table(title="step time by phase (s)", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1),
                  caption=f"measured per rank (error against rank {slowest.rank}, the slowest) · recompute: "
                          "recomputed layers' forwards inside backward · comm by kind from where each "
                          "collective ran · bubble: the rest of the step (pipeline waits, idle time)")
    table.add_column("phase", no_wrap=True)
    for r in report.ranks:
        table.add_column(f"rank {r.rank}", justify="right", no_wrap=True)
    for column in ("predicted", "error"):
        table.add_column(column, justify="right", no_wrap=True)

    def value(numbers: StepNumbers, name: str) -> float | None:
        return numbers.step_s if name == "step" else numbers.phases_s.get(name)

    for name in (*PHASES, "step"):
        measured = [value(r.measured, name) for r in report.ranks]
        guess = value(slowest.predicted, name)
        table.add_row(name, *("–" if v is None else f"{v:.3f}" for v in measured),
                      "–" if guess is None else f"{guess:.3f}", _error(guess, value(slowest.measured, name)))
    return table


def format_memory_report(report: Report) -> Table:
    """Measured beside predicted bytes, per rank and category, with the relative error."""
    table = Table(title="memory by category", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1),
                  caption="measured: torch's MemTracker over one step (model states after it, activations "
                          "and temporaries at its peak) · predicted: the plan's cost model")
    for column in ("rank", "category", "measured", "predicted", "error"):
        table.add_column(column, justify="left" if column == "category" else "right", no_wrap=True)
    for r in report.ranks:
        for name in MEMORY_CATEGORIES:
            measured, predicted = r.measured.memory_bytes.get(name), r.predicted.memory_bytes.get(name)
            error = _error(predicted, measured)
            table.add_row(str(r.rank) if name == MEMORY_CATEGORIES[0] else "", name,
                          "–" if measured is None else fmt.nbytes(measured),
                          "–" if predicted is None else fmt.nbytes(predicted), error)
    return table


PLAIN_STEPS = 3


def _timed_s(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(compiled: Compiled, inputs: Any, targets: Any) -> Report:
    """Measure training steps of a ``Compiled`` model and put it back as it was: returns a
    :class:`Report` of every rank's measured time and memory beside the Plan's predictions.

    Distributed, a collective: call it on every rank. It runs up to six steps — a warm-up when
    none has run yet (capture and the pipeline's shape inference would dominate the measurement),
    :data:`PLAIN_STEPS` timed as training runs (their median), one under the profiler (its split
    of the step into phases, scaled to the unprofiled step: ``runtime.measure.without_profiler``),
    one under the memory tracker — then restores the parameters, the optimizer state, the step
    counter and the passes' state, so the model trains on as if it had not been called.
    """
    compiled.prepare(inputs)
    with _restored(compiled):
        if not compiled.steps_run:
            compiled.step(inputs, targets)
        plain_s = statistics.median(_timed_s(lambda: compiled.step(inputs, targets))
                                    for _ in range(PLAIN_STEPS))
        timed = without_profiler(compiled.measure_step(inputs, targets), plain_s)
        memory = compiled.measure_memory(inputs, targets)
    mine = dataclasses.replace(_with_moe(timed, compiled), memory_bytes=tuple(sorted(memory.items())))
    plan = compiled.plan
    ranks = tuple(RankReport(rank=r.rank, step=r,
                             measured=StepNumbers(step_s=r.step_s, memory_bytes=dict(r.memory_bytes),
                                                  phases_s=dict(r.phases_s)),
                             predicted=StepNumbers(step_s=plan.predicted.step_time_s,
                                                   memory_bytes=predicted_memory_bytes(plan, r.rank),
                                                   phases_s=predicted_phases_s(plan, r.rank)))
                  for r in gather_reports(mine))
    return Report(ranks=ranks, plan=plan)


@contextlib.contextmanager
def _restored(compiled: Compiled) -> Iterator[None]:
    """Parameters, optimizer state, step counter and pass state as they were before the block."""
    executor, steps, passes = compiled.executor, compiled.num_steps, compiled.pass_state
    params = [p for copies in executor.parameter_copies().values() for p in copies]
    saved = [p.detach().clone() for p in params]
    optimizer = executor.optimizer
    state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for param, value in zip(params, saved, strict=True):
                param.copy_(value)
                param.grad = None
        optimizer.state.clear()
        optimizer.state.update(state)
        compiled.load_pass_state(passes)
        compiled.num_steps = steps
