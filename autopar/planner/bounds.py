"""Lower bounds on a Config's step time and memory, for pruning the outer search.

Data flow: ``search`` computes :func:`step_lower_bound_s` for every Config (cheap: per-layer
work from the ``Prober`` cache and a few collective formulas), visits Configs in increasing
bound and stops at the first bound that cannot beat the best Plan found.
:func:`states_fit` discards Configs whose model states alone, spread perfectly over the
model-parallel devices, exceed the device (no split or recomputation can help them).

Each term bounds the matching term of ``cost_models.estimate`` from below:

* pipeline: the layers' work at no recomputation spread evenly over ``pp`` ranks, times the
  schedule's minimum number of slots — ``m/p + (p−1)/(p v)`` (1F1B/GPipe/interleaved:
  ``T = (m − 1/v) max_r W_r + Σ_r W_r / v`` is smallest when all ``W_r`` are equal) or ``m/p``
  plus, for zero-bubble, ``(p−1)/p`` of the drain ``Σ_k U_k ≥ Σ W − 2 Σ T_W`` (``T = m max W +
  Σ U − max U``); fixed parts and imbalance only add (recomputation is added where memory
  forces it, see :func:`forced_recompute_s`). ``max W`` is also at least the costliest single
  layer, which matters when layers differ (MoE layers every other layer) and ``pp`` is large;
* data-parallel sync: of the share ``dp_overlap`` issued per layer (``cost_models.fsdp``), what no
  compute can hide on any rank — every rank holds at least one layer, whose reduction is issued
  after the rank's last backward (the last microbatch's: the runtime's pipelining schedule reduces
  once per step) and, ZeRO ≥ 1, whose gather precedes the first forward (ZeRO-3: and every
  microbatch's forward and backward) — at the smallest layer's bytes; of the rest ``1 − overlap``,
  the whole-model sync of an even share of the parameters over the ``dp · cp`` ranks holding them
  (collective time grows with size, the slowest rank holds at least the average).
  With MoE layers the expert share ``÷ ep`` is all-reduced over ``dp/ep`` after the backward (no
  ZeRO, no overlap: ``cost_models.moe``); the slowest rank pays at least the per-layer part plus the
  larger of the other two (their sum without pipelining, where every rank holds the same share);
* optimizer: the memory-bound Adam step over that even share (experts ÷ ep, never ZeRO-sharded).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from autopar.cost_models import CostOptions, Group, ModelProfile, in_flight_microbatches
from autopar.cost_models import memory as memory_model
from autopar.cost_models.comm import (
    all_gather_time_s,
    all_reduce_time_s,
    dp_sync_time_s,
    reduce_scatter_time_s,
)
from autopar.cost_models.compute import device_efficiency
from autopar.cost_models.estimate import OPTIMIZER_BYTES_PER_PARAM
from autopar.cost_models.moe import EXPERT_ZERO, expert_params, layer_params, layer_state_bytes
from autopar.cost_models.states import StateBytes
from autopar.planner.build_plan import PlanContext
from autopar.planner.probes import Prober
from autopar.planner.space import Config

if TYPE_CHECKING:
    from autopar.cluster import ClusterSpec


def pipeline_lower_bound_s(layer_work_s: float, config: Config, weight_grad_s: float = 0.0,
                           max_layer_s: float = 0.0) -> float:
    """Seconds the pipeline needs at least, from ``layer_work_s`` (Σ layers per microbatch) and,
    for zero-bubble, ``weight_grad_s`` (the deferrable part of it). ``max_layer_s``, the costliest
    single layer, bounds the busiest rank's ``max W`` too: a layer is never split over ranks (with
    unequal layers, e.g. MoE every other layer, it can exceed ``Σ/p``)."""
    p, m, v = config.pp, config.num_microbatches, config.virtual_stages
    if max_layer_s * p > layer_work_s:  # max W ≥ the costliest layer > Σ W / p
        if config.schedule == "zero_bubble":
            return max_layer_s * m + max(0.0, layer_work_s - 2 * weight_grad_s) * (p - 1) / p
        return (m - 1 / v) * max_layer_s + layer_work_s / v
    if config.schedule == "zero_bubble":  # m·max W + ΣU − max U, U = W − 2·T_W per stage
        return layer_work_s * m / p + max(0.0, layer_work_s - 2 * weight_grad_s) * (p - 1) / p
    return layer_work_s * (m / p + (p - 1) / (p * v))


def _share(profile: ModelProfile, config: Config) -> tuple[float, float]:
    """Even shares per device of (dense, expert) parameters: the slowest rank holds at least these;
    each device holds ``1/ep`` of the experts and the MoE layers' routers whole (replicated over
    tp, ``cost_models.moe``)."""
    experts = sum(expert_params(layer) for layer in profile.layers)
    shared = sum(layer.moe.shared_params for layer in profile.layers if layer.moe is not None)
    dense = profile.param_count - experts - shared
    return dense / (config.tp * config.pp) + shared / config.pp, experts / (config.pp * config.ep)


def outside_lower_bound_s(
    profile: ModelProfile, ctx: PlanContext, config: Config, options: CostOptions
) -> float:
    """Data-parallel sync and optimizer seconds at least (module docstring)."""
    cluster, (params, experts) = ctx.cluster, _share(profile, config)
    replicas, dp_s = config.dp * config.cp, 0.0
    if replicas > 1:
        def group_of(ranks: list[int]) -> Group:
            return Group.of([r * config.tp for r in ranks], cluster=cluster)  # (dp, cp) index → device

        def sync_s(size: float, ranks: list[int], zero: int) -> float:
            return dp_sync_time_s(size, bytes_per_element=profile.bytes_per_element, zero=zero,
                                  group=group_of(ranks), cluster=cluster,
                                  num_microbatches=config.num_microbatches)

        overlap, group = options.dp_overlap, group_of(list(range(replicas)))
        per_layer = overlap * _unhidden_layer_s(profile, config, group, cluster) if overlap > 0 else 0.0
        dp_s = (1 - overlap) * sync_s(params, list(range(replicas)), config.zero)
        if experts:  # not overlapped with the backward (``cost_models.moe``)
            ranks = [d * config.cp + c for d in range(0, config.dp, config.ep) for c in range(config.cp)]
            expert_sync = sync_s(experts, ranks, EXPERT_ZERO)
            dp_s = dp_s + expert_sync if config.pp == 1 else max(dp_s, expert_sync)
        dp_s += per_layer
    bandwidth = (
        cluster.device.memory_bandwidth_bytes_per_s
        * device_efficiency(cluster.device).memory_bandwidth_fraction
    )
    shard = replicas if config.zero >= 1 else 1
    return dp_s + (params / shard + experts) * OPTIMIZER_BYTES_PER_PARAM / bandwidth


def _unhidden_layer_s(profile: ModelProfile, config: Config, group: Group, cluster: ClusterSpec) -> float:
    """Per-layer data-parallel seconds no compute hides on any rank (module docstring), at the
    smallest layer's dense bytes per device: ZeRO-0 its all-reduce; ZeRO-1/2 its reduce-scatter and
    one gather; ZeRO-3 its reduce-scatter and two gathers per microbatch."""
    if not profile.layers:
        return 0.0
    size = min(layer_params(layer, tp=config.tp, ep=config.ep)[0] for layer in profile.layers)
    size *= profile.bytes_per_element
    if config.zero == 0:
        return all_reduce_time_s(size, group=group, cluster=cluster)
    gathers = 2 * config.num_microbatches if config.zero == 3 else 1
    return (reduce_scatter_time_s(size, group=group, cluster=cluster)
            + gathers * all_gather_time_s(size, group=group, cluster=cluster))


def forced_recompute_s(prober: Prober, config: Config, modes: tuple[str, ...]) -> float:
    """Recomputation seconds per microbatch that memory forces at least (inf: nothing fits).

    Rank ``k`` keeps ``in_flight_k`` microbatches of activations; with every layer at mode ``r``
    or lighter it can host at most ``⌊C / (states + in_flight_k · stored_r)⌋`` layers (``C`` the
    device less workspace and fragmentation; the cheapest layer's bytes, fixed parts ignored — so
    this over-counts what fits). Layers beyond the ranks' total must use a heavier mode, each
    paying at least the cheapest layer's extra work of the next mode.
    """
    ctx, profile = prober.ctx, prober.profile
    gpu = ctx.cluster.device.name != "CPU"
    room = (ctx.cluster.device.memory_bytes - (memory_model.WORKSPACE_BYTES if gpu else 0)) / (
        1 + memory_model.FRAGMENTATION_FRACTION
    )
    in_flight = np.array(
        [
            in_flight_microbatches(
                config.schedule,
                pp=config.pp,
                rank=k,
                num_microbatches=config.num_microbatches,
                virtual_stages=config.virtual_stages,
            )
            for k in range(config.pp)
        ]
    )
    held = _states(profile, ctx)
    states = min(layer_state_bytes(layer, tp=config.tp, zero=config.zero, dp=config.dp * config.cp,
                                   ep=config.ep, states=held)
                 for layer in profile.layers)
    extra = 0.0
    for r, mode in enumerate(modes):
        stored = float(prober.layer_bytes(config, mode)[0].min())
        per_rank = room / np.maximum(states + in_flight * stored, 1e-9)
        need = max(0.0, profile.num_layers - float(np.floor(np.minimum(per_rank, profile.num_layers)).sum()))
        if r + 1 == len(modes):
            return np.inf if need > 0 else extra
        step = prober.per_layer_work_s(config, modes[r + 1]) - prober.per_layer_work_s(config, mode)
        extra += need * max(0.0, float(step.min()))
    return extra


def step_lower_bound_s(prober: Prober, config: Config, modes: tuple[str, ...], options: CostOptions) -> float:
    """The whole step's lower bound (inf when memory rules the Config out)."""
    if not prober.profile.layers:
        return outside_lower_bound_s(prober.profile, prober.ctx, config, options)
    work = prober.layer_work_lower_bound_s(config) + forced_recompute_s(prober, config, modes)
    weight = float(prober.per_layer_weight_grad_s(config, "none").sum())
    costliest = float(prober.per_layer_work_s(config, "none").max())
    pipeline = pipeline_lower_bound_s(work, config, weight, costliest)
    return pipeline + outside_lower_bound_s(prober.profile, prober.ctx, config, options)


def _states(profile: ModelProfile, ctx: PlanContext) -> StateBytes:
    return memory_model.training_states(gpu=ctx.cluster.device.name != "CPU",
                                        element_bytes=profile.bytes_per_element)


def states_fit(profile: ModelProfile, ctx: PlanContext, config: Config) -> bool:
    """Whether an even share of the model states fits the device at all."""
    dense, experts = _share(profile, config)
    held = _states(profile, ctx)
    states = memory_model.model_state_bytes(dense, zero=config.zero, dp=config.dp * config.cp, states=held)
    if experts:
        states += memory_model.model_state_bytes(experts, zero=EXPERT_ZERO, states=held)
    gpu = ctx.cluster.device.name != "CPU"
    need = (1 + memory_model.FRAGMENTATION_FRACTION) * states + (memory_model.WORKSPACE_BYTES if gpu else 0)
    return need <= ctx.cluster.device.memory_bytes
