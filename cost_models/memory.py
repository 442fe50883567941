"""Memory model: peak bytes per device for a Plan.

Data flow: a ``Plan`` and a ``ModelProfile`` go in; ``estimate`` stores the per-device peaks
in ``plan.predicted.peak_memory_bytes`` (the planner compares them with device memory) and the
breakdown of each set of stages a device holds in ``plan.predicted.memory`` (views draw it),
both from :func:`memory_details`.

Per device: model states + activations + logits + reserve.

* Model states (``states``): on GPUs mixed-precision Adam, 16 bytes per parameter (2 bf16 weight,
  2 bf16 gradient, 12 fp32 master weight and two moments); on CPU processes the parameters' dtype
  throughout (fp32: 4 + 4 + 8); the parameters of the device's stages ÷ t. ZeRO shards over the
  ``dp · cp`` replicas (context-parallel ranks hold the same parameters; the runtime reduces
  gradients and shards ZeRO over the flattened dp × cp mesh): 1 the optimizer bytes, 2 also the
  gradient, 3 also the weight. The first stage
  holds the embedding; the last the final norm and LM head, and under pipelining a copy of a
  weight tied to the embedding (as Megatron-LM does).
* Activations of one layer and microbatch: Korthikanti et al. 2022 exactly (TECHNIQUES §2,
  16-bit; scaled for other dtypes; ``activations``), with sequence parallelism when the Plan
  says so (``sbh·34/t``: the norm/dropout/residual regions ÷ t too), under context parallelism
  at ``s/cp`` tokens with fused attention plus the saved log-sum-exp per layer and, in the working
  set, one layer's ring buffers (``context_parallel``), times the microbatches in flight on that
  pipeline rank:
  GPipe ``m``; 1F1B and zero-bubble (ZB-H1) ``min(p − r, m)`` on rank ``r``; interleaved
  Megatron warm-up ``min(2(p − r − 1) + (v − 1)p + 1, m v)`` model chunks of ``1/v`` of the
  rank's layers (``p (1 + (p−1)/(p v))`` microbatches on the first rank). Fused attention
  stores no ``s × s`` scores (drops the ``5as/h`` term). Recomputation adds a working set:
  one layer's full activations (full) or its attention scores (selective).
* Mixture of Experts (``moe``): expert parameters ``E·P_e/ep`` per device (not ÷ t) with their
  gradients and optimizer states, 16 bytes each whatever the ZeRO stage: the runtime keeps experts
  out of ZeRO/FSDP and replicates their states over the ``dp/ep`` ranks holding the same experts
  (``moe.EXPERT_ZERO``); ZeRO shards the dense states only. The MoE layer's router and
  Residual-MoE branch are dense but whole on every tp rank (``moe.layer_params``). An MoE layer
  keeps its MLP activations once per routed row (``moe.expert_activation_bytes``).
* ZeRO-3 on GPUs (``fsdp``): beyond the sharded states, the unsharded weights of the root unit
  (embedding, head) and of ``d + 1`` consecutive layers (the one computing and the prefetched one),
  and the unsharded gradients of the root and of one layer awaiting its reduce-scatter.
* Logits on the last stage: the fp32 probabilities the vocabulary-parallel cross-entropy keeps
  for backward, ``4 (s/cp) b V / t`` bytes, for one microbatch (GPipe: all ``m``).
* Reserve (ASSUMED, not fitted): :data:`WORKSPACE_BYTES` on GPUs for the CUDA context and
  cuBLAS/NCCL workspaces, plus :data:`FRAGMENTATION_FRACTION` of everything else for the
  caching allocator's fragmentation.
* CPU processes (local clusters): activations, logits and temporaries are what the CPU runtime
  holds at its peak, counted op by op and per schedule (``local.memory``: the saved tensors of the
  actual ops, the schedule's kept outputs and logits, recomputation, the backward's working set);
  the reserve is those temporaries and the logits are part of the activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cost_models.activations import activation_bytes_per_layer
from autopar.cost_models.context_parallel import (
    ring_attention_workspace_bytes,
    ring_shape,
    sequence_shard_layer,
)
from autopar.cost_models.fsdp import in_flight_bytes
from autopar.cost_models.local.memory import cpu_activation_parts
from autopar.cost_models.local.states import cpu_state_parts
from autopar.cost_models.moe import EXPERT_ZERO, expert_activation_bytes, layer_params
from autopar.cost_models.profile import LayerProfile, ModelProfile
from autopar.cost_models.states import (  # noqa: F401 - model_state_bytes stays importable from here
    GRADIENT_BYTES_PER_PARAM,
    OPTIMIZER_BYTES_PER_PARAM,
    WEIGHT_BYTES_PER_PARAM,
    model_state_bytes,
    state_parts_bytes,
    training_states,
)

if TYPE_CHECKING:
    from autopar.plans import Plan

WORKSPACE_BYTES = 2**30
FRAGMENTATION_FRACTION = 0.05
LOGITS_BYTES_PER_ELEMENT = 4


def in_flight_microbatches(schedule: str, *, pp: int, rank: int, num_microbatches: int,
                           virtual_stages: int = 1) -> float:
    """Microbatches' worth of the rank's layer activations alive at its peak."""
    m, p, v = num_microbatches, pp, virtual_stages
    if schedule == "gpipe":
        return float(m)
    if schedule in ("1f1b", "zero_bubble"):
        return float(min(p - rank, m))
    if schedule == "interleaved":
        return min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v) / v
    raise ValueError(f"schedule {schedule!r}: expected gpipe, 1f1b, interleaved or zero_bubble")


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Bytes on one device at its peak. ``weights_bytes + gradients_bytes + optimizer_bytes`` is
    ``model_states_bytes``."""

    model_states_bytes: float
    activations_bytes: float
    logits_bytes: float
    reserve_bytes: float
    weights_bytes: float = 0.0
    gradients_bytes: float = 0.0
    optimizer_bytes: float = 0.0

    @property
    def total_bytes(self) -> int:
        return int(self.model_states_bytes + self.activations_bytes + self.logits_bytes
                   + self.reserve_bytes)


def _layer_bytes(layer: LayerProfile, profile: ModelProfile, *, microbatch_size: int, tp: int,
                 recompute: str, sequence_parallel: bool, ep: int = 1, cp: int = 1) -> tuple[float, float]:
    """(stored per in-flight microbatch, recomputation working set) of one layer (full-sequence
    ``layer``; with ``cp > 1`` priced at ``s/cp`` with fused attention, the log-sum-exp stored and
    the ring's buffers in the working set: ``context_parallel``)."""
    full = layer
    layer = sequence_shard_layer(layer, cp) if cp > 1 else layer
    fused = profile.fused_attention or cp > 1

    def act(mode: str) -> float:
        if not layer.is_transformer:  # unknown shape: what its forward writes, nothing if recomputed
            return 0.0 if mode == "full" else layer.activation_bytes * microbatch_size / tp
        dense = activation_bytes_per_layer(
            seq_len=layer.seq_len, microbatch_size=microbatch_size, hidden_size=layer.hidden_size,
            num_heads=layer.num_heads, tp=tp, recompute=mode, sequence_parallel=sequence_parallel,
            fused_attention=fused, bytes_per_element=profile.bytes_per_element)
        if layer.moe is None or mode == "full":
            return dense
        return dense + expert_activation_bytes(layer, microbatch_size=microbatch_size, tp=tp, ep=ep,
                                               bytes_per_element=profile.bytes_per_element)

    stored = act(recompute)
    working = {"none": 0.0, "selective": act("none") - stored, "full": act("none")}[recompute]
    if cp > 1 and layer.is_transformer:
        shape = ring_shape(full, microbatch_size=microbatch_size, tp=tp, cp=cp,
                           bytes_per_element=profile.bytes_per_element)
        kept = 0.0 if recompute == "full" else shape.lse_bytes  # full: only the layer being recomputed
        stored += kept
        working += shape.lse_bytes - kept + ring_attention_workspace_bytes(shape)
    return stored, working


def _stage_set_memory(plan: Plan, profile: ModelProfile, stage_indices: tuple[int, ...], *, gpu: bool,
                      cache: dict[tuple[int, str], tuple[float, float]],
                      plain: int | None = None) -> MemoryBreakdown:
    """The memory of a device holding ``stage_indices``; stage ``plain`` priced without recomputation.
    ``cache`` holds :func:`_layer_bytes` by (layer index, recomputation) for this plan and profile."""
    par, sched = plan.parallelism, plan.schedule
    t, b, last = par.tp, sched.microbatch_size, len(plan.stages) - 1
    params = stored = working = logits = experts = 0.0
    for stage in (plan.stages[i] for i in stage_indices):
        recompute = "none" if stage.index == plain else stage.recompute
        layers = profile.layers[stage.layers[0]:stage.layers[1]]
        params += sum(layer.param_count for layer in layers) / t
        for layer in (layer for layer in layers if layer.moe is not None):
            dense_part, expert_part = layer_params(layer, tp=t, ep=par.ep)  # experts E/ep, not ÷ t
            params, experts = params + dense_part - layer.param_count / t, experts + expert_part
        if stage.index == 0:
            params += profile.embedding_params / t
        if stage.index == last:
            params += (profile.head_params + (profile.tied_head_params if last > 0 else 0)) / t
            count = sched.num_microbatches if sched.name == "gpipe" else 1
            logits = count * LOGITS_BYTES_PER_ELEMENT * b * profile.seq_len // par.cp * profile.vocab_size / t
        for number in range(*stage.layers):
            if (number, recompute) not in cache:
                cache[number, recompute] = _layer_bytes(
                    profile.layers[number], profile, microbatch_size=b, tp=t, recompute=recompute,
                    sequence_parallel=plan.sequence_parallel, ep=par.ep, cp=par.cp)
            kept, extra = cache[number, recompute]
            stored, working = stored + kept, max(working, extra)
    rank = stage_indices[0] % par.pp if stage_indices else 0
    in_flight = in_flight_microbatches(sched.name, pp=par.pp, rank=rank,
                                       num_microbatches=sched.num_microbatches,
                                       virtual_stages=sched.virtual_stages)
    held = training_states(gpu=gpu, element_bytes=profile.bytes_per_element)
    replicas = par.dp * par.cp  # ZeRO shards over the flattened dp × cp ranks (the runtime's gradient mesh)
    parts = state_parts_bytes(params, zero=plan.zero, dp=replicas, states=held)
    if experts:  # E/ep experts per device, their states replicated over dp/ep ranks: no ZeRO (``moe``)
        expert_parts = state_parts_bytes(experts, zero=EXPERT_ZERO, states=held)
        parts = tuple(a + e for a, e in zip(parts, expert_parts, strict=True))  # type: ignore[assignment]
    if not gpu:  # CPU processes: parameter by parameter, as the runtime holds them (``local.states``)
        parts = cpu_state_parts(plan, profile, stage_indices)
    if gpu and plan.zero == 3 and replicas > 1:  # unsharded layers in flight (``fsdp``)
        weights, grads = _fsdp_in_flight_bytes(plan, profile, stage_indices, params)
        parts = (parts[0] + weights, parts[1] + grads, parts[2])  # type: ignore[assignment]
    states = sum(parts)
    if gpu:
        activations = stored * in_flight + working
        reserve = FRAGMENTATION_FRACTION * (states + activations + logits) + WORKSPACE_BYTES
    else:  # CPU processes: what the runtime holds at its peak, logits included (``local.memory``)
        activations, reserve = cpu_activation_parts(plan, profile, stage_indices, in_flight=in_flight,
                                                    gradients_bytes=parts[1], plain=plain)
        logits = 0.0
    return MemoryBreakdown(model_states_bytes=states, activations_bytes=activations,
                           logits_bytes=logits, reserve_bytes=reserve, weights_bytes=parts[0],
                           gradients_bytes=parts[1], optimizer_bytes=parts[2])


def _fsdp_in_flight_bytes(plan: Plan, profile: ModelProfile, stage_indices: tuple[int, ...],
                          params: float) -> tuple[float, float]:
    """(weights, gradients) that ZeRO-3 holds unsharded at its peak on a device holding
    ``stage_indices`` (``params`` dense parameters per device before sharding): one FSDP unit per
    layer and a root with the rest (``fsdp.in_flight_bytes``)."""
    par, element = plan.parallelism, profile.bytes_per_element
    layers = [layer_params(layer, tp=par.tp, ep=par.ep)[0] * element
              for stage in (plan.stages[i] for i in stage_indices)
              for layer in profile.layers[stage.layers[0]:stage.layers[1]]]
    return in_flight_bytes(max(0.0, params * element - sum(layers)), layers)


@dataclass(frozen=True)
class PlanMemory:
    """The memory model's view of a whole plan: ``held`` the stage indices of every device (in
    device-id order), ``by_set`` the breakdown of each set of stages some device holds (in order of
    the first device holding it; devices with the same stages have the same bytes), and
    ``without_recompute`` for each recomputing stage the breakdown of its devices were that stage
    not recomputing (the others as planned): what its recomputation saves."""

    held: tuple[tuple[int, ...], ...]
    by_set: dict[tuple[int, ...], MemoryBreakdown]
    without_recompute: dict[int, MemoryBreakdown]

    def per_device(self) -> tuple[MemoryBreakdown, ...]:
        return tuple(self.by_set[indices] for indices in self.held)


def memory_details(plan: Plan, profile: ModelProfile, *, without_recompute: bool = True) -> PlanMemory:
    """:class:`PlanMemory` of ``plan`` (``without_recompute=False`` leaves that part empty)."""
    held: list[list[int]] = [[] for _ in range(plan.world_size)]
    for stage in plan.stages:
        for device in stage.devices:
            held[device].append(stage.index)
    sets = tuple(map(tuple, held))
    gpu = plan.cluster["device"]["name"] != "CPU"
    cache: dict[tuple[int, str], tuple[float, float]] = {}
    by_set = {indices: _stage_set_memory(plan, profile, indices, gpu=gpu, cache=cache)
              for indices in dict.fromkeys(sets)}
    plain = {stage.index: _stage_set_memory(plan, profile, sets[stage.devices[0]], gpu=gpu, cache=cache,
                                            plain=stage.index)
             for stage in plan.stages if without_recompute and stage.recompute != "none"}
    return PlanMemory(held=sets, by_set=by_set, without_recompute=plain)


def plan_memory(plan: Plan, profile: ModelProfile) -> tuple[MemoryBreakdown, ...]:
    """The memory breakdown of every device, in device-id order (0 … world − 1)."""
    return memory_details(plan, profile, without_recompute=False).per_device()


def peak_memory_bytes(plan: Plan, profile: ModelProfile) -> tuple[int, ...]:
    """Peak bytes of every device, in device-id order (0 … world − 1)."""
    return tuple(m.total_bytes for m in plan_memory(plan, profile))
