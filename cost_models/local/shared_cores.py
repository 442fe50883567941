"""Processor-sharing simulation of a pipeline step on a machine with fewer cores than processes.

Data flow: ``cpu_step`` gives per-stage :class:`~autopar.cost_models.schedule.StageTimes` (seconds
of one process running alone), the work each pipeline rank does after the pipeline (``tails``:
gradient sync, optimizer) and how fast a process runs while ``k`` processes are busy
(``rate(k)`` for the pipeline's compute-bound work, ``tail_rate(k)`` for the memory-bound tails;
from the measured matmul and copy shares of ``CpuRates``); out comes the step time and, per pipeline
rank, its busy and idle time.

Model. Pipeline rank ``r`` stands for ``weight`` processes that run in lockstep (its data- and
tensor-parallel replicas). Each runs ``schedule.rank_actions`` in order, an action starting when
its input is ready (the dependencies of ``simulate``; a send is part of the sender's action), then
its tail. While ``k`` processes (summed weights) are busy, each progresses at ``rate(k)``
seconds of work per second: an idle process — in a pipeline bubble, or waiting for its input —
leaves its core to the others (Linux's scheduler is work-conserving), so N processes on C < N
cores are neither N devices of speed C/N nor N devices of speed 1. With ``rate ≡ 1`` the total
equals ``simulate``'s (a test checks it).

Blocked waits (``blocked``): a fraction of pipeline rank ``r``'s action work is time its processes
wait for peers at collectives (the measured sync waits, priced as work at the share of all processes
busy, ``rate(total weight)``). A blocked process leaves its core to the others, so while it runs
an action a process computes only part of the time: at rate ``ρ`` the action's ``w`` of work takes
``(1−β)·w/ρ + β·w/rate(N)`` seconds, of which the first term busy, and ``ρ = rate(k)`` with ``k``
the processes computing on average, solved as a fixed point. COUNTED on a 2-core KVM AMD EPYC,
GPT 8 × 192, dp 2 × tp 2 (4 processes): the forward and backward inside the step ran at 0.535 of
one core's speed where all four computing would give the measured 0.466, while every collective
waited a few milliseconds; 4 processes in pairs all-reducing 1.5 MiB after ~7–80 ms of work each
kept the 2 cores 1.84–1.96 busy (process CPU time over wall clock) while each spent 4–14 ms per
iteration inside the collective. Without it every 4-rank tensor-parallel plan was predicted 12–26 %
too slow there; with it (and the waits measured inside the collective), the full run at 7c38d3a
had the 4-rank tensor-parallel plans at −6 … +9 % (``benchmarks/results/cost_model_cpu.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autopar.cost_models.schedule import Action, StageTimes, rank_actions

_EPS = 1e-12


@dataclass(frozen=True)
class SharedRun:
    """``total_s``: the step; per pipeline rank, seconds busy (at the shared rate), its solo work
    and when it finished; ``critical_rank`` finished last."""

    total_s: float
    busy_s: tuple[float, ...]
    work_s: tuple[float, ...]
    end_s: tuple[float, ...]
    critical_rank: int


def _duration(stage: StageTimes, action: Action, split_weight: bool) -> float:
    if action.kind == "F":
        return stage.forward_s + stage.send_forward_s
    if action.kind == "W":
        return stage.backward_weight_s
    weight = 0.0 if split_weight else stage.backward_weight_s
    return stage.recompute_s + stage.backward_s + weight + stage.send_backward_s


def _dependency(action: Action, last: int) -> tuple[str, int, int] | None:
    k, j = action.stage, action.microbatch
    if action.kind == "F":
        return None if k == 0 else ("F", k - 1, j)
    if action.kind == "B":
        return ("F", k, j) if k == last else ("B", k + 1, j)
    return ("B", k, j)


def simulate_shared(stages: Sequence[StageTimes], *, schedule: str, pp: int, num_microbatches: int,
                    virtual_stages: int = 1, tails: Sequence[float] | None = None,
                    weights: Sequence[float] | None = None, rate: Callable[[float], float] = lambda k: 1.0,
                    tail_rate: Callable[[float], float] | None = None,
                    blocked: Sequence[float] | None = None) -> SharedRun:
    """Run every pipeline rank's actions and tail under processor sharing (module docstring);
    ``blocked``: per pipeline rank, the fraction of its action work that is blocked waiting."""
    lists = [rank_actions(schedule, pp=pp, rank=r, num_microbatches=num_microbatches,
                          virtual_stages=virtual_stages) for r in range(pp)]
    split, last = schedule == "zero_bubble", len(stages) - 1
    tails = list(tails) if tails is not None else [0.0] * pp
    weights = list(weights) if weights is not None else [1.0] * pp
    blocked = list(blocked) if blocked is not None else [0.0] * pp
    all_busy = rate(sum(weights))
    work = [[_duration(stages[a.stage], a, split) for a in actions] + [tails[r]]
            for r, actions in enumerate(lists)]
    done: set[tuple[str, int, int]] = set()
    position, remaining = [0] * pp, [None] * pp  # type: list[int], list[float | None]
    busy, end = [0.0] * pp, [0.0] * pp
    now = 0.0
    while True:
        for r in range(pp):  # start every action whose input is ready
            while remaining[r] is None and position[r] < len(work[r]):
                if position[r] < len(lists[r]):
                    needed = _dependency(lists[r][position[r]], last)
                    if needed is not None and needed not in done:
                        break
                remaining[r] = work[r][position[r]]
                if remaining[r] <= _EPS:
                    _finish(r, lists, position, remaining, done)
        running = [r for r in range(pp) if remaining[r] is not None]
        if not running:
            break
        speed = _speeds(running, [position[r] == len(lists[r]) for r in range(pp)], weights, blocked,
                        rate=rate, tail_rate=tail_rate or rate, all_busy=all_busy)
        step = min(remaining[r] / speed[r] for r in running)  # type: ignore[operator]
        now += step
        for r in running:
            remaining[r] -= step * speed[r]  # type: ignore[operator]
            busy[r] += step
            if remaining[r] <= _EPS:  # type: ignore[operator]
                _finish(r, lists, position, remaining, done)
                end[r] = now
    stuck = [lists[r][position[r]] for r in range(pp) if position[r] < len(lists[r])]
    assert not stuck, f"schedule {schedule} deadlocks at {stuck}"
    solo = tuple(sum(w) for w in work)
    critical = max(range(pp), key=lambda r: (end[r], solo[r]))
    return SharedRun(total_s=now, busy_s=tuple(busy), work_s=solo, end_s=tuple(end), critical_rank=critical)


def _speeds(running: list[int], in_tail: list[bool], weights: list[float], blocked: list[float], *,
            rate: Callable[[float], float], tail_rate: Callable[[float], float], all_busy: float
            ) -> dict[int, float]:
    """Work per second of each running pipeline rank: the fixed point of the processes computing
    on average and their rate (module docstring: blocked waits)."""
    beta = {r: 0.0 if in_tail[r] else blocked[r] for r in running}

    def computing(rho: float) -> float:  # processes computing on average at rate rho
        return sum(weights[r] * (1 - beta[r]) / rho / ((1 - beta[r]) / rho + beta[r] / all_busy)
                   for r in running)

    rho = rate(sum(weights[r] for r in running))
    if any(beta.values()):
        for _ in range(50):  # monotone from below: rate(k(rho)) grows with rho
            rho, previous = rate(computing(rho)), rho
            if abs(rho - previous) < 1e-9:
                break
    k = computing(rho)
    return {r: tail_rate(k) if in_tail[r] else 1.0 / ((1 - beta[r]) / rho + beta[r] / all_busy)
            for r in running}


def _finish(r: int, lists: list[list[Action]], position: list[int], remaining: list[float | None],
            done: set[tuple[str, int, int]]) -> None:
    if position[r] < len(lists[r]):
        action = lists[r][position[r]]
        done.add((action.kind, action.stage, action.microbatch))
    position[r] += 1
    remaining[r] = None
