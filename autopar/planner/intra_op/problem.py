"""The intra-op sharding problem as plain arrays, its pricing, and a brute-force reference.

Data flow: ``graph.build_problem`` fills a :class:`ShardingProblem` from an annotated
fx graph; ``ilp.solve_sharding_ilp`` solves it (Alpa's ILP: Zheng et al., OSDI 2022,
§4.2) and prices the answer with :func:`evaluate`; :func:`exhaustive_reference` is the
tests' brute force; :func:`explain_infeasible` names the binding constraint. No torch here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class EdgeCost:
    """Resharding seconds ``cost_s[i][j]`` when group ``u`` picks ``i`` and ``v`` picks ``j``."""

    u: int
    v: int
    cost_s: tuple[tuple[float, ...], ...]


@dataclass(frozen=True, kw_only=True)
class ShardingProblem:
    """Per group ``g`` and strategy ``i``: seconds of compute, of the strategy's own
    collectives and of unary resharding, and parameter bytes per device; plus edges and
    the constants of nodes without a choice."""

    names: tuple[str, ...]
    strategies: tuple[tuple[str, ...], ...]
    compute_s: tuple[tuple[float, ...], ...]
    communication_s: tuple[tuple[float, ...], ...]
    resharding_s: tuple[tuple[float, ...], ...]
    memory_bytes: tuple[tuple[float, ...], ...]
    edges: tuple[EdgeCost, ...] = ()
    constant_compute_s: float = 0.0
    constant_communication_s: float = 0.0
    constant_resharding_s: float = 0.0
    constant_memory_bytes: float = 0.0
    memory_budget_bytes: float | None = None

    def __post_init__(self) -> None:
        sizes = [len(s) for s in self.strategies]
        for name in ("compute_s", "communication_s", "resharding_s", "memory_bytes"):
            assert [len(row) for row in getattr(self, name)] == sizes, name
        assert len(self.names) == len(sizes) and all(sizes), "every group needs a strategy"
        for edge in self.edges:
            assert 0 <= edge.u < edge.v < len(sizes), (edge.u, edge.v)
            assert len(edge.cost_s) == sizes[edge.u] and all(len(r) == sizes[edge.v] for r in edge.cost_s)


@dataclass(frozen=True, kw_only=True)
class Breakdown:
    """Seconds by kind, and parameter bytes per device, of one assignment."""

    compute_s: float
    communication_s: float
    resharding_s: float
    memory_bytes: float

    @property
    def objective_s(self) -> float:
        return self.compute_s + self.communication_s + self.resharding_s


def evaluate(problem: ShardingProblem, choice: tuple[int, ...]) -> Breakdown:
    """The cost of ``choice`` (one strategy index per group), straight from the arrays."""
    p, c = problem, choice
    resharding = p.constant_resharding_s + sum(p.resharding_s[g][i] for g, i in enumerate(c))
    resharding += sum(e.cost_s[c[e.u]][c[e.v]] for e in p.edges)
    return Breakdown(
        compute_s=p.constant_compute_s + sum(p.compute_s[g][i] for g, i in enumerate(c)),
        communication_s=p.constant_communication_s + sum(p.communication_s[g][i] for g, i in enumerate(c)),
        resharding_s=resharding,
        memory_bytes=p.constant_memory_bytes + sum(p.memory_bytes[g][i] for g, i in enumerate(c)),
    )


def exhaustive_reference(problem: ShardingProblem) -> tuple[tuple[int, ...], Breakdown]:
    """Brute force over every combination (tests only; refuses more than 10⁶)."""
    sizes = [len(s) for s in problem.strategies]
    assert math.prod(sizes) <= 1_000_000, f"{math.prod(sizes)} combinations is too many to enumerate"
    budget = problem.memory_budget_bytes
    best: tuple[tuple[int, ...], Breakdown] | None = None
    for choice in itertools.product(*(range(n) for n in sizes)):
        cost = evaluate(problem, choice)
        if budget is not None and cost.memory_bytes > budget:
            continue
        if best is None or cost.objective_s < best[1].objective_s:
            best = (choice, cost)
    if best is None:
        raise ValueError(explain_infeasible(problem))
    return best


def _size(num_bytes: float) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= factor:
            return f"{num_bytes / factor:.2f} {unit} ({num_bytes:,.0f} B)"
    return f"{num_bytes:,.0f} B"


def explain_infeasible(problem: ShardingProblem) -> str:
    """Name the binding constraint. One-hot and edge rows are always satisfiable, so only
    ``memory`` can bind: show its smallest achievable left-hand side against the budget."""
    budget = problem.memory_budget_bytes
    floor = problem.constant_memory_bytes + sum(min(row) for row in problem.memory_bytes)
    if budget is None or floor <= budget:
        return "the sharding ILP reported infeasible, but no named constraint is violated at its minimum"
    constant = problem.constant_memory_bytes
    return (f"constraint memory[parameters per device] cannot hold: even with every shardable weight "
            f"split the parameters need {_size(floor)} per device (unshardable {_size(constant)} + "
            f"shardable {_size(floor - constant)}) > budget {_size(budget)}; "
            "raise the tensor-parallel degree, shard the optimizer over data parallelism "
            "(ZeRO/FSDP), add pipeline stages, or give more memory per device")
