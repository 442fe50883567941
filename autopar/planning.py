"""``autopar.plan`` and ``autopar.estimate``: from a model to a Plan with predictions.

Data flow: model + example inputs → ``autopar.capture`` → graph passes (``passes=``, e.g.
random-LTD, whose kept fractions scale the profile, or MoE, whose annotations the profile reads
and which makes the search try expert parallelism, ``cost_models.moe``) → ``ModelProfile`` →
``autopar.planner.search`` (pinned choices kept, the rest searched) → the fastest Plan
that fits, ``plan.predicted`` filled by ``cost_models.estimate`` and the runner-ups in
``plan.alternatives``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from autopar.capture import Captured, capture, normalize_inputs
from autopar.cluster import ClusterSpec
from autopar.config import Fix
from autopar.cost_models import CostOptions, ModelProfile
from autopar.cost_models import estimate as estimate_predicted
from autopar.cost_models.memory import peak_memory_bytes
from autopar.passes import GraphPass, PassContext, check_passes, run_passes
from autopar.passes.random_ltd import kept_fractions, ltd_profile
from autopar.planner.intra_op import solve_intra_op
from autopar.planner.layout import PlanContext
from autopar.planner.search import Progress, SearchResult, search
from autopar.planner.space import Config
from autopar.plans import AppliedPass, Plan, Predicted, graph_fingerprint


def _leading_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int | None]:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    if not tensors:
        raise ValueError("example inputs hold no tensor with a batch dimension")
    first = tensors[0]
    return int(first.shape[0]), (int(first.shape[1]) if first.dim() > 1 else None)


def _tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    batch, seq = _leading_dims(args, kwargs)
    return batch * (seq or 1)


def profile_of(captured: Captured, cluster: ClusterSpec | None = None) -> ModelProfile:
    """The cost model's summary of a capture (per-sequence FLOPs, shapes, parameters).

    The training dtype: on GPU clusters mixed-precision bf16 (the Megatron-LM setting every
    published figure uses, whatever dtype the model was built in); on local CPU processes, or
    without a cluster, the parameters' dtype (what the runtime computes in there).
    """
    batch, _ = _leading_dims(captured.example_args, captured.example_kwargs)
    gpu = cluster is not None and cluster.device.name != "CPU"
    return ModelProfile.from_captured(captured, batch_size=batch, name=captured.model_name,
                                      **({"dtype": "bf16"} if gpu else {}))


def plan(
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
) -> Plan:
    """The fastest Plan for ``model`` on ``cluster`` at ``global_batch_size`` that fits in memory.

    ``example_inputs`` is one example batch (any batch size; build the model on ``meta``
    for large models). Pinned choices (``fix=``) are kept; the planner searches the rest
    (``autopar.planner``). ``passes`` run on the captured graph first and the search sees
    their effect (random-LTD makes its layers cheaper). Raises ``InfeasiblePlanError`` (a
    ValueError) naming the binding memory constraint when nothing fits.
    """
    return plan_search(model, example_inputs, cluster=cluster, global_batch_size=global_batch_size,
                       fix=fix, example_kwargs=example_kwargs, options=options, passes=passes,
                       time_limit_s=time_limit_s, progress=progress).plan


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
    spec = cluster if isinstance(cluster, ClusterSpec) else ClusterSpec.parse(cluster)
    pins = Fix.from_dict(fix)
    if type(global_batch_size) is not int or global_batch_size < 1:
        raise ValueError(f"global_batch_size = {global_batch_size!r} is invalid: expected an int >= 1")
    if pins.world_size() > spec.num_devices or spec.num_devices % pins.world_size() or (
            pins.dp is not None and pins.world_size() != spec.num_devices):
        raise ValueError(f"pinned degrees {pins.pinned()} give dp × tp × pp = {pins.world_size()} ≠ world "
                         f"size {spec.num_devices}; pin degrees whose product is the cluster's device count")
    args, kwargs = normalize_inputs(example_inputs), dict(example_kwargs or {})
    captured = capture(model, args, example_kwargs=kwargs)
    gm, applied = captured.graph_module, []
    if passes:
        ctx = PassContext(captured=captured)
        gm = run_passes(gm, check_passes(passes), ctx)
        applied = [AppliedPass(name=name, config=_json_config(config)) for name, config, _ in ctx.applied]
    full = profile_of(captured, spec)
    kept = kept_fractions(gm)  # the schedule's average: time; memory must fit full length
    profile = ltd_profile(full, kept) if kept else full
    _, seq_len = _leading_dims(args, kwargs)
    fingerprint = graph_fingerprint(gm)  # of the transformed graph, which the runtime checks
    context = PlanContext(model=captured.model_name, graph_fingerprint=fingerprint,
                          cluster=spec, global_batch_size=global_batch_size, seq_len=seq_len,
                          num_layers=len(captured.layers),
                          shardings=_shardings(gm, spec, profile.dtype, _tokens(args, kwargs)))
    result = search(profile, context, fix=pins, options=options, time_limit_s=time_limit_s, progress=progress,
                    memory_profile=full)
    chosen = dataclasses.replace(result.plan, passes=tuple(applied))
    if chosen.schedule.microbatch_size != _leading_dims(args, kwargs)[0]:
        chosen = with_runtime_fingerprint(chosen, model, args, kwargs, passes)
    return dataclasses.replace(result, plan=chosen)


def with_runtime_fingerprint(plan: Plan, model: nn.Module, example_inputs: Any,
                             example_kwargs: dict[str, Any] | None = None,
                             passes: Sequence[GraphPass] = ()) -> Plan:
    """``plan`` with the fingerprint of the graph the runtime will capture: the model at the
    plan's microbatch size, after ``passes`` (``autopar.compile(..., plan=plan)`` checks it).
    The example batch is cut or repeated along its first dimension to that size."""
    args, kwargs = normalize_inputs(example_inputs), dict(example_kwargs or {})
    micro = plan.schedule.microbatch_size
    batch, _ = _leading_dims(args, kwargs)
    if batch != micro:
        args, kwargs = _resize_batch(args, batch, micro), _resize_batch(kwargs, batch, micro)
    captured = capture(model, args, example_kwargs=kwargs)
    gm = captured.graph_module
    if passes:
        gm = run_passes(gm, check_passes(passes), PassContext(captured=captured))
    return dataclasses.replace(plan, graph_fingerprint=graph_fingerprint(gm))


def _resize_batch(values: Any, batch: int, size: int) -> Any:
    """Rows ``0, 1, …, size − 1`` (mod ``batch``) of every tensor whose first dimension is ``batch``."""
    def resize(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            rows = torch.arange(size, device=value.device) % batch
            return value.index_select(0, rows)
        return value

    return tree_map(resize, values)


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


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
    """A pass's config with values a Plan can store (tuples for sequences, repr otherwise)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = tuple(value)
        ok = isinstance(value, (str, int, bool, float, type(None), tuple))
        out[key] = value if ok else repr(value)
    return out


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


def estimate(plan: Plan, model: nn.Module | ModelProfile | Captured, example_inputs: Any = None, *,
             options: CostOptions | None = None, passes: Sequence[GraphPass] | None = None,
             example_kwargs: dict[str, Any] | None = None) -> Predicted:
    """Recompute a Plan's predictions for a model (a module with example inputs, a
    capture, or a ``ModelProfile``).

    A module is captured and then transformed by ``passes``, by default the passes the plan
    records (``plan.passes``, :func:`plan_passes`), as :func:`plan` did: an MoE plan is
    re-estimated with its MoE layers, a random-LTD plan with its kept fractions (time at the
    schedule's average, peak memory at full length, as :func:`plan` estimates). A ``Captured`` or
    a ``ModelProfile`` is used as given (run the passes on the capture first)."""
    if isinstance(model, ModelProfile):
        profile = model
    elif isinstance(model, Captured):
        profile = profile_of(model, plan.cluster_spec())
    elif isinstance(model, nn.Module):
        if example_inputs is None:
            raise ValueError("estimate(plan, model) needs example_inputs to capture the model")
        captured = capture(model, normalize_inputs(example_inputs), example_kwargs=dict(example_kwargs or {}))
        chosen = plan_passes(plan) if passes is None else check_passes(passes)
        gm = run_passes(captured.graph_module, chosen, PassContext(captured=captured)) if chosen else None
        full = profile_of(captured, plan.cluster_spec())
        kept = kept_fractions(gm) if gm is not None else None
        if kept:
            predicted = estimate_predicted(plan, ltd_profile(full, kept), options=options)
            options = options or CostOptions()  # memory at full length, as the search checks it
            peak = peak_memory_bytes(plan, full, sequence_parallel=options.sequence_parallel)
            return dataclasses.replace(predicted, peak_memory_bytes=peak)
        profile = full
    else:
        raise TypeError("estimate needs an nn.Module (with example_inputs), a Captured or a "
                        f"ModelProfile, got {type(model).__name__}")
    return estimate_predicted(plan, profile, options=options)
