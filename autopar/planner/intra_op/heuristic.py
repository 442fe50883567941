"""A fallback for the intra-op ILP when the solver finds no assignment within its time limit.

Data flow: ``ilp.solve_sharding_ilp`` calls :func:`local_search` with the folded
unary costs and coupled edges only when OR-Tools returns no incumbent; the answer is reported
as ``FEASIBLE`` with the gap to :func:`lower_bound`, so a time limit never turns into a
failure while some assignment fits. Starts: every group's cheapest strategy, and every
group's smallest (which fits whenever anything does: the memory row is the only coupling
constraint); each is improved by coordinate descent (iterated conditional modes: re-pick one
group's strategy given its neighbours', keeping the memory row) until no move helps.
"""

from __future__ import annotations

from collections.abc import Sequence

from autopar.planner.intra_op.problem import EdgeCost

MAX_SWEEPS = 20


def lower_bound(unary: Sequence[Sequence[float]], edges: Sequence[EdgeCost]) -> float:
    """Each group's and each edge's own minimum: a bound on any assignment's folded cost."""
    return sum(min(row) for row in unary) + sum(min(min(row) for row in e.cost_s) for e in edges)


def folded_cost(unary: Sequence[Sequence[float]], edges: Sequence[EdgeCost], choice: Sequence[int]) -> float:
    return sum(unary[g][i] for g, i in enumerate(choice)) + sum(e.cost_s[choice[e.u]][choice[e.v]]
                                                                  for e in edges)


def local_search(unary: Sequence[Sequence[float]], edges: Sequence[EdgeCost],
                 memory: Sequence[Sequence[float]], budget: float | None) -> tuple[int, ...] | None:
    """The best assignment found from the two starts, or None when even the smallest does not fit."""
    incident: list[list[EdgeCost]] = [[] for _ in unary]
    for edge in edges:
        incident[edge.u].append(edge)
        incident[edge.v].append(edge)
    starts = [[min(range(len(row)), key=row.__getitem__) for row in unary],
              [min(range(len(row)), key=row.__getitem__) for row in memory]]
    found = [_descend(start, unary, incident, memory, budget) for start in starts]
    fitting = [c for c in found if c is not None]
    return min(fitting, key=lambda c: folded_cost(unary, edges, c)) if fitting else None


def _descend(choice: list[int], unary: Sequence[Sequence[float]], incident: list[list[EdgeCost]],
             memory: Sequence[Sequence[float]], budget: float | None) -> tuple[int, ...] | None:
    used = sum(memory[g][i] for g, i in enumerate(choice))
    if budget is not None and used > budget:
        return None

    def local(g: int, i: int) -> float:
        return unary[g][i] + sum(e.cost_s[i][choice[e.v]] if e.u == g else e.cost_s[choice[e.u]][i]
                                 for e in incident[g])

    for _ in range(MAX_SWEEPS):
        moved = False
        for g, row in enumerate(unary):
            current = choice[g]
            for i in range(len(row)):
                extra = memory[g][i] - memory[g][current]
                if i != current and (budget is None or used + extra <= budget) and \
                        local(g, i) < local(g, current) - 1e-15:
                    choice[g], used, current, moved = i, used + extra, i, True
        if not moved:
            break
    return tuple(choice)
