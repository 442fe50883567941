"""The outer search: degrees × schedule × microbatching × ZeRO, pruned by lower bounds.

Data flow: ``autopar.plan`` → :func:`search` (a ``ModelProfile``, a :class:`PlanContext`,
the pins) → for each :class:`~autopar.planner.space.Config` (degrees including the expert-parallel
``ep`` of MoE models) in order of its lower bound:
``inter_op.solve_split`` (stage split and per-stage recomputation; interleaved schedules use
equal chunks) → ``layout.build_plan`` → ``cost_models.estimate_plan`` (the exact prediction,
peak memory checked against the device) → the fastest Plan plus the runner-ups as
``Plan.alternatives``. Policy only: nothing is applied. The probes and every estimate use the
caller's ``options``, so ``plan.predicted`` is what ``cost_models.estimate`` gives the same Plan,
profiles and options (``autopar.estimate`` calls it the same way): with every choice pinned, a
captured model is priced as its Plan built without a search (``tests/planner/test_pricing_path.py``).

Pruning. A Config's lower bound is its layers' cheapest work per microbatch spread perfectly
over the pipeline, times the schedule's minimum number of such slots (``pipeline_lower_bound_s``,
valid because fixed parts, recomputation, communication outside the pipeline and imbalance only
add time). Configs are visited in increasing bound; the search stops at the first bound that
is not below the best step time found, so its answer is the optimum over the space (up to the
split solver's own cap, reported) unless the time limit cut it short (also reported). With MoE
layers the search goes on a little for every other expert-parallel degree (``_ep_contrasts``),
only for the alternatives.
Ties break on the Config's field order, so the same inputs give byte-identical Plans.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from autopar.config import Fix
from autopar.cost_models import CostOptions, ModelProfile
from autopar.cost_models.estimate import estimate_plan
from autopar.planner.bounds import states_fit, step_lower_bound_s
from autopar.planner.build_plan import PlanContext, build_plan, even_split
from autopar.planner.explain import (
    Infeasible,
    InfeasiblePlanError,
    alternative_reason,
    explain_empty,
    infeasible_error,
    memory_shortfall,
    unsharded_message,
)
from autopar.planner.inter_op import solve_split
from autopar.planner.probes import RECOMPUTE_MODES, Prober, StageModel
from autopar.planner.space import Config, candidates, check_ep_pin, check_sequence_pins
from autopar.plans import Alternative, Plan, Schedule

NUM_ALTERNATIVES = 5
NUM_RANKED = 16
EP_CONTRAST_TRIES = 8
Progress = Callable[[int, int, float | None], None]
"""``progress(done, total, best_step_time_s)`` after each Config is evaluated."""


@dataclass(frozen=True, kw_only=True)
class Evaluated:
    """A feasible Config and the Plan it priced to."""

    config: Config
    plan: Plan

    @property
    def step_time_s(self) -> float:
        assert self.plan.predicted.step_time_s is not None
        return self.plan.predicted.step_time_s


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """The chosen Plan and how the search went (for ``explain`` and the benchmarks)."""

    plan: Plan
    configs_total: int
    configs_evaluated: int
    configs_pruned: int
    configs_infeasible: int
    exact: bool
    timed_out: bool
    elapsed_s: float
    probes: int
    ranked: tuple[Plan, ...] = ()
    """The best Plan of each evaluated configuration, fastest first (at most :data:`NUM_RANKED`),
    for benchmarks that run the candidates and for ``explain``."""


def _modes(fix: Fix, config: Config) -> tuple[str, ...]:
    """Recomputation modes to consider. The runtime's zero-bubble schedule re-runs a recomputed
    stage's forward for both of its backward halves (measured ~2x slower on CPU, and not yet
    exact with random-LTD), so unpinned zero-bubble plans do not recompute."""
    if fix.recompute:
        return (fix.recompute,)
    return ("none",) if config.schedule == "zero_bubble" else RECOMPUTE_MODES


class _Search:
    def __init__(self, profile: ModelProfile, ctx: PlanContext, fix: Fix, options: CostOptions,
                 memory_profile: ModelProfile | None) -> None:
        self.profile, self.ctx, self.fix, self.options = profile, ctx, fix, options
        self.memory_profile = memory_profile or profile
        self.prober = Prober(profile, ctx, options, memory_profile)
        self.infeasible: list[Infeasible] = []
        self.unsharded: list[Config] = []
        self.exact = True

    def evaluate(self, config: Config) -> Evaluated | None:
        """The best Plan for ``config``, estimated, or None (recorded) when nothing fits."""
        if config.tp > 1 and self.ctx.shardings(config) == ():
            self.unsharded.append(config)  # the intra-op solver found tensor parallelism not worth it
            return None
        if config.virtual_stages > 1:
            return self._interleaved(config)
        model = self.prober.stage_model(config, _modes(self.fix, config))
        split = solve_split(
            model, num_stages=config.pp, num_microbatches=config.num_microbatches, schedule=config.schedule
        )
        if split is None:
            self.infeasible.append(self._shortfall(config, model))
            return None
        self.exact &= split.exact
        found = self._checked(config, build_plan(self.ctx, config, split.layers, split.recompute))
        if split.tie is not None:
            tie = self._checked(config, build_plan(self.ctx, config, split.tie.layers, split.tie.recompute))
            if found is None or (tie is not None and tie.step_time_s <= found.step_time_s):
                found = tie
        return found

    def _interleaved(self, config: Config) -> Evaluated | None:
        chunks = even_split(self.profile.num_layers, config.pp * config.virtual_stages)
        for mode in _modes(self.fix, config):  # uniform recomputation, lightest first
            found = self._checked(config, build_plan(self.ctx, config, chunks, [mode] * len(chunks)))
            if found is not None:
                return found
        model = self.prober.stage_model(
            dataclasses.replace(config, schedule="1f1b", virtual_stages=1), _modes(self.fix, config)
        )
        self.infeasible.append(self._shortfall(config, model))
        return None

    def explain_too_big(self, configs: list[Config]) -> None:
        """Break down the memory of the few Configs that came closest to fitting."""
        for config in sorted(configs, key=lambda c: (-c.tp * c.pp * (c.dp if c.zero else 1), c))[:4]:
            one = dataclasses.replace(config, schedule="1f1b" if config.pp > 1 else "gpipe", virtual_stages=1)
            model = self.prober.stage_model(one, _modes(self.fix, config))
            self.infeasible.append(self._shortfall(config, model))

    def _shortfall(self, config: Config, model: StageModel) -> Infeasible:
        return memory_shortfall(self.memory_profile, self.ctx, config, model)

    def _checked(self, config: Config, plan: Plan) -> Evaluated | None:
        # memory at the worst point of a pass's schedule: what autopar.estimate prices (lower.predict)
        plan = estimate_plan(plan, self.profile, options=self.options, memory_profile=self.memory_profile)
        peak, capacity = max(plan.predicted.peak_memory_bytes or (0,)), self.ctx.cluster.device.memory_bytes
        if peak > capacity:
            return None
        return Evaluated(config=config, plan=plan)


def search(
    profile: ModelProfile,
    ctx: PlanContext,
    *,
    fix: Fix | None = None,
    options: CostOptions | None = None,
    time_limit_s: float = 60.0,
    progress: Progress | None = None,
    memory_profile: ModelProfile | None = None,
) -> SearchResult:
    """The fastest Plan within device memory over the search space (module docstring)."""
    fix, options = fix or Fix(), options or CostOptions()
    if not (isinstance(time_limit_s, (int, float)) and time_limit_s > 0):
        raise ValueError(f"time_limit_s = {time_limit_s!r}: expected seconds > 0")
    start = time.perf_counter()
    check_ep_pin(profile, fix)
    check_sequence_pins(profile, fix)
    if fix.schedule == "zero_bubble" and fix.zero is not None and fix.zero >= 3 and (fix.dp or 2) > 1:
        raise ValueError(f"pinned schedule='zero_bubble' with zero={fix.zero}: the runtime cannot run zero "
                         "bubble over FSDP2's ZeRO-3 across data-parallel ranks yet (its weights are "
                         "resharded and reduced before the deferred weight-gradient step); pin zero=0 or 1, "
                         "another schedule, or dp=1")
    space_fix = fix  # the training code's sequence parallelism (CostOptions) binds like a pin
    if fix.sequence_parallel is None and options.sequence_parallel is not None:
        space_fix = dataclasses.replace(fix, sequence_parallel=options.sequence_parallel)
    configs = list(candidates(profile, ctx.cluster, global_batch_size=ctx.global_batch_size, fix=space_fix))
    if not configs:
        raise ValueError(
            "no configuration to search: "
            + explain_empty(profile, ctx.cluster, global_batch_size=ctx.global_batch_size, fix=fix)
        )
    state = _Search(profile, ctx, fix, options, memory_profile)
    fits = [states_fit(profile, ctx, c) for c in configs]
    fitting = [c for c, ok in zip(configs, fits, strict=True) if ok]
    too_big = [c for c, ok in zip(configs, fits, strict=True) if not ok]
    bounded = sorted((step_lower_bound_s(state.prober, c, _modes(fix, c), options), c) for c in fitting)
    too_big += [c for bound, c in bounded if bound == float("inf")]
    bounded = [(bound, c) for bound, c in bounded if bound < float("inf")]
    results: list[Evaluated] = []
    best: Evaluated | None = None
    evaluated = timed_out = 0
    visited: set[Config] = set()
    for bound, config in bounded:
        if best is not None and bound >= best.step_time_s:
            break
        if time.perf_counter() - start > time_limit_s and best is not None:
            timed_out = True
            break
        evaluated += 1
        visited.add(config)
        found = state.evaluate(config)
        if found is not None:
            results.append(found)
            if best is None or (found.step_time_s, found.config) < (best.step_time_s, best.config):
                best = found
        if progress is not None:
            progress(evaluated, len(configs), None if best is None else best.step_time_s)
    if best is not None and not timed_out:
        contrasts, tried = _ep_contrasts(state, bounded, results, visited, best.config.ep)
        sp = _sp_contrast(state, best.config, space_fix)
        evaluated += tried + len(sp)
        for found in contrasts + sp:
            results.append(found)
            if (found.step_time_s, found.config) < (best.step_time_s, best.config):
                best = found
    if best is None and state.unsharded and not state.infeasible and not too_big:
        tps = sorted({c.tp for c in state.unsharded})
        raise InfeasiblePlanError(unsharded_message(profile, ctx.cluster, fix=fix, tps=tps,
                                                    global_batch_size=ctx.global_batch_size))
    if best is None:
        state.explain_too_big(too_big)
        raise infeasible_error(state.infeasible, ctx.cluster, fix)
    plan = dataclasses.replace(best.plan, alternatives=_alternatives(best, results, state.infeasible))
    return SearchResult(
        plan=plan,
        configs_total=len(configs),
        configs_evaluated=evaluated,
        configs_pruned=len(configs) - evaluated,
        configs_infeasible=len(state.infeasible) + len(too_big),
        exact=state.exact and not timed_out,
        timed_out=bool(timed_out),
        elapsed_s=time.perf_counter() - start,
        probes=state.prober.probes,
        ranked=tuple(r.plan for r in sorted(results, key=lambda r: (r.step_time_s, r.config))[:NUM_RANKED]),
    )


def _ep_contrasts(state: _Search, bounded: list[tuple[float, Config]], results: list[Evaluated],
                  visited: set[Config], chosen_ep: int) -> tuple[list[Evaluated], int]:
    """With MoE layers, the alternatives should say what replicating or sharding the experts more
    would cost: for every other expert-parallel degree, continue the pruned search among its
    Configs alone (in increasing bound, until the bound reaches that degree's best, at most
    :data:`EP_CONTRAST_TRIES` evaluations each). Every bound here is at least the chosen plan's
    step time, so this never changes the answer. Returns the fitting results and the count tried."""
    best = {}
    for r in results:
        best[r.config.ep] = min(best.get(r.config.ep, float("inf")), r.step_time_s)
    tries: dict[int, int] = {}
    found = []
    for bound, config in bounded:
        ep = config.ep
        if ep == chosen_ep or config in visited or tries.get(ep, 0) >= EP_CONTRAST_TRIES:
            continue
        if bound >= best.get(ep, float("inf")):
            continue
        tries[ep] = tries.get(ep, 0) + 1
        result = state.evaluate(config)
        if result is not None:
            best[ep] = min(best.get(ep, float("inf")), result.step_time_s)
            found.append(result)
    return found, sum(tries.values())


def _sp_contrast(state: _Search, chosen: Config, fix: Fix) -> list[Evaluated]:
    """The chosen Config with sequence parallelism switched the other way, for the alternatives:
    the space offers only sequence parallelism where tp > 1 (it moves the same bytes as the
    all-reduces it replaces and divides the norm/dropout work and activations by t, so in the cost
    model it is never slower nor larger), so without this the Plan could not say what it saves.
    Nothing when pinned or tp is 1."""
    if chosen.tp == 1 or fix.sequence_parallel is not None:
        return []
    found = state.evaluate(dataclasses.replace(chosen, sequence_parallel=not chosen.sequence_parallel))
    return [] if found is None else [found]


def _alternatives(
    best: Evaluated, results: list[Evaluated], infeasible: list[Infeasible]
) -> tuple[Alternative, ...]:
    """The fastest other degrees (dp, tp, pp, ep) first, then other schedules of the chosen
    degrees, then (if room is left) the closest configurations that did not fit."""
    others = sorted((r for r in results if r.config != best.config), key=lambda r: (r.step_time_s, r.config))
    seen, chosen = {best.config.degrees}, []
    for pool in ([r for r in others if r.config.degrees not in seen], others):
        for r in pool:
            if len(chosen) == NUM_ALTERNATIVES:
                break
            if r in chosen or (pool is not others and r.config.degrees in seen):
                continue
            seen.add(r.config.degrees)
            chosen.append(r)
    out = [
        Alternative(
            parallelism=r.plan.parallelism,
            schedule=r.plan.schedule,
            predicted_step_time_s=r.step_time_s,
            reason=alternative_reason(best.plan, r.plan, r.config.describe()),
        )
        for r in chosen
    ]
    for item in sorted(infeasible, key=lambda x: x.excess_bytes)[: max(0, NUM_ALTERNATIVES - len(out))]:
        out.append(
            Alternative(
                parallelism=item.parallelism,
                schedule=Schedule(
                    name=item.config.schedule,
                    microbatch_size=item.config.microbatch_size,  # type: ignore[arg-type]
                    num_microbatches=item.config.num_microbatches,
                    virtual_stages=item.config.virtual_stages,
                ),
                predicted_step_time_s=None,
                reason=f"{item.config.describe()}: does not fit — {item.message}",
            )
        )
    return tuple(out)
