"""Schedule model: pipeline time of a step in closed form, and each rank's action list.

Data flow: ``estimate`` turns a Plan into per-stage :class:`StageTimes` (seconds per
microbatch); :func:`pipeline_time` gives the forward/backward part of the step time and its
bubble; :func:`rank_actions` gives the order in which each pipeline rank runs forward (F),
backward (B) and — for zero-bubble — weight-gradient (W) work, which ``simulate`` executes.

Closed form (``p`` ranks, ``m`` microbatches, ``v`` chunks per rank, stage ``k`` on rank
``k mod p``). With ``W_r`` rank ``r``'s work per microbatch (all its chunks, their
recomputation and sends)::

    T = m · max_r W_r + (Σ_r U_r − max_r U_r) / v

``U_r = W_r`` for GPipe, 1F1B and interleaved 1F1B (uniform stages: ``(m v + p − 1)`` chunk
times — bubble ``(p−1)/m``, or ``(p−1)/(v m)`` interleaved), which is Alpa's
``Σ_i t_i + (m−1) max_j t_j`` for ``v = 1``. For zero-bubble ZB-H1 (Qi et al. 2023) the weight
gradients fill the drain, ``U_r = W_r − 2 T_W`` (``T_F + T_B − T_W`` per stage): bubble
``(p−1)/(3m)`` when ``T_F = T_B = T_W`` (TECHNIQUES §3). On uniform stages the simulation
(``simulate``) reproduces these totals exactly; on uneven stages Alpa's form is an upper bound
in the cases tested (within 10 %).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from autopar.plans.schema import StageTimes  # noqa: F401 - the schedule model's input, defined with the Plan

Kind = Literal["F", "B", "W"]
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")


@dataclass(frozen=True, kw_only=True)
class PipelineTime:
    """``total_s = steady_s + bubble_s``; ``critical_rank`` has the most work per microbatch."""

    total_s: float
    steady_s: float
    bubble_s: float
    critical_rank: int


def _check(schedule: str, pp: int, num_stages: int, virtual_stages: int) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: expected one of {list(SCHEDULES)}")
    if num_stages != pp * virtual_stages:
        raise ValueError(f"{num_stages} stages ≠ pp({pp}) × virtual_stages({virtual_stages})")


def pipeline_time(stages: Sequence[StageTimes], *, schedule: str, pp: int, num_microbatches: int,
                  virtual_stages: int = 1) -> PipelineTime:
    """The forward/backward part of a step (see the module docstring)."""
    _check(schedule, pp, len(stages), virtual_stages)
    work = [sum(s.work_s for s in stages[r::pp]) for r in range(pp)]
    drain = work
    if schedule == "zero_bubble":
        weights = [sum(s.backward_weight_s for s in stages[r::pp]) for r in range(pp)]
        drain = [max(0.0, w - 2 * weight) for w, weight in zip(work, weights, strict=True)]
    critical = max(range(pp), key=work.__getitem__)
    steady = num_microbatches * work[critical]
    bubble = (sum(drain) - max(drain)) / virtual_stages
    return PipelineTime(total_s=steady + bubble, steady_s=steady, bubble_s=bubble, critical_rank=critical)


def bubble_fraction(schedule: str, *, pp: int, num_microbatches: int, virtual_stages: int = 1) -> float:
    """Bubble ÷ ideal time on uniform stages (zero-bubble: with ``T_F = T_B = T_W``)."""
    p, m, v = pp, num_microbatches, virtual_stages
    return {"gpipe": (p - 1) / m, "1f1b": (p - 1) / m, "interleaved": (p - 1) / (v * m),
            "zero_bubble": (p - 1) / (3 * m)}[schedule]


@dataclass(frozen=True)
class Action:
    """One unit of work on a rank: ``kind`` for ``microbatch`` on global ``stage``."""

    kind: Kind
    stage: int
    microbatch: int


def rank_actions(schedule: str, *, pp: int, rank: int, num_microbatches: int,
                 virtual_stages: int = 1) -> list[Action]:
    """The order in which pipeline rank ``rank`` runs its work."""
    _check(schedule, pp, pp * virtual_stages, virtual_stages)
    m = num_microbatches
    if schedule == "gpipe":
        return [Action("F", rank, j) for j in range(m)] + [Action("B", rank, j) for j in range(m)]
    if schedule == "interleaved":
        return _interleaved(pp=pp, rank=rank, m=m, v=virtual_stages)
    warmup = min(pp - 1 - rank, m)
    forwards = [Action("F", rank, j) for j in range(m)]
    backwards = [Action("B", rank, j) for j in range(m)]
    order = forwards[:warmup]
    defer = rank if schedule == "zero_bubble" else None  # ZB-H1: rank r holds r weight passes back
    weights = 0
    for i in range(m):
        if warmup + i < m:
            order.append(forwards[warmup + i])
        order.append(backwards[i])
        if defer is not None and i >= defer:
            order.append(Action("W", rank, weights))
            weights += 1
    if defer is not None:
        order += [Action("W", rank, j) for j in range(weights, m)]
    return order


def _interleaved(*, pp: int, rank: int, m: int, v: int) -> list[Action]:
    """Megatron-LM's interleaved 1F1B: microbatches in groups of ``p``, chunks round-robin."""
    if m % pp:
        raise ValueError(f"interleaved needs num_microbatches ({m}) to be a multiple of pp ({pp})")
    total = m * v

    def action(kind: Kind, k: int) -> Action:
        chunk = (k % (pp * v)) // pp
        chunk = chunk if kind == "F" else v - 1 - chunk
        return Action(kind, chunk * pp + rank, (k // (pp * v)) * pp + k % pp)

    warmup = total if m == pp else min(2 * (pp - rank - 1) + (v - 1) * pp, total)
    order = [action("F", k) for k in range(warmup)]
    for i in range(total - warmup):
        order += [action("F", warmup + i), action("B", i)]
    order += [action("B", k) for k in range(total - warmup, total)]
    return order
