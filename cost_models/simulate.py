"""Discrete-event simulation of a pipeline schedule: the per-rank timeline views draw.

Data flow: per-stage :class:`~autopar.cost_models.schedule.StageTimes` (from ``estimate``) and
the schedule's per-rank action lists (``schedule.rank_actions``) go in; a :class:`Timeline`
of events (rank, stage, microbatch, kind, start, end) comes out. Each rank runs its list in
order; an action starts when the rank is free and its input has arrived:

* F of stage ``k`` needs F of stage ``k−1`` for the same microbatch, plus its send;
* B of stage ``k`` needs B of stage ``k+1`` plus its send (the last stage: its own F);
* W (zero-bubble weight gradients) needs the rank's own B.

Sends block the sender for their duration (as Megatron-LM's P2P does); waiting while an
input is in flight is ``recv``, other waiting is ``idle``. Recomputation runs right before
its backward. On uniform stages the total equals ``schedule.pipeline_time`` (tests).
The timeline covers the pipeline part of a step; data-parallel sync and the optimizer
follow it. :func:`simulate_predicted` runs it on the stage times a Plan stores
(``plan.predicted.stages``), so views draw a timeline without a model profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cost_models.schedule import Action, StageTimes, rank_actions

if TYPE_CHECKING:
    from autopar.plans import Plan

EVENT_KINDS = ("forward", "backward", "backward_weight", "recompute", "send", "recv", "idle")


@dataclass(frozen=True)
class TimelineEvent:
    """One interval on one pipeline rank; ``stage``/``microbatch`` are None for idle time."""

    rank: int
    stage: int | None
    microbatch: int | None
    kind: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Timeline:
    """All events, ordered by rank then start time; ``total_s`` is the last end."""

    events: tuple[TimelineEvent, ...]
    total_s: float
    num_ranks: int

    def seconds_by_kind(self, rank: int | None = None) -> dict[str, float]:
        """Total seconds per event kind (one rank, or summed over all)."""
        totals = dict.fromkeys(EVENT_KINDS, 0.0)
        for event in self.events:
            if rank is None or event.rank == rank:
                totals[event.kind] += event.end_s - event.start_s
        return totals


class _Run:
    """Mutable state of one simulation."""

    def __init__(self, stages: Sequence[StageTimes], pp: int, split_weight: bool) -> None:
        self.stages, self.pp, self.split = stages, pp, split_weight
        self.free = [0.0] * pp
        self.events: list[TimelineEvent] = []
        self.arrival: dict[tuple[str, int, int], tuple[float, float]] = {}  # (send start, arrival)

    def dependency(self, action: Action) -> tuple[float, float] | None:
        """(transfer start, ready time) of the action's input, or None if not yet produced."""
        last = len(self.stages) - 1
        k, j = action.stage, action.microbatch
        if action.kind == "F":
            return (0.0, 0.0) if k == 0 else self.arrival.get(("F", k - 1, j))
        if action.kind == "B":
            return self.arrival.get(("F", k, j) if k == last else ("B", k + 1, j))
        return self.arrival.get(("B", k, j))

    def emit(self, rank: int, action: Action | None, kind: str, start: float, duration: float) -> float:
        if duration > 0:
            stage, micro = (action.stage, action.microbatch) if action else (None, None)
            self.events.append(TimelineEvent(rank, stage, micro, kind, start, start + duration))
        return start + duration

    def wait(self, rank: int, until: float, transfer_start: float) -> None:
        now = self.free[rank]
        if until <= now:
            return
        recv_from = max(now, transfer_start)
        if recv_from > now:
            self.emit(rank, None, "idle", now, recv_from - now)
        self.emit(rank, None, "recv" if transfer_start < until else "idle", recv_from, until - recv_from)
        self.free[rank] = until

    def run(self, rank: int, action: Action) -> None:
        stage = self.stages[action.stage]
        k, j = action.stage, action.microbatch
        now = self.free[rank]
        if action.kind == "F":
            done = self.emit(rank, action, "forward", now, stage.forward_s)
            last = k == len(self.stages) - 1
            sent = self.emit(rank, action, "send", done, 0.0 if last else stage.send_forward_s)
            self.arrival[("F", k, j)] = (done, sent)
        elif action.kind == "B":
            now = self.emit(rank, action, "recompute", now, stage.recompute_s)
            length = stage.backward_s + (0.0 if self.split else stage.backward_weight_s)
            done = self.emit(rank, action, "backward", now, length)
            sent = self.emit(rank, action, "send", done, stage.send_backward_s if k > 0 else 0)
            self.arrival[("B", k, j)] = (done, sent)
        else:
            sent = self.emit(rank, action, "backward_weight", now, stage.backward_weight_s)
            self.arrival[("W", k, j)] = (sent, sent)
        self.free[rank] = sent


def simulate(stages: Sequence[StageTimes], *, schedule: str, pp: int, num_microbatches: int,
             virtual_stages: int = 1) -> Timeline:
    """Run every rank's action list; raises AssertionError if the lists deadlock."""
    lists = [rank_actions(schedule, pp=pp, rank=r, num_microbatches=num_microbatches,
                          virtual_stages=virtual_stages) for r in range(pp)]
    state = _Run(stages, pp, split_weight=schedule == "zero_bubble")
    position = [0] * pp
    remaining = sum(map(len, lists))
    while remaining:
        progressed = False
        for rank in range(pp):
            while position[rank] < len(lists[rank]):
                action = lists[rank][position[rank]]
                dependency = state.dependency(action)
                if dependency is None:
                    break
                state.wait(rank, dependency[1], dependency[0])
                state.run(rank, action)
                position[rank] += 1
                remaining -= 1
                progressed = True
        stuck = [lists[r][position[r]] for r in range(pp) if position[r] < len(lists[r])]
        assert progressed, f"schedule {schedule} deadlocks at {stuck}"
    total = max(state.free)
    for rank in range(pp):
        state.wait(rank, total, total)
    events = sorted(state.events, key=lambda e: (e.rank, e.start_s))
    return Timeline(events=tuple(events), total_s=total, num_ranks=pp)


def stored_stage_times(plan: Plan) -> list[StageTimes] | None:
    """The per-stage times ``plan.predicted.stages`` stores (None when the plan has none)."""
    if not plan.predicted.stages:
        return None
    return [StageTimes(forward_s=s.forward_s, backward_s=s.backward_s, backward_weight_s=s.backward_weight_s,
                       recompute_s=s.recompute_s, send_forward_s=s.send_forward_s,
                       send_backward_s=s.send_backward_s) for s in plan.predicted.stages]


def simulate_predicted(plan: Plan) -> Timeline | None:
    """The timeline of ``plan``'s pipeline part from its stored stage times (None without them);
    equal to ``estimate.simulate_plan`` on the profile the plan was estimated with."""
    stages = stored_stage_times(plan)
    if stages is None:
        return None
    sched = plan.schedule
    return simulate(stages, schedule=sched.name, pp=plan.parallelism.pp,
                    num_microbatches=sched.num_microbatches, virtual_stages=sched.virtual_stages)
