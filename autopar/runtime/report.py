"""The measured twin of a training step: per-stage compute, communication, bubble, peak memory.

Data flow: :class:`~autopar.runtime.engine.Engine` → :func:`measure_step` runs one
``Engine.step`` under ``torch.profiler`` → :class:`StepReport` for this rank →
:func:`gather_reports` (every rank's report on every rank) → :func:`format_report`, a
rich Table beside the Plan's ``predicted`` numbers. :func:`report` does all of it for
a ``Compiled`` model (``Compiled.report()``); on one device :func:`measure_local_step`
profiles ``Compiled.step`` (labelled forward and backward, stage 0) instead. With MoE layers,
:func:`format_moe_report` adds a table of their expert loads in the measured step (each
rank's ``Compiled.moe_stats()``, carried in its StepReport).

How each number is measured, all from one profiler trace of the step (one clock):

- **forward / backward s**, per local stage: the stage's ``forward_one_chunk`` (plus
  the loss on the last stage) and ``backward_one_chunk`` / ``backward_weight_one_chunk``
  / ``perform_reduce_grad`` calls, labelled with ``record_function``, minus the time a
  collective was in flight (FSDP gathers and gradient reductions run inside them).
  The labels are timing wrappers set as *instance attributes* of the PipelineStage
  objects (and the schedule's ``_loss_fn``) by :func:`labelled_compute`, a context
  manager that removes them again; the classes are never patched.
- **optimizer s**: torch's own ``Optimizer.step#…`` profiler label.
- **comm s**: time during which a collective (all-reduce, all-gather, reduce-scatter…:
  the backend's ``gloo:*`` / ``nccl:*`` events other than send/recv) was in flight.
  It includes waiting for the slowest participant, as a waiting NCCL kernel does in a
  GPU trace.
- **bubble s** = step − compute − comm: time this rank neither computed nor had a
  collective in flight. Pipeline send/recv waits land here on purpose: on one host
  the transfer of an activation takes milliseconds, while the wait for the peer
  stage to produce it is the pipeline bubble. ``p2p_wait_s`` says how much of the
  bubble was spent blocked on point-to-point transfers.
- **peak memory**: ``ru_maxrss`` of the process (its peak so far, not of this step
  alone) on CPU; ``torch.cuda.max_memory_allocated`` over the step on GPU.

Only host activity is traced. On GPU each labelled call ends with a device
synchronize so compute covers the kernels, but NCCL's host events are launches, so
comm is understated there until CUDA activity is traced too. The profiler's one-time
start-up is paid before the measured step; it then costs a few per cent of a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from rich import box
from rich.console import Group
from rich.table import Table
from torch.profiler import ProfilerActivity, profile, record_function

from autopar.capture import normalize_inputs
from autopar.cli import fmt
from autopar.passes.moe_layer import MoEStats
from autopar.plans import Plan

if TYPE_CHECKING:
    from autopar.runtime.engine import Engine

LABEL = "autopar::"
STEP_LABEL = LABEL + "step"
OPTIMIZER_PREFIX = "Optimizer.step#"
COMM_EVENT = re.compile(r"^(gloo|nccl|ucc|mpi):")
P2P_EVENT = re.compile(r"^(gloo|nccl|ucc|mpi):(send|recv)")
STAGE_METHODS = {"forward_one_chunk": "forward", "backward_one_chunk": "backward",
                 "backward_weight_one_chunk": "backward", "perform_reduce_grad": "backward"}
Interval = tuple[float, float]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepReport:
    """One rank's measured step; times in seconds, per local stage in ``stages`` order."""

    rank: int
    stages: tuple[int, ...]
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    optimizer_s: float
    comm_s: float
    bubble_s: float
    p2p_wait_s: float
    step_s: float
    loss: float
    peak_memory_bytes: int
    memory_kind: Literal["rss", "cuda_allocated"]
    moe: tuple[tuple[int, MoEStats], ...] = ()  # (MoE layer, its load in the step) on this rank

    @property
    def compute_s(self) -> float:
        return sum(self.forward_s) + sum(self.backward_s) + self.optimizer_s


def _stages(engine: Engine) -> list[Any]:
    schedule = engine.schedule
    stages = getattr(schedule, "_stages", None) or [schedule._stage]  # torch's schedule attributes
    return list(stages)


def _labelled(fn: Callable[..., Any], label: str, sync: bool) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            result = fn(*args, **kwargs)
            if sync:  # a GPU call only launches work; the label must cover its execution
                torch.cuda.synchronize()
            return result

    return call


@contextlib.contextmanager
def labelled_compute(engine: Engine) -> Iterator[None]:
    """Label each local stage's compute calls and the loss with ``record_function``.

    The wrappers are instance attributes of the PipelineStage objects and of the
    schedule, removed on exit (the class methods show through again).
    """
    sync = engine.device.type == "cuda"
    patched: list[tuple[Any, str]] = []
    schedule = engine.schedule
    loss_fn = schedule._loss_fn  # an instance attribute already; restored below
    try:
        for stage in _stages(engine):
            for method, kind in STAGE_METHODS.items():
                assert method not in vars(stage), f"{method} is already wrapped on stage {stage.stage_index}"
                label = f"{LABEL}{kind}::{stage.stage_index}"
                setattr(stage, method, _labelled(getattr(stage, method), label, sync))
                patched.append((stage, method))
        if loss_fn is not None:
            schedule._loss_fn = _labelled(loss_fn, f"{LABEL}forward::{engine.num_stages - 1}", sync)
        yield
    finally:
        for stage, method in patched:
            delattr(stage, method)
        schedule._loss_fn = loss_fn


_PROFILER_READY = False


def _warm_profiler() -> None:
    """Pay kineto's one-time start-up outside the measured step, and keep it quiet."""
    global _PROFILER_READY
    if not _PROFILER_READY:
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # level 6 drops kineto's "USDT" stderr lines
        with profile(activities=[ProfilerActivity.CPU]):
            torch.zeros(1).add_(1)
        _PROFILER_READY = True


def _union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in _union(intervals))


def _outside(intervals: list[Interval], exclude: list[Interval]) -> float:
    """Length of the union of ``intervals`` not covered by ``exclude``."""
    return _length(intervals + exclude) - _length(exclude)


def _clip(intervals: Iterable[Interval], window: Interval) -> list[Interval]:
    return [(max(s, window[0]), min(e, window[1])) for s, e in intervals if e > window[0] and s < window[1]]


def _peak_memory(device: torch.device) -> tuple[int, Literal["rss", "cuda_allocated"]]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "rss"  # Linux reports KiB


def measure_step(engine: Engine, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                 step: int = 0) -> StepReport:
    """Run one training step number ``step`` (it updates the model) and measure it on this rank."""
    _warm_profiler()
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    with labelled_compute(engine), profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(STEP_LABEL):
            loss = engine.step(args, kwargs, targets, step=step)
    events = [(e.name, (e.time_range.start / 1e6, e.time_range.end / 1e6)) for e in prof.events()]
    peak, kind = _peak_memory(engine.device)
    return _from_events(events, rank=dist.get_rank(), stages=tuple(engine.stage_indices), loss=loss,
                        peak_memory_bytes=peak, memory_kind=kind)


def _from_events(events: list[tuple[str, Interval]], *, rank: int, stages: tuple[int, ...], loss: float,
                 peak_memory_bytes: int, memory_kind: Literal["rss", "cuda_allocated"]) -> StepReport:
    """Turn the step's profiler events (name, (start s, end s)) into a StepReport."""
    window = next(span for name, span in events if name == STEP_LABEL)

    def spans(match: Callable[[str], bool]) -> list[Interval]:
        return _clip((span for name, span in events if match(name)), window)

    comm = _union(spans(lambda n: bool(COMM_EVENT.match(n)) and not P2P_EVENT.match(n)))
    work = {(kind, stage): spans(lambda n, k=kind, s=stage: n == f"{LABEL}{k}::{s}")
            for kind in ("forward", "backward") for stage in stages}
    optimizer = spans(lambda n: n.startswith(OPTIMIZER_PREFIX))
    busy = _union([span for group in work.values() for span in group] + optimizer + comm)
    step_s = window[1] - window[0]
    return StepReport(
        rank=rank, stages=stages,
        forward_s=tuple(_outside(work["forward", s], comm) for s in stages),
        backward_s=tuple(_outside(work["backward", s], comm) for s in stages),
        optimizer_s=_outside(optimizer, comm), comm_s=_length(comm),
        bubble_s=max(step_s - _length(busy), 0.0),
        p2p_wait_s=_outside(spans(lambda n: bool(P2P_EVENT.match(n))), busy),
        step_s=step_s, loss=loss, peak_memory_bytes=peak_memory_bytes, memory_kind=memory_kind,
    )


def gather_reports(mine: StepReport) -> list[StepReport]:
    """Every rank's report, in rank order, on every rank (a collective: call on all ranks)."""
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)  # inter-process transport only, never persisted
    return sorted(reports, key=lambda r: r.rank)


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


def measure_local_step(compiled: Any, inputs: Any, targets: Any) -> StepReport:
    """Run ``compiled.step`` (one device) under the profiler and measure it (stage 0, rank 0)."""
    _warm_profiler()
    device = next(compiled.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(STEP_LABEL):
            loss = compiled.step(inputs, targets)
    events = [(e.name, (e.time_range.start / 1e6, e.time_range.end / 1e6)) for e in prof.events()]
    peak, kind = _peak_memory(device)
    return _from_events(events, rank=0, stages=(0,), loss=loss, peak_memory_bytes=peak, memory_kind=kind)


def _estimated_local_plan(compiled: Any) -> Plan:
    """The single-device Plan with the cost model's predictions for the latest capture."""
    from autopar.cost_models.estimate import estimate_plan
    from autopar.passes.random_ltd import kept_fractions, ltd_profile
    from autopar.planning import profile_of

    plan, captured = compiled.plan, compiled.captured
    profile = ltd_profile(profile_of(captured, plan.cluster_spec()), kept_fractions(captured.graph_module))
    return estimate_plan(plan, profile)


def report(compiled: Any, inputs: Any, targets: Any) -> Table | Group:
    """Run one measured training step of a ``Compiled`` model; return the table, or, when the
    model has MoE layers, a Group of it and the MoE table (:func:`format_moe_report`).

    Distributed, a collective: call it on every rank. The step trains the model like ``step()``;
    if no step has run yet, one unmeasured step first captures and builds the runtime (capture and
    the pipeline's shape inference would otherwise dominate the measurement).
    """
    if (compiled._engine if compiled.distributed else compiled._optimizer) is None:  # no step yet
        compiled.step(inputs, targets)
    if compiled.distributed:
        engine = compiled.engine
        args, kwargs = ((), dict(inputs)) if isinstance(inputs, dict) else (normalize_inputs(inputs), {})
        mine = measure_step(engine, args, kwargs, targets, step=compiled.num_steps)
        compiled.num_steps += 1
        reports, plan = gather_reports(_with_moe(mine, compiled)), engine.plan
    else:
        reports = [_with_moe(measure_local_step(compiled, inputs, targets), compiled)]
        plan = _estimated_local_plan(compiled)
    table = format_report(reports, plan)
    moe = format_moe_report(reports, ranks=compiled.distributed)
    return table if moe is None else Group(table, moe)
