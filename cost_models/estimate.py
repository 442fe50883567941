"""Estimate API: a Plan and a ModelProfile in, ``Predicted`` (step time, throughput, memory) out.

Data flow: ``ModelProfile`` (``profile``) + ``Plan`` (``autopar.plans``) → per-stage costs from
the compute and communication models → step time from the schedule model → ``Predicted``
(``plan.predicted``), read by the planner, the CLI views and the benchmarks.

Step time = pipeline time (``schedule.pipeline_time``: per-stage forward, backward,
recomputation, tensor-parallel collectives, ring-attention transfers, MoE all-to-alls and P2P
sends, steady part plus bubble) + exposed data-parallel sync (dense parameters over the ``dp · cp``
ranks holding them with the plan's ZeRO stage, each layer's collectives behind the neighbouring
layers' compute, ``fsdp.dp_step_times``; the share ``1 − dp_overlap`` as one whole-model sync after
the backward, ``comm.dp_sync_time_s``; plus the all-reduce of expert
gradients over ``dp/ep × cp`` after the last backward, never overlapped, ``moe``) + optimizer step
(memory-bound: :data:`OPTIMIZER_BYTES_PER_PARAM` read and written per parameter shard; experts
unsharded). The breakdown splits it into compute, recompute, tp_comm, cp_comm, pp_comm, dp_comm,
ep_comm (the MoE layers' dispatch and combine all-to-alls, ``moe``), bubble and optimizer, summing
to the step.

Sequence parallelism (the Plan's ``sequence_parallel``; Korthikanti et al. 2022, §4.2.2): each
layer's two tensor-parallel all-reduces per direction become a reduce-scatter and an all-gather of
the same ``b·s·h`` buffer (``comm``: the same ring time), the LayerNorm/dropout/residual work and
activations ÷ t (``compute``, ``memory``). Context parallelism (``cp``; Liu et al. 2023 ring
attention, load-balanced as in Llama 3): every rank prices ``s/cp`` tokens of every layer
(``context_parallel.sequence_shard_profile``) plus its ring's other ``cp − 1`` block steps as
compute and the K/V (and dK/dV) transfers no block hides as ``cp_comm``, on the cp group's links
(``context_parallel.ring_layer_times``).
``tflops_per_device`` counts the FLOPs executed (recomputation included, as Megatron-LM
reports); ``mfu`` the model FLOPs (no recomputation) against the dtype's peak.

``Predicted`` also keeps what views draw, so they never re-run this model: each stage's seconds per
microbatch (``StageCost.times()`` with its tensor-parallel, all-to-all and data-parallel parts, its
parameters per device and, if it recomputes, the memory its devices would need without), the
memory breakdown of every set of stages a device holds (``memory.memory_details``), the training
dtype and the cost options, as plain values.

Local clusters (``local:N``: one-thread CPU processes over gloo) take another model with the same
API, ``cpu_step``, priced from this machine's calibration (``cpu_rates``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autopar.cost_models.comm import (
    DEFAULT_DP_OVERLAP,
    Group,
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    dp_sync_time_s,
    pipeline_p2p_time_s,
    reduce_scatter_time_s,
)
from autopar.cost_models.compute import (
    Kernels,
    LayerTimes,
    device_efficiency,
    embedding_times,
    head_times,
    transformer_layer_times,
)
from autopar.cost_models.context_parallel import (
    RingLayerTimes,
    ring_layer_times,
    ring_shape,
    sequence_shard_profile,
)
from autopar.cost_models.fsdp import Unit, dp_step_times
from autopar.cost_models.local.step import cpu_stage_costs, estimate_local, local_rates
from autopar.cost_models.memory import MemoryBreakdown, memory_details
from autopar.cost_models.moe import (
    ALL_TO_ALLS_PER_LAYER,
    EXPERT_ZERO,
    all_to_all_bytes,
    expert_params,
    layer_params,
)
from autopar.cost_models.profile import LayerProfile, ModelProfile
from autopar.cost_models.schedule import pipeline_time
from autopar.cost_models.simulate import Timeline, simulate
from autopar.cost_models.stages import (
    CommTimes,
    StageCost,
    comm_s,
    exchange_times,
    expert_groups,
    layer_flops,
    mesh_group,
    sends_s,
)

if TYPE_CHECKING:
    from autopar.cluster import ClusterSpec
    from autopar.cost_models.local.profile import LocalProfile
    from autopar.cost_models.local.rates import CpuRates
    from autopar.plans import MemoryPrediction, Plan, Predicted, StagePrediction

OPTIMIZER_BYTES_PER_PARAM = 32
"""Adam step traffic: read and write the 16 bytes of state per parameter (weights, gradient
zeroing, fp32 master and moments)."""


@dataclass(frozen=True, kw_only=True)
class CostOptions:
    """How the training code overlaps and shards what the Plan does not say.

    ``dp_overlap``: the share of the data-parallel traffic issued per layer as the layers run
    (``fsdp``; 1, the default: FSDP2 ``fully_shard`` / ``replicate`` per transformer block), the rest
    whole-model after the last backward (0: Megatron-LM 2021, ``megatron.MEGATRON_2021``; ``comm``).
    ``tp_overlap``: fraction of the backward pass's tensor-parallel all-reduces hidden behind
    the weight-gradient matmuls (Megatron-LM's asynchronous all-reduce; 0 in its 2021 code and
    in ``torch.distributed.tensor.parallel``). ``sequence_parallel``: whether the training code
    has Korthikanti et al.'s sequence parallelism — None (autopar's runtime: the planner searches
    it), False (e.g. Megatron-LM 2021, ``megatron.MEGATRON_2021``: the planner never chooses it),
    True (the planner always uses it where tp > 1). It constrains the search only: ``estimate``
    prices what the Plan says (``plan.sequence_parallel``, ``fix={"sequence_parallel": True}``).
    ``p2p_scatter_gather``:
    pipeline sends split over the t tensor-parallel ranks, re-gathered over NVLink.
    ``local_profile``: the measured profile of this machine for ``local`` clusters (default: the
    one ``autopar calibrate`` saved, see ``cpu_step.local_rates``); other clusters ignore it.
    """

    dp_overlap: float = DEFAULT_DP_OVERLAP
    tp_overlap: float = 0.0
    sequence_parallel: bool | None = None
    p2p_scatter_gather: bool = True
    local_profile: LocalProfile | None = None

    def __post_init__(self) -> None:
        for name in ("dp_overlap", "tp_overlap"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"CostOptions.{name} = {value!r}: expected a fraction in [0, 1]")
        if self.sequence_parallel not in (None, True, False):
            raise ValueError(f"CostOptions.sequence_parallel = {self.sequence_parallel!r}: expected None "
                             "(searched), True or False")


def _check(plan: Plan, profile: ModelProfile) -> None:
    end = plan.stages[-1].layers[1]
    if plan.stages[0].layers[0] != 0 or end != profile.num_layers:
        raise ValueError(f"the plan's stages cover layers [{plan.stages[0].layers[0]}, {end}) but the "
                         f"profile has {profile.num_layers}; estimate with the profile of the planned model")
    if plan.seq_len is not None and plan.seq_len != profile.seq_len:
        raise ValueError(f"plan.seq_len = {plan.seq_len} but the profile was made for {profile.seq_len}; "
                         "rebuild the profile at the plan's sequence length")


def stage_costs(plan: Plan, profile: ModelProfile, *, options: CostOptions | None = None
                ) -> tuple[StageCost, ...]:
    """Per-microbatch costs of every stage of ``plan``, in stage order (local clusters:
    ``cpu_step.cpu_stage_costs``). With ``cp > 1`` every rank prices ``s/cp`` tokens
    (``context_parallel.sequence_shard_profile``) plus its ring's other steps and exposed transfers."""
    _check(plan, profile)
    options = options or CostOptions()
    rates = local_rates(plan, options.local_profile)
    if rates is not None:
        return cpu_stage_costs(plan, profile, rates)
    cluster = plan.cluster_spec()
    t, b, cp = plan.parallelism.tp, plan.schedule.microbatch_size, plan.parallelism.cp
    ep = plan.parallelism.ep
    local = sequence_shard_profile(profile, cp)
    kernels = _kernels(plan, local)
    boundary_bytes = b * local.seq_len * local.hidden_size * local.bytes_per_element
    tp_times = _tp_collective_times(plan, boundary_bytes, cluster, overlap=options.tp_overlap)
    layer_times = _layer_timer(kernels, local, plan)
    ring = _ring_timer(plan, profile)
    costs = []
    for stage in plan.stages:
        layers = local.layers[stage.layers[0]:stage.layers[1]]
        compute = sum((layer_times(layer, stage.recompute) for layer in layers), LayerTimes())
        flops = b * sum(layer_flops(layer, stage.recompute, local.fused_attention) for layer in layers)
        params = sum(layer.param_count for layer in layers)
        experts = sum(expert_params(layer) for layer in layers)  # ÷ ep, not ÷ t (``moe``)
        shared = sum(layer.moe.shared_params for layer in layers if layer.moe)  # router etc.: not ÷ t
        # two all-reduces per layer each way (TECHNIQUES §3), one in an MoE layer (its experts are not
        # tensor-parallel, ``moe``); the recomputed forward repeats them
        per_layer = [(1 if layer.moe else 2) * layer.is_transformer for layer in layers]
        tp_comm = tp_times.layers(sum(per_layer), stage.recompute)
        if stage.index == 0:
            compute += embedding_times(local, kernels=kernels)
            tp_comm += tp_times.embedding
            params += local.embedding_params
            flops += 3 * local.embedding_flops_fwd * b
        if stage.index == len(plan.stages) - 1:
            compute += head_times(local, kernels=kernels)
            tp_comm += tp_times.head
            params += local.head_params + (local.tied_head_params if stage.index > 0 else 0)
            flops += (local.head_flops_fwd + local.head_flops_bwd) * b
        send_next, send_previous = _sends(plan, stage.index, boundary_bytes, cluster, options)
        all_to_all_s = _all_to_all_s(plan, local, stage.devices, layers)
        per_device = (params - experts - shared) / t + shared + experts / ep if experts else params / t
        cp_compute, cp_comm = ring(profile.layers[stage.layers[0]:stage.layers[1]], stage.recompute)
        costs.append(StageCost(
            compute=compute + cp_compute,
            comm={"tp": tp_comm, "ep": exchange_times(all_to_all_s, stage.recompute), "cp": cp_comm},
            send_forward_s=send_next, send_backward_s=send_previous, hardware_flops=flops,
            params_per_device=per_device, expert_params_per_device=experts / ep))
    return tuple(costs)


@dataclass(frozen=True, kw_only=True)
class _TpTimes:
    """Tensor-parallel collectives of one microbatch on a boundary-sized (``b·s·h``) buffer: per
    layer ``unit_s`` each way, plus the embedding's and the LM head's."""

    unit_s: float
    embedding: CommTimes
    head: CommTimes
    overlap: float

    def layers(self, count: int, recompute: str) -> CommTimes:
        """``count`` units forward and backward (the backward's ``overlap`` hidden), again when
        fully recomputed."""
        total = count * self.unit_s
        return CommTimes(forward_s=total, backward_s=total * (1 - self.overlap),
                         recompute_s=total if recompute == "full" else 0.0)


def _tp_collective_times(plan: Plan, size_bytes: float, cluster: ClusterSpec, *, overlap: float = 0.0
                         ) -> _TpTimes:
    """Without sequence parallelism a unit is one all-reduce (Megatron-LM's ``g``/``f``); the
    vocabulary-parallel embedding all-reduces its output, the LM head its input's gradient. With it
    (Korthikanti et al. 2022, §4.2.2) a unit is a reduce-scatter after the row-parallel linear and
    an all-gather before the column-parallel one, of the same buffer — as the runtime's
    ``sequence_parallel_pass`` issues them; the embedding reduce-scatters its output, the LM head
    all-gathers its input forward and reduce-scatters its gradient backward."""
    group = Group.of(mesh_group(plan, "tp"), cluster=cluster)
    if group.size == 1:
        return _TpTimes(unit_s=0.0, embedding=CommTimes(), head=CommTimes(), overlap=overlap)
    hidden = 1 - overlap  # of the backward's collectives
    if not plan.sequence_parallel:
        reduce_s = all_reduce_time_s(size_bytes, group=group, cluster=cluster)
        return _TpTimes(unit_s=reduce_s, embedding=CommTimes(forward_s=reduce_s),
                        head=CommTimes(backward_s=reduce_s * hidden), overlap=overlap)
    scatter_s = reduce_scatter_time_s(size_bytes, group=group, cluster=cluster)
    gather_s = all_gather_time_s(size_bytes, group=group, cluster=cluster)
    return _TpTimes(unit_s=scatter_s + gather_s, embedding=CommTimes(forward_s=scatter_s),
                    head=CommTimes(forward_s=gather_s, backward_s=scatter_s * hidden), overlap=overlap)


def _ring_timer(plan: Plan, profile: ModelProfile
                ) -> Callable[[tuple[LayerProfile, ...], str], tuple[LayerTimes, CommTimes]]:
    """``ring(layers, recompute)``: what ring attention adds to these layers (full-sequence
    profiles) per microbatch on one device (``context_parallel.ring_layer_times`` on the plan's cp
    group): the other steps' block compute and the exposed transfers, again in a full recomputation
    (the runtime replays the ring; selective recomputation keeps the ring's output). Zeros for cp 1."""
    par, cluster = plan.parallelism, plan.cluster_spec()
    group = Group.of(mesh_group(plan, "cp"), cluster=cluster)
    cache: dict[tuple[object, ...], RingLayerTimes] = {}

    def ring(layers: tuple[LayerProfile, ...], recompute: str) -> tuple[LayerTimes, CommTimes]:
        if par.cp == 1:
            return LayerTimes(), CommTimes()
        compute, comm = LayerTimes(), CommTimes()
        for layer in (layer for layer in layers if layer.is_transformer):
            key = (layer.seq_len, layer.hidden_size, layer.num_heads, layer.kv_heads)
            if key not in cache:
                shape = ring_shape(layer, microbatch_size=plan.schedule.microbatch_size, tp=par.tp, cp=par.cp,
                                   bytes_per_element=profile.bytes_per_element)
                cache[key] = ring_layer_times(shape, device=cluster.device, dtype=profile.dtype,
                                              causal=profile.causal, group=group, cluster=cluster)
            r, again = cache[key], recompute == "full"
            compute += LayerTimes(forward_s=r.compute_forward_s, backward_input_s=r.compute_backward_s,
                                  recompute_s=r.compute_forward_s if again else 0.0)
            comm += CommTimes(forward_s=r.exposed_forward_s, backward_s=r.exposed_backward_s,
                              recompute_s=r.exposed_forward_s if again else 0.0)
        return compute, comm

    return ring


def _kernels(plan: Plan, profile: ModelProfile) -> Kernels:
    par = plan.parallelism
    return Kernels(device=plan.cluster_spec().device, dtype=profile.dtype,
                   bytes_per_element=profile.bytes_per_element, microbatch_size=plan.schedule.microbatch_size,
                   tp=par.tp, ep=par.ep)


def _layer_timer(kernels: Kernels, profile: ModelProfile, plan: Plan
                 ) -> Callable[[LayerProfile, str], LayerTimes]:
    """``layer_times(layer, recompute)``: one layer's compute per microbatch, cached by shape;
    elementwise work ÷ t under the plan's sequence parallelism."""
    cache: dict[tuple[object, ...], LayerTimes] = {}

    def layer_times(layer: LayerProfile, recompute: str) -> LayerTimes:
        key = (layer.flops_fwd, layer.hidden_size, layer.num_heads, layer.ffn_size, layer.moe, recompute)
        if key not in cache:
            cache[key] = transformer_layer_times(
                layer, kernels=kernels, recompute=recompute, fused_attention=profile.fused_attention,
                causal=profile.causal, sequence_parallel=plan.sequence_parallel)
        return cache[key]

    return layer_times


def _all_to_all_s(plan: Plan, profile: ModelProfile, devices: tuple[int, ...],
                  layers: tuple[LayerProfile, ...]) -> float:
    """One direction's all-to-alls of a stage's MoE layers per microbatch (dispatch + combine each,
    ``moe``), on the expert-parallel group of the stage's first device."""
    ep = plan.parallelism.ep
    if ep == 1:
        return 0.0
    cluster, tokens = plan.cluster_spec(), plan.schedule.microbatch_size * profile.seq_len
    group = Group.of(expert_groups(plan, devices)[0], cluster=cluster)
    return sum(ALL_TO_ALLS_PER_LAYER * all_to_all_time_s(
        all_to_all_bytes(layer, tokens=tokens, ep=ep, bytes_per_element=profile.bytes_per_element),
        group=group, cluster=cluster) for layer in layers if layer.moe is not None)


def _sends(plan: Plan, index: int, size_bytes: float, cluster: ClusterSpec, options: CostOptions
           ) -> tuple[float, float]:
    stages, per_node = plan.stages, cluster.devices_per_node

    def send(other: int) -> float:
        same = stages[index].devices[0] // per_node == stages[other].devices[0] // per_node
        return pipeline_p2p_time_s(activation_bytes=size_bytes, tp=plan.parallelism.tp, cluster=cluster,
                                   same_node=same, scatter_gather=options.p2p_scatter_gather)

    forward = send(index + 1) if index + 1 < len(stages) else 0.0
    return forward, send(index - 1) if index > 0 else 0.0


def _dp_and_optimizer_s(plan: Plan, profile: ModelProfile, costs: tuple[StageCost, ...],
                        options: CostOptions) -> tuple[float, float]:
    """(exposed data-parallel sync, optimizer step) of the slowest pipeline rank. The ranks of one
    dp × cp slice hold the same parameters: gradients are reduced, and ZeRO shards, over the
    ``dp · cp`` of them (the runtime's flattened ``gradient_mesh``)."""
    cluster, par = plan.cluster_spec(), plan.parallelism
    replicas = mesh_group(plan, "dp", "cp")
    dp_group = Group.of(replicas, cluster=cluster)
    bandwidth = (cluster.device.memory_bandwidth_bytes_per_s
                 * device_efficiency(cluster.device).memory_bandwidth_fraction)
    tied = 0.0
    if profile.tied_embeddings and len(plan.stages) > 1:  # first and last stage sum their copies
        pair = Group.of((plan.stages[0].devices[0], plan.stages[-1].devices[0]), cluster=cluster)
        tied = all_reduce_time_s(profile.tied_head_params / par.tp * profile.bytes_per_element,
                                 group=pair, cluster=cluster) if pair.size > 1 else 0.0
    expert_group = Group.of(expert_groups(plan, plan.stages[0].devices)[1], cluster=cluster)
    dp_s = optimizer_s = 0.0
    for rank in range(par.pp):
        mine = costs[rank::par.pp]
        params = sum(c.params_per_device for c in mine)
        experts = sum(c.expert_params_per_device for c in mine)
        exposed = _dense_dp_exposed_s(plan, profile, options, rank, mine, group=dp_group)
        if experts:  # all-reduced over the dp/ep × cp replicas after the last backward, any ZeRO stage
            exposed += dp_sync_time_s(experts, bytes_per_element=profile.bytes_per_element, zero=EXPERT_ZERO,
                                      group=expert_group, cluster=cluster)
        dp_s = max(dp_s, exposed)
        shard = len(replicas) if plan.zero >= 1 else 1
        optimizer_s = max(optimizer_s, ((params - experts) / shard + experts)
                          * OPTIMIZER_BYTES_PER_PARAM / bandwidth)
    return dp_s + tied, optimizer_s


def _dp_units(plan: Plan, profile: ModelProfile, rank: int, mine: tuple[StageCost, ...]
              ) -> tuple[Unit, list[Unit]]:
    """The data-parallel units of pipeline rank ``rank`` (its stages ``mine``): one per layer (dense
    parameters ÷ t, experts excluded: ``moe``; compute of ``s/cp`` tokens and the ring's other steps),
    and a root with the rest of the rank's dense parameters and compute (embedding, head)."""
    par, local = plan.parallelism, sequence_shard_profile(profile, plan.parallelism.cp)
    layer_times, ring = _layer_timer(_kernels(plan, local), local, plan), _ring_timer(plan, profile)
    element = profile.bytes_per_element
    layers = []
    for stage in plan.stages[rank::par.pp]:
        for number in range(*stage.layers):
            layer = local.layers[number]
            times = layer_times(layer, stage.recompute) + ring((profile.layers[number],), stage.recompute)[0]
            layers.append(Unit(param_bytes=layer_params(layer, tp=par.tp, ep=par.ep)[0] * element,
                               forward_s=times.forward_s, backward_s=times.backward_s + times.recompute_s))
    total = sum((c.compute for c in mine), LayerTimes())
    dense = sum(c.params_per_device - c.expert_params_per_device for c in mine) * element
    root = Unit(param_bytes=max(0.0, dense - sum(u.param_bytes for u in layers)),
                forward_s=max(0.0, total.forward_s - sum(u.forward_s for u in layers)),
                backward_s=max(0.0, total.backward_s + total.recompute_s - sum(u.backward_s for u in layers)))
    return root, layers


def _dense_dp_exposed_s(plan: Plan, profile: ModelProfile, options: CostOptions, rank: int,
                        mine: tuple[StageCost, ...], *, group: Group) -> float:
    """Dense data-parallel traffic on pipeline rank ``rank``'s critical path over a step: the share
    ``dp_overlap`` issued per layer (``fsdp.dp_step_times`` at the plan's ZeRO stage, ``pipelined``:
    the runtime drives every plan's microbatches with a ``torch.distributed.pipelining`` schedule, pp 1
    included, ``runtime.pipeline.make_schedule``, so only the last microbatch reduces), the rest the
    whole-model sync after the last backward (``comm.dp_sync_time_s``, none of it hidden)."""
    if group.size <= 1:
        return 0.0
    overlap, exposed = options.dp_overlap, 0.0
    if overlap < 1:
        params = sum(c.params_per_device for c in mine) - sum(c.expert_params_per_device for c in mine)
        sync = dp_sync_time_s(params, bytes_per_element=profile.bytes_per_element, zero=plan.zero,
                              group=group, cluster=plan.cluster_spec(),
                              num_microbatches=plan.schedule.num_microbatches)
        exposed = (1 - overlap) * sync
    if overlap > 0:
        root, layers = _dp_units(plan, profile, rank, mine)
        times = dp_step_times(root, layers, zero=plan.zero, group=group, cluster=plan.cluster_spec(),
                              num_microbatches=plan.schedule.num_microbatches, pipelined=True)
        exposed += overlap * times.exposed_s
    return exposed


def estimate(plan: Plan, profile: ModelProfile, *, options: CostOptions | None = None,
             memory_profile: ModelProfile | None = None) -> Predicted:
    """The cost model's prediction for ``plan`` running the model ``profile`` describes (a local
    cluster: ``cpu_step.estimate_local`` with this machine's measured rates). Memory is priced on
    ``memory_profile`` when given (random-LTD: time at the kept length, memory at full length)."""
    options = options or CostOptions()
    memory_profile = profile if memory_profile is None else memory_profile
    rates = local_rates(plan, options.local_profile)
    if rates is not None:
        _check(plan, profile)
        costs = cpu_stage_costs(plan, profile, rates)
        details = _details(plan, memory_profile, costs, options, rates, dtype=profile.dtype)
        local = estimate_local(plan, profile, rates)
        breakdown = {"cp_comm": 0.0} | local.breakdown_dict()  # a local model without cp_comm: no ring
        return dataclasses.replace(local, breakdown=breakdown, **details)
    costs = stage_costs(plan, profile, options=options)
    return _estimate_gpu(plan, profile, costs, options,
                         _details(plan, memory_profile, costs, options, None, dtype=profile.dtype))


def _estimate_gpu(plan: Plan, profile: ModelProfile, costs: tuple[StageCost, ...], options: CostOptions,
                  details: dict[str, Any]) -> Predicted:
    from autopar.plans import Predicted

    sched, par = plan.schedule, plan.parallelism
    pipe = pipeline_time([c.times() for c in costs], schedule=sched.name, pp=par.pp,
                         num_microbatches=sched.num_microbatches, virtual_stages=sched.virtual_stages)
    dp_s, optimizer_s = _dp_and_optimizer_s(plan, profile, costs, options)
    mine, m = costs[pipe.critical_rank::par.pp], sched.num_microbatches
    c = sum((x.compute for x in mine), LayerTimes())
    breakdown = {
        "compute": m * (c.forward_s + c.backward_s), "recompute": m * c.recompute_s,
        "tp_comm": m * comm_s(mine, "tp"), "pp_comm": m * sends_s(mine), "dp_comm": dp_s,
        "ep_comm": m * comm_s(mine, "ep"), "cp_comm": m * comm_s(mine, "cp"), "bubble": pipe.bubble_s,
        "optimizer": optimizer_s,
    }
    step_s = pipe.total_s + dp_s + optimizer_s
    world, device = plan.world_size, plan.cluster_spec().device
    hardware_flops = par.dp * par.cp * m * sum(x.hardware_flops for x in costs)
    model_flops = plan.global_batch_size * profile.model_flops_per_sequence
    return Predicted(
        step_time_s=step_s, tokens_per_s=plan.global_batch_size * profile.seq_len / step_s,
        tflops_per_device=hardware_flops / (world * step_s) / 1e12,
        mfu=model_flops / (world * device.peak_flops_per_s_for(profile.dtype) * step_s),
        breakdown=breakdown, **details)


def _details(plan: Plan, memory_profile: ModelProfile, costs: tuple[StageCost, ...], options: CostOptions,
             rates: CpuRates | None, *, dtype: str) -> dict[str, Any]:
    """The ``Predicted`` fields views draw: per-device peaks, per-stage numbers, memory by stage set,
    dtype and options (``sequence_parallel``: the plan's)."""
    from autopar.plans import CostOptionsUsed

    memory = memory_details(plan, memory_profile)
    used = CostOptionsUsed(dp_overlap=options.dp_overlap, tp_overlap=options.tp_overlap,
                           sequence_parallel=plan.sequence_parallel,
                           p2p_scatter_gather=options.p2p_scatter_gather,
                           local_rates=None if rates is None else rates.source)
    plain = {index: m.total_bytes for index, m in memory.without_recompute.items()}
    return {
        "peak_memory_bytes": tuple(m.total_bytes for m in memory.per_device()),
        "stages": tuple(_stage_prediction(index, cost, plain.get(index)) for index, cost in enumerate(costs)),
        "memory": tuple(_memory_prediction(indices, m) for indices, m in memory.by_set.items()),
        "dtype": dtype, "options": used,
    }


def _stage_prediction(index: int, cost: StageCost, memory_without_recompute_bytes: int | None
                      ) -> StagePrediction:
    from autopar.plans import StagePrediction

    times = cost.times()
    return StagePrediction(
        index=index, forward_s=times.forward_s, backward_s=times.backward_s,
        backward_weight_s=times.backward_weight_s, recompute_s=times.recompute_s,
        send_forward_s=times.send_forward_s, send_backward_s=times.send_backward_s,
        tp_comm_s=cost.comm_of("tp").total_s, ep_comm_s=cost.comm_of("ep").total_s,
        cp_comm_s=cost.comm_of("cp").total_s, dp_comm_s=cost.comm_of("dp").total_s,
        params_per_device=cost.params_per_device,
        memory_without_recompute_bytes=memory_without_recompute_bytes)


def _memory_prediction(indices: tuple[int, ...], memory: MemoryBreakdown) -> MemoryPrediction:
    from autopar.plans import MemoryPrediction

    return MemoryPrediction(stages=indices, weights_bytes=memory.weights_bytes,
                            gradients_bytes=memory.gradients_bytes, optimizer_bytes=memory.optimizer_bytes,
                            activations_bytes=memory.activations_bytes, logits_bytes=memory.logits_bytes,
                            reserve_bytes=memory.reserve_bytes, peak_bytes=memory.total_bytes)


def estimate_plan(plan: Plan, profile: ModelProfile, *, options: CostOptions | None = None,
                  memory_profile: ModelProfile | None = None) -> Plan:
    """``plan`` with ``predicted`` filled in by :func:`estimate`."""
    return dataclasses.replace(plan, predicted=estimate(plan, profile, options=options,
                                                       memory_profile=memory_profile))


def simulate_plan(plan: Plan, profile: ModelProfile, *, options: CostOptions | None = None) -> Timeline:
    """The discrete-event timeline of ``plan``'s pipeline part (``simulate``)."""
    costs = stage_costs(plan, profile, options=options)
    sched = plan.schedule
    return simulate([c.times() for c in costs], schedule=sched.name, pp=plan.parallelism.pp,
                    num_microbatches=sched.num_microbatches, virtual_stages=sched.virtual_stages)
