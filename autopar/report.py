"""``compiled.report()``: one measured step printed beside the Plan's predictions.

Data flow: ``Compiled`` → its executor measures one training step on every rank
(``autopar.runtime.measure``: per-stage forward/backward, communication, bubble, peak memory) →
:func:`gather_reports` brings every rank's record to every rank → :func:`format_report`, a rich
table beside the executing Plan's ``predicted`` numbers (priced by ``autopar.lower.predict``), and
with MoE layers :func:`format_moe_report`, their expert loads in the measured step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group
from rich.table import Table

from autopar import fmt
from autopar.plans import Plan
from autopar.runtime.measure import StepReport, gather_reports

if TYPE_CHECKING:
    from autopar.compile import Compiled


def _seconds(values: Iterable[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def _predicted(plan: Plan, rank: int) -> str:
    """This rank's cell: the predicted step time and its device's predicted peak memory."""
    predicted, parts = plan.predicted, []
    if predicted.step_time_s is not None:
        parts.append(f"{predicted.step_time_s:.3f} s")
    memory = predicted.peak_memory_bytes
    if memory is not None and rank < len(memory):
        parts.append(fmt.nbytes(memory[rank]))
    return " · ".join(parts) or "not estimated"


def _predicted_breakdown(plan: Plan) -> str:
    """The plan-wide predicted breakdown (seconds per step), nonzero terms only."""
    terms = [f"{key} {value:.3f}" for key, value in plan.predicted.breakdown_dict().items()
             if round(value, 3) > 0]
    return f"predicted s: {', '.join(terms)}" if terms else ""


COLUMNS = ("rank", "stages", "fwd s", "bwd s", "optim s", "comm s", "bubble s", "step s", "peak mem",
           "predicted")
MEMORY_NOTE = {"rss": "process peak RSS", "cuda_allocated": "torch.cuda.max_memory_allocated"}


def format_report(reports: list[StepReport], plan: Plan) -> Table:
    """One row per rank: measured times and memory beside the Plan's predictions."""
    par, sched = plan.parallelism, plan.schedule
    memory_kinds = sorted({MEMORY_NOTE[r.memory_kind] for r in reports})
    notes = ["fwd/bwd: per local stage, time in collectives excluded · comm: a collective in flight · "
             "bubble: neither (pipeline send/recv waits included) · peak mem: " + ", ".join(memory_kinds),
             _predicted_breakdown(plan)]
    table = Table(title=f"measured step · {plan.model} · pp{par.pp} × dp{par.dp} × tp{par.tp} · "
                        f"{sched.name}, {sched.num_microbatches} microbatches",
                  caption="\n".join(note for note in notes if note), box=box.SIMPLE_HEAD, show_edge=False,
                  padding=0)
    for column in COLUMNS:
        wide = column == "predicted"  # the only column that may wrap on a narrow terminal
        table.add_column(column, justify="left" if column in ("stages", "predicted") else "right",
                         no_wrap=not wide, overflow="fold" if wide else "ellipsis")
    for r in reports:
        memory = fmt.nbytes(r.peak_memory_bytes)
        table.add_row(str(r.rank), ", ".join(map(str, r.stages)), _seconds(r.forward_s),
                      _seconds(r.backward_s), f"{r.optimizer_s:.3f}", f"{r.comm_s:.3f}",
                      f"{r.bubble_s:.3f}", f"{r.step_s:.3f}", memory, _predicted(plan, r.rank))
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


def report(compiled: Compiled, inputs: Any, targets: Any) -> Table | Group:
    """Run one measured training step of a ``Compiled`` model; return the table, or, when the
    model has MoE layers, a Group of it and the MoE table (:func:`format_moe_report`).

    Distributed, a collective: call it on every rank. The step trains the model like ``step()``;
    if no step has run yet, one unmeasured step first captures and builds the runtime (capture and
    the pipeline's shape inference would otherwise dominate the measurement).
    """
    if not compiled.started:
        compiled.step(inputs, targets)
    mine = _with_moe(compiled.measure_step(inputs, targets), compiled)
    reports = gather_reports(mine)
    table = format_report(reports, compiled.plan)
    moe = format_moe_report(reports, ranks=len(reports) > 1)
    return table if moe is None else Group(table, moe)
