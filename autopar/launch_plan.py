"""Start the distributed executor of a compiled model: take or search the Plan, lower the runtime's
microbatch, build the :class:`~autopar.runtime.engine.Engine`.

Data flow: ``Compiled``'s first multi-device step (or ``compiled.prepare(inputs)``) →
:func:`start_engine` → without ``plan=``, rank 0 searches a Plan on the Program of the example
batch (``autopar.plan_api.search_program``) and sends it to every rank as JSON bytes (no pickling),
so all ranks run the same Plan even if the search hit its time limit → every rank lowers the
plan's microbatch (the same Program on rank 0 when the microbatch is the whole batch: at most two
captures per rank) → a plan without predictions is priced on it (``autopar.lower.predict``) → the
Engine. With context parallelism (cp > 1) the Engine gets one more capture, of the microbatch at
the local sequence length ``seq/cp`` (``runtime.sequence_shard.local_example``), so every shape in
its stage graphs is the one a cp rank runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from autopar.capture.batch import leading_dims, resize_batch
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.lower import Program, predicted_plan
from autopar.plans import Plan, check_fingerprint
from autopar.programs import Programs
from autopar.runtime.sequence_shard import check_passes, local_example
from autopar.runtime.split import check_stage_layers

if TYPE_CHECKING:
    from autopar.runtime.engine import Engine


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineRequest:
    """What the compiled model asks for: its pins or its Plan, and how to train."""

    cluster: ClusterSpec
    fix: Fix
    plan: Plan | None
    time_limit_s: float
    loss_fn: Callable[[Any, Any], torch.Tensor]
    optimizer: Callable[..., torch.optim.Optimizer]


def start_engine(programs: Programs, request: EngineRequest, args: tuple[Any, ...], kwargs: dict[str, Any],
                 *, step: int) -> Engine:
    """The Engine for a global batch shaped like ``(args, kwargs)`` (collective: every rank)."""
    from autopar.runtime.engine import Engine  # torch.distributed.pipelining is slow to import

    batch, _ = leading_dims(args, kwargs)
    plan = request.plan if request.plan is not None else _searched_plan(programs, request, args, kwargs,
                                                                          batch, step=step)
    if plan.global_batch_size != batch:
        raise ValueError(f"the plan is for a global batch of {plan.global_batch_size}, but step() got "
                         f"{batch}; pass batches of the plan's size, or plan for this one")
    micro_args, micro_kwargs = resize_batch((args, kwargs), plan.schedule.microbatch_size)
    program = programs.get(micro_args, micro_kwargs, training=True, step=step)
    if request.plan is None:
        plan = dataclasses.replace(plan, graph_fingerprint=program.fingerprint)
    else:
        check_fingerprint(plan, program.fingerprint)
    _check_against_model(plan, program)
    if plan.predicted.step_time_s is None:
        plan = predicted_plan(plan, program)
    if plan.parallelism.cp > 1:
        program = _local_sequence_program(programs, plan, program, micro_args, micro_kwargs, step=step)
    return Engine(program.captured, plan, loss_fn=request.loss_fn, optimizer=request.optimizer,
                  passes=programs.pass_states)


def _local_sequence_program(programs: Programs, plan: Plan, program: Program, args: tuple[Any, ...],
                            kwargs: dict[str, Any], *, step: int) -> Program:
    """The microbatch captured at the sequence length one cp rank runs."""
    cp = plan.parallelism.cp
    check_passes([a.name for a in program.applied], cp=cp)
    if program.seq_len is None:
        raise ValueError(f"the plan has context parallelism (cp = {cp}) but the batch has no (batch, seq) "
                         "tensor to split along the sequence; use cp = 1")
    local_args, local_kwargs = local_example((args, kwargs), seq_len=program.seq_len, cp=cp)
    return programs.get(local_args, local_kwargs, training=True, step=step)


def _check_against_model(plan: Plan, program: Program) -> None:
    """The plan's fields that name parts of the model must name this model's: stage layer ranges
    tile its layers, shardings name its nodes (a hand-edited plan is refused here, on every rank,
    before any collective)."""
    check_stage_layers(len(program.captured.layers), [s.layers for s in plan.stages])
    nodes = {node.name for node in program.graph_module.graph.nodes}
    unknown = sorted({s.node for s in plan.shardings} - nodes)
    if unknown:
        raise ValueError(f"the plan shards node(s) {unknown[:5]} that this model's graph does not have; "
                         "re-plan for this model, or remove those shardings from the plan")


def _searched_plan(programs: Programs, request: EngineRequest, args: tuple[Any, ...], kwargs: dict[str, Any],
                   batch: int, *, step: int) -> Plan:
    """The planner's Plan (pins kept, the rest searched), made on rank 0, the same on every rank."""
    from autopar.plan_api import search_program

    text = ""
    if dist.get_rank() == 0:
        program = programs.get(args, kwargs, training=True, step=step)
        result = search_program(program, cluster=request.cluster, global_batch_size=batch, fix=request.fix,
                                time_limit_s=request.time_limit_s)
        text = result.plan.to_json()
    if dist.get_world_size() > 1:
        text = broadcast_text(text)
    return Plan.from_json(text)


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank, as a length then UTF-8 bytes in tensors (no pickling)."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64)
    dist.broadcast(size, src=0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(data, src=0)
    return bytes(data.tolist()).decode()
