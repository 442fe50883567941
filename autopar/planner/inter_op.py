"""Inter-operator planning: the contiguous stage split and each stage's recomputation.

Data flow: a :class:`~autopar.planner.probes.StageModel` for one Config → :func:`solve_split`
→ layer ranges and recomputation modes per stage (a :class:`Split`), which ``search`` turns
into a Plan and estimates exactly.

The problem. Stage ``k`` (pipeline position ``k``) on layers ``[i, j)`` costs
``W_k(i, j) = fixed_k + Σ_{l∈[i,j)} w_r(l)`` seconds per microbatch and needs
``(1 + f)(fixed_bytes_k + Σ states + in_flight_k · Σ stored_r + max working_r) + workspace``
bytes, where ``r`` is its recomputation mode. For GPipe and 1F1B the pipeline time is Alpa's
``Σ_k W_k + (m − 1) max_k W_k`` (``cost_models.schedule``); for zero-bubble (ZB-H1)
``m max_k W_k + Σ_k U_k − max_k U_k`` with ``U_k = W_k − 2 T_W,k``.

The algorithm (exact for GPipe/1F1B). Recomputation only trades time for memory — each mode
is slower and smaller than the one before — so the best mode of a stage is the first that
fits; that makes ``W_k(i, j)`` a table. For a bound ``t`` on the slowest stage, a dynamic
program over (stage, layers covered) finds the split minimizing ``Σ_k W_k`` (``Σ U_k`` for
zero-bubble) with every ``W_k ≤ t``. Alpa (OSDI'22, §5.2) enumerates ``t`` over every distinct stage
time. We visit only the Pareto points: start unbounded, and after each solution (sum ``S``,
slowest stage ``M``) continue with the largest stage time below ``M`` — every bound in
``[M, t]`` has the same optimum. ``S`` only grows as the bound falls, so once
``(m − 1) t* + S`` (``t*`` a lower bound on any split's slowest stage: ``Σ_min / p`` and each
position's cheapest range) cannot beat the best, no smaller bound can. The walk is capped
at :data:`MAX_BOUNDS` points; the result says whether the cap was hit (then it is a bound,
not a proof). Written here because no maintained library solves this dynamic program.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autopar.planner.probes import StageModel

MAX_BOUNDS = 256


@dataclass(frozen=True, kw_only=True)
class Split:
    """A solved split: ``layers[k]`` and ``recompute[k]`` per stage, its pipeline seconds
    by the formula above, and whether the search over bounds was exhaustive."""

    layers: tuple[tuple[int, int], ...]
    recompute: tuple[str, ...]
    pipeline_s: float
    exact: bool
    bounds_tried: int
    tie: Split | None = None
    """An equally fast (by the formula) but more even split, when one exists: the caller
    compares both with the full estimate, which also sees the optimizer and data-parallel
    terms that depend on each rank's parameters."""


@dataclass(frozen=True, kw_only=True)
class Tables:
    """``work[k, i, j]`` (inf where infeasible or empty), its zero-bubble drain part
    ``drain[k, i, j]`` and the chosen ``mode[k, i, j]`` index."""

    work: np.ndarray
    drain: np.ndarray
    mode: np.ndarray
    memory: np.ndarray


def _prefix(values: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros(values.shape[:-1] + (1,)), np.cumsum(values, axis=-1)], axis=-1)


def _range_max(values: np.ndarray) -> np.ndarray:
    """``out[i, j] = max(values[i:j])`` (0 for empty ranges)."""
    n = values.shape[0]
    out = np.zeros((n + 1, n + 1))
    for i in range(n):
        out[i, i + 1 :] = np.maximum.accumulate(values[i:])
    return out


def build_tables(model: StageModel, num_stages: int) -> Tables:
    """Per position, per range: the first recomputation mode that fits, its work and memory."""
    num_layers = model.state_bytes.shape[0]
    size = num_layers + 1
    span = lambda prefix: prefix[None, :] - prefix[:, None]  # noqa: E731 - [i, j] = p[j] - p[i]
    states = span(_prefix(model.state_bytes))
    work = np.full((num_stages, size, size), np.inf)
    drain = np.full((num_stages, size, size), np.inf)
    mode = np.full((num_stages, size, size), -1, dtype=np.int64)
    memory = np.full((num_stages, size, size), np.inf)
    valid = np.triu(np.ones((size, size), dtype=bool), k=1)
    for r in reversed(range(len(model.modes))):  # later (cheaper-in-time) modes overwrite
        w, wg = span(_prefix(model.work_s[r])), span(_prefix(model.weight_grad_s[r]))
        stored, working = span(_prefix(model.stored_bytes[r])), _range_max(model.working_bytes[r])
        for k in range(num_stages):
            need = (1 + model.fragmentation) * (
                model.fixed_bytes[k] + states + model.in_flight[k] * stored + working
            ) + model.workspace_bytes
            fits = valid & (need <= model.capacity_bytes)
            total = model.fixed_work_s[k] + w
            work[k] = np.where(fits, total, work[k])
            drain[k] = np.where(fits, total - 2 * (model.fixed_weight_grad_s[k] + wg), drain[k])
            mode[k] = np.where(fits, r, mode[k])
            memory[k] = np.where(valid, np.minimum(memory[k], need), memory[k])
    return Tables(work=work, drain=drain, mode=mode, memory=memory)


def _dp(cost: np.ndarray, work: np.ndarray, bound: float, num_layers: int) -> tuple[float, list[int]] | None:
    """Min Σ cost over splits with every stage's work ≤ bound; the boundaries, or None."""
    num_stages = cost.shape[0]
    best = np.full(num_layers + 1, np.inf)
    best[0] = 0.0
    choices = []
    for k in range(num_stages):
        step = np.where(work[k] <= bound, cost[k], np.inf)
        total = best[:, None] + step
        arg = np.argmin(total, axis=0)
        best = total[arg, np.arange(num_layers + 1)]
        choices.append(arg)
    if not np.isfinite(best[num_layers]):
        return None
    ends, j = [num_layers], num_layers
    for k in reversed(range(num_stages)):
        j = int(choices[k][j])
        ends.append(j)
    return float(best[num_layers]), ends[::-1]


def solve_split(model: StageModel, *, num_stages: int, num_microbatches: int, schedule: str) -> Split | None:
    """The optimal split for ``schedule`` (see the module docstring), or None if nothing fits."""
    tables = build_tables(model, num_stages)
    num_layers, m = model.state_bytes.shape[0], num_microbatches
    cost = tables.drain if schedule == "zero_bubble" else tables.work
    unbounded = _dp(cost, tables.work, np.inf, num_layers)
    if unbounded is None:
        return None
    bounds = np.unique(tables.work[np.isfinite(tables.work)])
    # a lower bound on any feasible split's slowest stage: its stages' work sums to at least
    # the unbounded optimum's (not for zero-bubble, whose DP sums the drain part), and each
    # position's cheapest range
    cheapest = max(float(np.min(tables.work[k])) for k in range(num_stages))
    smallest = max(cheapest, unbounded[0] / num_stages if schedule != "zero_bubble" else 0.0)
    lo = int(np.searchsorted(bounds, smallest))
    best: tuple[float, list[int]] | None = None
    tried, exact, bound = 0, True, np.inf
    while True:  # Pareto points (Σ, max), from the unbounded optimum down to the smallest max
        found = _dp(cost, tables.work, bound, num_layers)
        if found is None:
            break
        tried += 1
        value, top = _pipeline_s(tables, found[1], m, schedule)
        if best is None or value < best[0]:
            best = (value, found[1])
        floor = (m - 1) * smallest + found[0] if schedule != "zero_bubble" else m * smallest
        below = int(np.searchsorted(bounds, top)) - 1  # the next bound strictly below this max
        if floor >= best[0] or below < lo:
            break
        if tried == MAX_BOUNDS:
            exact = False
            break
        bound = bounds[below]
    assert best is not None  # the smallest feasible bound always yields a split
    even = _balanced(tables, cost, best, m, schedule, num_layers)

    def split(ends: list[int], tie: Split | None = None) -> Split:
        layers = tuple((ends[k], ends[k + 1]) for k in range(num_stages))
        modes = tuple(model.modes[int(tables.mode[k, i, j])] for k, (i, j) in enumerate(layers))
        return Split(layers=layers, recompute=modes, pipeline_s=best[0], exact=exact, bounds_tried=tried,
                     tie=tie)

    return split(best[1], tie=split(even) if even != best[1] else None)


def _balanced(tables: Tables, cost: np.ndarray, best: tuple[float, list[int]], m: int, schedule: str,
              num_layers: int) -> list[int]:
    """Among splits as fast as ``best``, the most even one: ties are common (any split whose
    stages stay under the slowest has the same Σ + (m−1)·max), so re-solve with a small
    ``W²`` term added, keeping the result only if it is no slower."""
    top = _pipeline_s(tables, best[1], m, schedule)[1]
    even = cost + 1e-6 * np.where(np.isfinite(tables.work), tables.work**2, 0.0) / max(top, 1e-30)
    found = _dp(even, tables.work, top, num_layers)
    if found is not None and _pipeline_s(tables, found[1], m, schedule)[0] <= best[0] * (1 + 1e-12):
        return found[1]
    return best[1]


def _pipeline_s(tables: Tables, ends: list[int], m: int, schedule: str) -> tuple[float, float]:
    """(pipeline seconds, slowest stage's work) of the split ending at ``ends``."""
    work = [float(tables.work[k, ends[k], ends[k + 1]]) for k in range(len(ends) - 1)]
    if schedule != "zero_bubble":
        return sum(work) + (m - 1) * max(work), max(work)
    drain = [max(0.0, float(tables.drain[k, ends[k], ends[k + 1]])) for k in range(len(ends) - 1)]
    return m * max(work) + sum(drain) - max(drain), max(work)


def min_memory_bytes(model: StageModel, num_stages: int) -> tuple[int, float]:
    """(position, bytes) of the stage that needs most memory in the split that needs least
    per stage — used to explain infeasibility (even split, most frugal mode)."""
    tables = build_tables(model, num_stages)
    num_layers = model.state_bytes.shape[0]
    base, extra = divmod(num_layers, num_stages)
    worst, start = (0, 0.0), 0
    for k in range(num_stages):
        end = start + base + (1 if k < extra else 0)
        need = float(tables.memory[k, start, end]) if end > start else 0.0
        worst = max(worst, (k, need), key=lambda item: item[1])
        start = end
    return worst
