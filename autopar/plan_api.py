"""The public planning entry points, ``autopar.plan``, ``plan_search`` and ``autopar.estimate``: from
a model to a Plan with predictions (``autopar.planner`` holds the search, ``autopar.plans`` the Plan
record).

Data flow: model + example inputs → ``autopar.lower`` (capture, graph passes such as random-LTD,
whose kept fractions scale the time profile, or MoE, whose annotations the profile reads and which
makes the search try expert parallelism, and the profiles: a ``Program``) → :func:`search_program`
→ ``autopar.planner.search`` (pinned choices kept, the rest searched) → the fastest Plan
that fits, ``plan.predicted`` filled by ``cost_models.estimate`` and the runner-ups in
``plan.alternatives``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypedDict, Unpack

from torch import fx, nn

from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import CostOptions, ModelProfile
from autopar.cost_models import estimate as estimate_predicted
from autopar.lower import Program, lower, predict
from autopar.passes import GraphPass, check_passes
from autopar.planner.build_plan import PlanContext
from autopar.planner.intra_op import solve_intra_op
from autopar.planner.search import Progress, SearchResult, search
from autopar.planner.space import Config
from autopar.plans import Plan, Predicted


class SearchOptions(TypedDict, total=False):
    """The optional keyword arguments of :func:`plan`, as :func:`plan_search` takes and documents them."""

    fix: dict[str, Any] | Fix | None
    example_kwargs: dict[str, Any] | None
    options: CostOptions | None
    passes: Sequence[GraphPass]
    time_limit_s: float
    progress: Progress | None


def plan(model: nn.Module, example_inputs: Any, *, cluster: str | ClusterSpec, global_batch_size: int,
         **search_options: Unpack[SearchOptions]) -> Plan:
    """The fastest Plan for ``model`` on ``cluster`` at ``global_batch_size`` that fits in memory.

    ``example_inputs`` is one example batch (any batch size; build the model on ``meta``
    for large models). Pinned choices (``fix=``) are kept; the planner searches the rest
    (``autopar.planner``). ``passes`` run on the captured graph first and the search sees
    their effect (random-LTD makes its layers cheaper). Raises ``InfeasiblePlanError`` (a
    ValueError) naming the binding memory constraint when nothing fits. The other options
    (``example_kwargs``, cost ``options``, ``time_limit_s``, ``progress``) are :func:`plan_search`'s.
    """
    return plan_search(model, example_inputs, cluster=cluster, global_batch_size=global_batch_size,
                       **search_options).plan


def plan_search(
    model: nn.Module,
    example_inputs: Any,
    *,
    cluster: str | ClusterSpec,
    global_batch_size: int,
    fix: dict[str, Any] | Fix | None = None,
    example_kwargs: dict[str, Any] | None = None,
    options: CostOptions | None = None,
    passes: Sequence[GraphPass] = (),
    time_limit_s: float = 60.0,
    progress: Progress | None = None,
) -> SearchResult:
    """:func:`plan` with the search's statistics (configurations pruned, time, exactness)."""
    program = lower(model, example_inputs, example_kwargs=example_kwargs, passes=passes, cluster=cluster)
    result = search_program(program, cluster=cluster, global_batch_size=global_batch_size, fix=fix,
                            options=options, time_limit_s=time_limit_s, progress=progress)
    chosen = result.plan
    micro = chosen.schedule.microbatch_size
    if micro != program.batch_size:  # the graph the runtime captures: the plan's microbatch
        runtime = lower(model, example_inputs, example_kwargs=example_kwargs, passes=passes, cluster=cluster,
                        microbatch_size=micro)
        chosen = dataclasses.replace(chosen, graph_fingerprint=runtime.fingerprint)
    return dataclasses.replace(result, plan=chosen)


def search_program(
    program: Program,
    *,
    cluster: str | ClusterSpec,
    global_batch_size: int,
    fix: dict[str, Any] | Fix | None = None,
    options: CostOptions | None = None,
    time_limit_s: float = 60.0,
    progress: Progress | None = None,
) -> SearchResult:
    """Search a Plan for a lowered model. The plan carries ``program``'s fingerprint, that of the
    example batch; a runtime that runs another microbatch size checks its own capture instead."""
    spec = cluster if isinstance(cluster, ClusterSpec) else ClusterSpec.parse(cluster)
    pins = Fix.from_dict(fix)
    if type(global_batch_size) is not int or global_batch_size < 1:
        raise ValueError(f"global_batch_size = {global_batch_size!r} is invalid: expected an int >= 1")
    if pins.world_size() > spec.num_devices or spec.num_devices % pins.world_size() or (
            pins.dp is not None and pins.world_size() != spec.num_devices):
        raise ValueError(f"pinned degrees {pins.pinned()} give dp × tp × pp = {pins.world_size()} ≠ world "
                         f"size {spec.num_devices}; pin degrees whose product is the cluster's device count")
    gm = program.graph_module
    context = PlanContext(model=program.captured.model_name, graph_fingerprint=program.fingerprint,
                          cluster=spec, global_batch_size=global_batch_size, seq_len=program.seq_len,
                          num_layers=len(program.captured.layers),
                          shardings=_shardings(gm, spec, program.profile.dtype, program.example_tokens))
    result = search(program.profile, context, fix=pins, options=options, time_limit_s=time_limit_s,
                    progress=progress, memory_profile=program.memory_profile)
    return dataclasses.replace(result, plan=dataclasses.replace(result.plan, passes=program.applied))


def _shardings(gm: fx.GraphModule, cluster: ClusterSpec, dtype: str, example_tokens: int) -> Any:
    """The intra-op solver's strategies (``autopar.planner.intra_op``, Alpa's ILP) for each
    (tp, microbatch) the search tries. With pipelining only the repeated layers' strategies are
    kept: the runtime cannot split a vocabulary (embedding, or an LM head tied to it) whose two
    halves sit on different stages."""
    cache: dict[tuple[int, bool, int], tuple[Any, ...]] = {}
    in_layers = {node.name for node in gm.graph.nodes
                 if getattr(node.meta.get("autopar"), "layer", None) is not None}

    def shardings(config: Config) -> tuple[Any, ...]:
        key = (config.tp, config.pp == 1, config.microbatch_size)
        if key not in cache:
            tokens = config.microbatch_size * max(1, example_tokens // max(1, _example_batch(gm)))
            solved = solve_intra_op(gm, tp=config.tp, cluster=cluster, dtype=dtype,
                                    microbatch_scale=tokens / max(1, example_tokens))
            cache[key] = tuple(s for s in solved.shardings if config.pp == 1 or s.node in in_layers)
        return cache[key]

    return shardings


def _example_batch(gm: fx.GraphModule) -> int:
    """The batch size of the graph's first tensor input (what it was captured with)."""
    for node in gm.graph.nodes:
        record = node.meta.get("autopar")
        if node.op == "placeholder" and record is not None and record.shapes and record.shapes[0]:
            return int(record.shapes[0][0])
    return 1


def plan_passes(plan: Plan) -> list[GraphPass]:
    """The graph passes ``plan.passes`` records (``AppliedPass`` name and config), rebuilt as the
    pass objects that made them, in order."""
    from autopar.runtime.pass_state import PASS_TYPES  # the name → config class table of pass JSON

    passes = []
    for applied in plan.passes:
        cls = PASS_TYPES.get(applied.name)
        if cls is None:
            raise ValueError(f"the plan records pass {applied.name!r}, which autopar cannot rebuild (known "
                             f"passes: {sorted(PASS_TYPES)}); pass passes=[...] to estimate explicitly")
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in applied.config_dict().items()}
        passes.append(cls(**config))
    return check_passes(passes)


def estimate(plan: Plan, model: nn.Module | ModelProfile | Program, example_inputs: Any = None, *,
             options: CostOptions | None = None, passes: Sequence[GraphPass] | None = None,
             example_kwargs: dict[str, Any] | None = None) -> Predicted:
    """Recompute a Plan's predictions for a model: a module with example inputs, a lowered
    ``Program``, or a ``ModelProfile``.

    A module is lowered (:func:`autopar.lower.lower`) with ``passes``, by default the passes the
    plan records (``plan.passes``, :func:`plan_passes`), as :func:`plan` did: an MoE plan is
    re-estimated with its MoE layers, a random-LTD plan with its kept fractions (time at the
    schedule's average, peak memory at full length). A Program is priced as it is; a profile
    prices time and memory alike. Every path ends in :func:`autopar.lower.predict`."""
    if isinstance(model, ModelProfile):
        return estimate_predicted(plan, model, options=options)
    if isinstance(model, nn.Module):
        if example_inputs is None:
            raise ValueError("estimate(plan, model) needs example_inputs to capture the model")
        chosen = plan_passes(plan) if passes is None else check_passes(passes)
        model = lower(model, example_inputs, example_kwargs=example_kwargs, passes=chosen,
                      cluster=plan.cluster_spec())
    if not isinstance(model, Program):
        raise TypeError("estimate needs an nn.Module (with example_inputs), an autopar.lower.Program or a "
                        f"ModelProfile, got {type(model).__name__}")
    return predict(plan, model, options=options)
