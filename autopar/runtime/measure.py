"""The measured twin of a training step: per-stage compute, communication, bubble, peak memory.

Data flow: an executor (:class:`~autopar.runtime.engine.Engine` on several devices,
:class:`~autopar.runtime.local.LocalEngine` on one) → its ``measure_step`` runs one step under
``torch.profiler`` (:func:`measure_engine_step`, or :func:`measure_labelled_step` for a step whose
forward and backward carry the stage-0 labels) → :class:`StepReport` for this rank →
:func:`gather_reports` (every rank's report on every rank) → ``autopar.report``, which prints it
beside the Plan's predictions.

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
- **memory by category**, in another step: torch's ``MemTracker`` on CPU
  (:func:`measure_memory_bytes`), the CUDA allocator's statistics on a GPU
  (:func:`measure_cuda_memory_bytes`).

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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile, record_function

from autopar.passes.moe.layer import MoEStats
from autopar.runtime.recompute import Recomputed

if TYPE_CHECKING:
    from autopar.runtime.engine import Engine

LABEL = "autopar::"
STEP_LABEL = LABEL + "step"
OPTIMIZER_PREFIX = "Optimizer.step#"
COMM_EVENT = re.compile(r"^(gloo|nccl|ucc|mpi):")
P2P_EVENT = re.compile(r"^(gloo|nccl|ucc|mpi):(send|recv)")
STAGE_METHODS = {"forward_one_chunk": "forward", "backward_one_chunk": "backward",
                 "backward_weight_one_chunk": "backward", "perform_reduce_grad": "reduce"}
LAYER_LABEL = LABEL + "layer"  # a recomputed layer's forward: inside a backward label it is recomputation
ALL_TO_ALL = re.compile(r"all_?to_?all")
SEND_EVENT = re.compile(r"^(gloo|nccl|ucc|mpi):send")
PHASES = ("forward", "backward", "recompute", "tp_comm", "dp_comm", "pp_comm", "ep_comm", "bubble",
          "optimizer")
"""The step's phases, measured (:attr:`StepReport.phases_s`) and predicted (``autopar.report``)."""
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
    memory_bytes: tuple[tuple[str, int], ...] = ()  # (category, bytes) of a tracked step, MEMORY_CATEGORIES
    phases_s: tuple[tuple[str, float], ...] = ()  # (phase, seconds) for PHASES, adding up to step_s
    profiled_step_s: float | None = None  # the step under the profiler, when ``step_s`` is one without it

    @property
    def compute_s(self) -> float:
        return sum(self.forward_s) + sum(self.backward_s) + self.optimizer_s


def without_profiler(report: StepReport, step_s: float) -> StepReport:
    """``report`` at the length of an unprofiled step of ``step_s`` seconds (the same inputs, run
    just before): every time scaled by ``step_s / report.step_s``. The profiler records every op,
    which on CPU lengthened the demo's 4-rank step from 0.23 s to 0.31 s (MEASURED, 2-core KVM
    Xeon), roughly in proportion to the ops each phase runs; its split of the step is kept."""
    if report.step_s <= 0 or step_s <= 0:
        return report
    k = step_s / report.step_s
    return dataclasses.replace(
        report, forward_s=tuple(k * x for x in report.forward_s),
        backward_s=tuple(k * x for x in report.backward_s), optimizer_s=k * report.optimizer_s,
        comm_s=k * report.comm_s, bubble_s=k * report.bubble_s, p2p_wait_s=k * report.p2p_wait_s,
        step_s=step_s, phases_s=tuple((n, k * x) for n, x in report.phases_s), profiled_step_s=report.step_s)


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
    """Label each local stage's compute calls, the loss and the forward of every recomputed layer
    (``autopar.runtime.recompute.Recomputed``) with ``record_function``.

    The wrappers are instance attributes of the PipelineStage objects, of the recomputed layers and
    of the schedule, removed on exit (the class methods show through again).
    """
    sync = engine.device.type == "cuda"
    patched: list[tuple[Any, str]] = []
    schedule = engine.schedule
    loss_fn = schedule._loss_fn  # an instance attribute already; restored below
    try:
        for stage in _stages(engine):
            for method, kind in STAGE_METHODS.items():
                assert method not in vars(stage), f"{method} is already wrapped on stage {stage.stage_index}"
                label = stage_label(kind, stage.stage_index)
                setattr(stage, method, _labelled(getattr(stage, method), label, sync))
                patched.append((stage, method))
            for module in stage.submod.modules():
                if isinstance(module, Recomputed):
                    module.inner.forward = _labelled(module.inner.forward, LAYER_LABEL, sync)
                    patched.append((module.inner, "forward"))
        if loss_fn is not None:
            schedule._loss_fn = _labelled(loss_fn, stage_label("forward", engine.num_stages - 1), sync)
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


def measure_engine_step(engine: Engine, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                        step: int = 0) -> StepReport:
    """Run one pipelined training step number ``step`` (it updates the model) and measure it on
    this rank, each local stage's compute labelled (:func:`labelled_compute`)."""
    with labelled_compute(engine):
        return measure_labelled_step(lambda: engine.step(args, kwargs, targets, step=step),
                                     device=engine.device, rank=dist.get_rank(),
                                     stages=tuple(engine.stage_indices), tp=engine.plan.parallelism.tp)


def measure_labelled_step(run: Callable[[], float], *, device: torch.device, rank: int = 0,
                          stages: tuple[int, ...] = (0,), tp: int = 1) -> StepReport:
    """Profile ``run()`` (one training step returning its loss), whose compute carries the labels
    ``autopar::forward::<stage>`` / ``autopar::backward::<stage>``, and summarize it."""
    _warm_profiler()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(STEP_LABEL):
            loss = run()
    events = [(e.name, (e.time_range.start / 1e6, e.time_range.end / 1e6)) for e in prof.events()]
    peak, kind = _peak_memory(device)
    return _from_events(events, rank=rank, stages=stages, loss=loss, peak_memory_bytes=peak, memory_kind=kind,
                        tp=tp)


def stage_label(kind: str, stage: int) -> str:
    """The profiler label of a stage's forward or backward compute (what :func:`_from_events` reads)."""
    return f"{LABEL}{kind}::{stage}"


def _from_events(events: list[tuple[str, Interval]], *, rank: int, stages: tuple[int, ...], loss: float,
                 peak_memory_bytes: int, memory_kind: Literal["rss", "cuda_allocated"], tp: int = 1
                 ) -> StepReport:
    """Turn the step's profiler events (name, (start s, end s)) into a StepReport (``tp``: the
    plan's tensor-parallel degree, to tell its collectives from data parallelism's)."""
    window = next(span for name, span in events if name == STEP_LABEL)

    def spans(match: Callable[[str], bool]) -> list[Interval]:
        return _clip((span for name, span in events if match(name)), window)

    collectives = [(name, span) for name, span in events
                   if COMM_EVENT.match(name) and not P2P_EVENT.match(name)]
    comm = _union(_clip((span for _, span in collectives), window))
    work = {(kind, stage): spans(lambda n, k=kind, s=stage: n == f"{LABEL}{k}::{s}")
            for kind in ("forward", "backward", "reduce") for stage in stages}
    optimizer = spans(lambda n: n.startswith(OPTIMIZER_PREFIX))
    busy = _union([span for group in work.values() for span in group] + optimizer + comm)
    step_s = window[1] - window[0]
    backward = tuple(work["backward", s] + work["reduce", s] for s in stages)
    report = StepReport(
        rank=rank, stages=stages,
        forward_s=tuple(_outside(work["forward", s], comm) for s in stages),
        backward_s=tuple(_outside(spans_, comm) for spans_ in backward),
        optimizer_s=_outside(optimizer, comm), comm_s=_length(comm),
        bubble_s=max(step_s - _length(busy), 0.0),
        p2p_wait_s=_outside(spans(lambda n: bool(P2P_EVENT.match(n))), busy),
        step_s=step_s, loss=loss, peak_memory_bytes=peak_memory_bytes, memory_kind=memory_kind,
    )
    calls = {name: [span for (kind, _), group in work.items() if (kind == "reduce") == (name == "reduce")
                    for span in group] for name in ("stage", "reduce")}
    phases = _phases(report, collectives=collectives, sends=spans(lambda n: bool(SEND_EVENT.match(n))),
                     stage_calls=calls["stage"], reduce=calls["reduce"],
                     backward=[span for group in backward for span in group],
                     layers=spans(lambda n: n == LAYER_LABEL), busy=busy, window=window, tp=tp)
    return dataclasses.replace(report, phases_s=tuple(phases.items()))


def _phases(report: StepReport, *, collectives: list[tuple[str, Interval]], sends: list[Interval],
            stage_calls: list[Interval], reduce: list[Interval], backward: list[Interval],
            layers: list[Interval], busy: list[Interval], window: Interval, tp: int) -> dict[str, float]:
    """The step by :data:`PHASES`, adding up to its length.

    recompute: recomputed layers' forwards inside a backward call (taken out of backward).
    Collectives by kind: all-to-alls are expert parallelism's; inside ``perform_reduce_grad`` or
    outside every stage call (gradient sync, tied weights, the loss) data parallelism's; inside a
    stage's forward or backward tensor parallelism's when ``tp > 1``, else data parallelism's
    (FSDP's gathers). pp_comm: pipeline sends outside the rest. bubble: what is left."""
    comm = _union(_clip((span for _, span in collectives), window))
    recompute = _outside(_intersect(_union(layers), _union(backward)), comm)
    kinds: dict[str, list[Interval]] = {"tp_comm": [], "dp_comm": [], "ep_comm": []}
    stage_calls, reduce = _union(stage_calls), _union(reduce)
    for name, span in collectives:
        middle = (span[0] + span[1]) / 2
        if ALL_TO_ALL.search(name):
            kind = "ep_comm"
        elif tp > 1 and _covers(stage_calls, middle) and not _covers(reduce, middle):
            kind = "tp_comm"
        else:
            kind = "dp_comm"
        kinds[kind] += _clip([span], window)
    phases = {"forward": sum(report.forward_s), "backward": max(sum(report.backward_s) - recompute, 0.0),
              "recompute": recompute, **{k: _length(v) for k, v in kinds.items()},
              "pp_comm": _outside(sends, busy), "optimizer": report.optimizer_s}
    phases["bubble"] = max(report.step_s - sum(phases.values()), 0.0)
    return {name: phases[name] for name in PHASES}


def _intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Intersection of two unions of disjoint sorted intervals."""
    return [(max(s1, s2), min(e1, e2)) for s1, e1 in a for s2, e2 in b if min(e1, e2) > max(s1, s2)]


def _covers(intervals: list[Interval], moment: float) -> bool:
    return any(start <= moment <= end for start, end in intervals)


def gather_reports(mine: StepReport) -> list[StepReport]:
    """Every rank's report, in rank order, on every rank (a collective: call on all ranks; without a
    process group, ``[mine]``)."""
    if not dist.is_initialized():
        return [mine]
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, mine)  # inter-process transport only, never persisted
    return sorted(reports, key=lambda r: r.rank)


MEMORY_CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "temporaries")
"""What the report compares, measured (:func:`measure_memory_bytes`) and predicted."""


def measure_memory_bytes(run: Callable[[], Any], *, modules: Sequence[nn.Module],
                         optimizer: torch.optim.Optimizer, device: torch.device,
                         input_gradients_apart: bool = False) -> dict[str, int]:
    """Bytes by category (:data:`MEMORY_CATEGORIES`) of one training step ``run()`` on this rank,
    from ``torch.distributed._tools.mem_tracker.MemTracker`` (CPU and GPU tensors alike).

    Activations and temporaries are the tracker's at the step's peak. The model states (parameters,
    gradients, optimizer state) are the storages of those tensors after the step, when all of them
    exist (a DTensor's local shard): the tracker's own PARAM/GRAD counts are wrong under FSDP2,
    which swaps the modules' parameters during the step (measured: half the parameters of a
    ``dp = 2`` replicated GPT, and under ``tp = 2`` 28 % more gradient bytes than the gradients
    hold). Buffers (masks, rotary tables) are constants the cost model does not price and are
    left out. The tracker sees every
    tensor the step allocates through its dispatch mode, so the step runs slower under it: time is
    measured in another step (:func:`measure_labelled_step`). Modules on a CUDA device are measured
    from the allocator's statistics instead (:func:`measure_cuda_memory_bytes`).

    ``input_gradients_apart``: the step computes input gradients with ``torch.autograd.grad`` on a
    stage's inputs (zero-bubble schedules), where the tracker's per-module backward hooks fail
    ("A leaf node was passed to _will_engine_execute_node"); the tracker then follows modules in
    forward only. Its categories do not need those hooks: an allocation is ``TEMP`` while the
    autograd engine runs (``ModTracker.is_bw``)."""
    cuda = _cuda_device(modules, device)
    if cuda is not None:
        return measure_cuda_memory_bytes(run, modules=modules, optimizer=optimizer, device=cuda)
    tracker = _step_tracker(forward_only=input_gradients_apart)
    tracker.track_external(*modules, optimizer)
    with tracker:
        run()
    peak = _on_device(tracker.get_tracker_snapshot("peak"), device)
    params = [p for m in modules for p in m.parameters()]
    return {"parameters": _storage_bytes(params), "gradients": _storage_bytes(p.grad for p in params),
            "optimizer": _storage_bytes(v for s in optimizer.state.values() for v in s.values()),
            "activations": peak.get("ACT", 0), "temporaries": peak.get("TEMP", 0)}


def _storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of ``tensors``' storages on this rank, each storage once (tied weights); a DTensor
    counts its local shard (what this rank holds)."""
    storages = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def _step_tracker(*, forward_only: bool = False) -> Any:
    """A ``MemTracker`` for a whole pipelined step. torch's refuses a root module that runs twice in
    one tracked region (it takes that for a second iteration), but a pipeline stage runs once per
    microbatch: before each new forward of a root module, its per-module record is dropped (autopar
    reads only the per-category totals, which this does not touch). ``forward_only``: its module
    tracker registers no backward hooks (:func:`measure_memory_bytes`)."""
    import weakref

    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed._tools.mod_tracker import ModTracker

    class ForwardOnlyModTracker(ModTracker):
        def _fw_pre_hook(self, mod: nn.Module, input: Any) -> None:
            self._get_append_fn(weakref.ref(mod), self._get_mod_name(mod), False)()
            if self._user_pre_fw_hook is not None:
                self._user_pre_fw_hook(mod, input)

        def _fw_post_hook(self, mod: nn.Module, input: Any, output: Any) -> None:
            if self._user_post_fw_hook is not None:
                self._user_post_fw_hook(mod, input, output)
            self._get_pop_fn(weakref.ref(mod), self._get_mod_name(mod), False)()

    class StepTracker(MemTracker):
        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            name = self._mod_tracker.get_known_fqn(module)
            root = set(self._mod_tracker.parents) - {name} == {"Global"}
            if module in self.memory_tracking and root and not self._mod_tracker.is_bw:
                del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

    tracker = StepTracker()
    if forward_only:
        tracker._mod_tracker = ForwardOnlyModTracker()
    return tracker


def _on_device(snapshot: dict[Any, dict[Any, int]], device: torch.device) -> dict[str, int]:
    """One device's entry of a MemTracker snapshot, keyed by category name (``PARAM``, ``GRAD`` …)."""
    for key, parts in snapshot.items():
        if torch.device(key).type == device.type:
            return {str(name).rsplit(".", 1)[-1]: int(value) for name, value in parts.items()}
    return {}


CUDA_BLOCK_BYTES = 512  # the caching allocator's smallest block: torch.cuda.memory_allocated counts in these


def _cuda_device(modules: Sequence[nn.Module], device: torch.device) -> torch.device | None:
    """The CUDA device of the step: ``device``, or the one the modules' parameters live on (a
    one-device executor may not know where the user put the model); None off CUDA."""
    if device.type == "cuda":
        return device
    return next((p.device for m in modules for p in m.parameters() if p.is_cuda), None)


def _allocated_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes the CUDA allocator holds for ``tensors``' storages, each storage once (tied weights);
    tensors elsewhere (AdamW's step counts on the host) are left out."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors
                if isinstance(t, torch.Tensor) and t.is_cuda}
    return sum(-(-size // CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES for size in storages.values())


def measure_cuda_memory_bytes(run: Callable[[], Any], *, modules: Sequence[nn.Module],
                              optimizer: torch.optim.Optimizer, device: torch.device) -> dict[str, int]:
    """Bytes by category (:data:`MEMORY_CATEGORIES`) of one training step ``run()`` on a CUDA device,
    from ``torch.cuda`` allocator statistics (the step runs at full speed).

    Parameters, gradients and optimizer state are the storages of those tensors after the step, in
    the allocator's 512-byte blocks. Activations: ``torch.cuda.memory_allocated`` when a tensor is
    saved for backward (its highest outside backward, so recomputation does not count) minus its
    value when the step's first module forward began: what the forward and the loss hold for backward.
    Temporaries: ``torch.cuda.max_memory_allocated`` over the step minus the activations, the
    gradients and what was allocated when the forward began (at least parameters and optimizer
    state), so the categories add up to the measured peak when nothing else is resident."""
    marks: dict[str, int] = {}

    def before_forward(module: nn.Module, args: Any) -> None:
        marks.setdefault("start", torch.cuda.memory_allocated(device))

    def saved(tensor: torch.Tensor) -> torch.Tensor:
        if torch._C._current_autograd_node() is None:  # not a recomputation inside backward
            marks["forward"] = max(marks.get("forward", 0), torch.cuda.memory_allocated(device))
        return tensor.detach()  # not the tensor itself: that would be a reference cycle (torch's docs)

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    hook = nn.modules.module.register_module_forward_pre_hook(before_forward)
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved, lambda tensor: tensor):
            run()
        torch.cuda.synchronize(device)
    finally:
        hook.remove()
    params = [p for m in modules for p in m.parameters()]
    states = {"parameters": _allocated_bytes(params), "gradients": _allocated_bytes(p.grad for p in params),
              "optimizer": _allocated_bytes(v for s in optimizer.state.values() for v in s.values())}
    activations = max(marks.get("forward", 0) - marks.get("start", 0), 0)
    resident = max(marks.get("start", 0), states["parameters"] + states["optimizer"]) + states["gradients"]
    temporaries = max(torch.cuda.max_memory_allocated(device) - resident - activations, 0)
    return {**states, "activations": activations, "temporaries": temporaries}
