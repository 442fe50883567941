"""Step model of a local cluster: N one-thread processes over gloo on this machine's C cores.

Data flow: ``estimate`` hands a Plan on a ``local:N`` cluster here. :func:`local_rates` finds the
measured ``CpuRates`` (``CostOptions.local_profile``, else the profile ``autopar calibrate`` wrote
to its default path, else :meth:`CpuRates.quick`, a built-in measurement of a few seconds cached
on disk); :func:`cpu_stage_costs` prices every stage
per microbatch with ``cpu_compute``; :func:`estimate_local` adds what the runtime does around the
pipeline and runs the step on the cores (``shared_cores``) → ``Predicted``.

What the runtime does on CPU, priced from measured rates (``CpuRates``):

* per microbatch and stage: the layers, embedding and head (``cpu_compute``), sends to the
  neighbouring stages (measured gloo P2P), the pipelining machinery (``runtime_microbatch_s``);
  under ZeRO-3 (FSDP2 ``fully_shard``) the dense weights are all-gathered for forward and again
  for backward;
* after the pipeline, per rank: the data-parallel gradient sync (FSDP2 ``replicate``: an
  all-reduce of every gradient, copied into and out of a flat buffer; ZeRO 1–3: reduce-scatter,
  plus an all-gather of the weights for ZeRO 1–2), the tied-embedding all-reduce between the first
  and last stages, AdamW (a loop over tensors on CPU, each op through DTensor when the runtime
  wrapped the parameters: ``dp > 1`` or ``tp > 1``) and the per-step machinery
  (``runtime_step_s``). Nothing of the sync overlaps the backward (FSDP2 reduces after the last
  microbatch), so ``CostOptions.dp_overlap`` is not applied here.

Context parallelism (``cp > 1``; ``runtime/context_parallel.ring_attention``): every rank runs
``s/cp`` tokens of every layer, embedding and head (``context_parallel.sequence_shard_profile``);
attention is the ring's torch math blocks (``compute._ring_block_attention``) and its K/V (and
backward fp32 dK/dV) P2P on gloo is ``cp_comm``, not hidden behind the blocks: gloo moves the bytes
with the same cores. Gradients are synchronised, ZeRO shards and AdamW runs over the ``dp·cp``
ranks holding each parameter (``data_parallel.gradient_mesh``). Sequence parallelism (the Plan's
``sequence_parallel``, tp > 1): the collectives the runtime issues, counted
(``compute.SequenceParallelCounts``), norms and residual adds on ``1/t`` of the tokens.

MoE layers (``moe``): the layer is priced as a dense layer whose MLP is ``imbalance·k`` times
wider (the experts' rows on the busiest rank), plus ``compute.moe_dispatch_part`` (the local
experts at their own row counts, the router, the dispatch's counted ops and copies); each
all-to-all of rows is priced as a gloo all-gather of the same per-rank buffer (both move
``(n−1)/n`` of it into every rank; calibration measures no all-to-all), and the forward's two
small exchanges (row counts, expert ids) at gloo's latency (:data:`EP_SMALL_ALL_TO_ALLS`);
expert parameters are ``÷ ep``, outside ZeRO/FSDP whatever the plan's stage (never gathered,
their optimizer states unsharded), and their gradients all-reduced over the ``dp/ep`` ranks
holding them, tensor by tensor (``ExpertGroups.reduce_gradients``: no flat buffer, one in-place
division).

Where ranks meet (``Sync``: every blocking collective and pipeline send, counted where the runtime
issues it — per layer under tensor parallelism, per ring hop under context parallelism, per MoE
all-to-all, per FSDP2 unit gather under ZeRO-3, per microbatch between pipeline stages, and the
gradient sync and tied-weight all-reduce after the pipeline), each meeting costs, beyond the
collective's measured transfer, the measured ``CpuRates.sync_wait_s`` of a collective that follows
as much work as the stage does between its meetings, among as many busy processes: ranks that
share cores drift apart and every collective waits for the later one, and a rank that blocked is
woken late (``measure.measure_sync_waits``; on a 2-core KVM Xeon 1–2 ms per meeting among 2
processes, up to ~10 ms among 4). The wait goes to the phase of its collective (``tp_comm``,
``cp_comm``, ``ep_comm``, ``dp_comm``, ``pp_comm``). Before it was priced, every tensor-parallel
plan was predicted 14–36 % too fast. A waiting process is blocked in gloo and leaves its core to
the others: the waits of a stage's collectives and sends are its ``StageCost.blocked_s``, and the
processor-sharing simulation lets the other processes compute faster meanwhile
(``shared_cores``: blocked waits); this matters only with more processes than cores. A ring
attention hop's exchange waits stay work: gloo's transport thread moves the bytes on the cores
(``CpuRates.exchange_waits``).

Where measured steps and this model part (``compiled.report()``'s time by phase, measured inside
real steps on gloo ranks; 2 ranks, GPT 4 layers × 128, V 1024, batch 8, at 09:20–09:50 on
2026-12-06 while OTHER USERS kept 1.5–2 of the 2 cores busy, so the sizes are indicative):

* collectives' in-flight time includes waiting for the slower rank: dp2 with full recomputation
  measured dp_comm 0.021/0.025 s (rank 0/1) against 0.003 s priced for the transfers; tp2 measured
  tp_comm 0.049/0.064 s against 0.008 s. Ranks drift apart when they share cores, and every
  collective waits for the later one; the processor-sharing simulation runs the replicas of a
  pipeline rank in lockstep, so it prices none of that wait;
* compute ran slower inside the step than the single-operation rates say: forward 0.043–0.067 s
  measured against 0.026–0.039 s priced (dp2 and tp2), backward +13 % (dp2) to −22 % (tp2);
* under tensor parallelism the QKV and attention-output weight gradients are whole on every rank
  (``compute.DTENSOR_TP``): now priced;
* optimizer: within 6 % (dp2) and −24 % (tp2, AdamW through DTensor).

Memory is ``estimate``'s (``memory.memory_details``, which prices CPU activations with
``local.memory``). Breakdown: the components of the pipeline rank that finishes last, each
stretched by the slowdown it saw from sharing the cores; ``bubble`` is its idle time (pipeline
bubble and waiting).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

from autopar.cost_models.compute import LayerTimes
from autopar.cost_models.context_parallel import sequence_shard_profile
from autopar.cost_models.local.compute import (
    CpuPart,
    Sync,
    embedding_part,
    head_part,
    moe_dispatch_part,
    transformer_layer_part,
)
from autopar.cost_models.local.memory import vocab_parallel
from autopar.cost_models.local.rates import CpuRates
from autopar.cost_models.local.shared_cores import simulate_shared
from autopar.cost_models.moe import ALL_TO_ALLS_PER_LAYER, all_to_all_bytes, expert_params, load_imbalance
from autopar.cost_models.profile import LayerProfile, ModelProfile
from autopar.cost_models.stages import CommTimes, StageCost, comm_s, layer_flops, sends_s

if TYPE_CHECKING:
    from autopar.cost_models.local.profile import LocalProfile
    from autopar.plans import Plan, Predicted

log = logging.getLogger("autopar.cost_models")
_DEFAULT: dict[str, object] = {}


def _default_profile() -> LocalProfile | None:
    """The profile at ``local_profile.default_profile_path()``, reloaded when the file changes;
    an unreadable or outdated file is reported once and ignored."""
    from autopar.cost_models.local.profile import default_profile_path, load_profile

    path = default_profile_path()
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        return None
    if _DEFAULT.get("key") != key:
        try:
            _DEFAULT.update(key=key, profile=load_profile(path))
        except ValueError as error:
            log.warning("ignoring the local profile: %s", error)
            _DEFAULT.update(key=key, profile=None)
    return _DEFAULT["profile"]  # type: ignore[return-value]


def local_rates(plan: Plan, profile: LocalProfile | None = None) -> CpuRates | None:
    """The CPU rates for ``plan`` if it runs on a local cluster (None otherwise): ``profile``'s,
    else the default profile's, else the ASSUMED placeholders."""
    if not plan.cluster.get("local", False):
        return None
    profile = profile if profile is not None else _default_profile()
    return profile.cpu if profile is not None else CpuRates.quick(os.cpu_count() or 1)


def _imbalance(layer: LayerProfile, tokens: int, ep: int) -> float:
    moe = layer.moe
    assert moe is not None
    return load_imbalance(tokens=tokens, num_experts=moe.num_experts, top_k=moe.top_k,
                          capacity_factor=moe.capacity_factor, ep=ep)


def _moe_as_dense(layer: LayerProfile, tokens: int, ep: int) -> LayerProfile:
    """An MoE layer as the dense layer whose MLP is ``imbalance·k`` times wider (module docstring;
    ``compute.moe_dispatch_part`` adds what the experts' own shapes and the dispatch cost)."""
    moe = layer.moe
    if moe is None or layer.ffn_size is None:
        return layer
    scale = moe.top_k * _imbalance(layer, tokens, ep)
    return dataclasses.replace(layer, moe=None, ffn_size=max(1, round(layer.ffn_size * scale)))


def _parts(plan: Plan, profile: ModelProfile, rates: CpuRates) -> list[tuple[CpuPart, float, float, float]]:
    """(CPU part, parameters per device, parameter tensors per device, expert parameters per device)
    of every stage."""
    t, b, last = plan.parallelism.tp, plan.schedule.microbatch_size, len(plan.stages) - 1
    ep, cp, sp = plan.parallelism.ep, plan.parallelism.cp, plan.sequence_parallel
    profile = sequence_shard_profile(profile, cp)  # each cp rank runs s/cp tokens of every layer
    cache: dict[tuple[object, ...], CpuPart] = {}
    result = []
    for stage in plan.stages:
        part, params, tensors, experts, shared = CpuPart(), 0.0, 0.0, 0.0, 0.0
        for layer in profile.layers[stage.layers[0]:stage.layers[1]]:
            key = (layer.flops_fwd, layer.hidden_size, layer.num_heads, layer.ffn_size, layer.seq_len,
                   layer.moe, stage.recompute)
            if key not in cache:
                cache[key] = transformer_layer_part(
                    _moe_as_dense(layer, b * profile.seq_len, ep), rates=rates, microbatch_size=b, tp=t,
                    bytes_per_element=profile.bytes_per_element, recompute=stage.recompute,
                    fused_attention=profile.fused_attention, causal=profile.causal, sequence_parallel=sp,
                    cp=cp)
                if layer.moe is not None and layer.ffn_size is not None:
                    cache[key] += CpuPart(times=moe_dispatch_part(
                        layer, rates=rates, tokens=b * profile.seq_len, ep=ep, recompute=stage.recompute,
                        imbalance=_imbalance(layer, b * profile.seq_len, ep)))
            part, params = part + cache[key], params + layer.param_count
            experts += expert_params(layer)
            shared += layer.moe.shared_params if layer.moe else 0
            tensors += profile.param_tensors(layer)
        if stage.index == 0:
            part += embedding_part(profile, rates=rates, microbatch_size=b, tp=t,
                                   vocab_parallel=vocab_parallel(plan), sequence_parallel=sp)
            params, tensors = params + profile.embedding_params, tensors + profile.embedding_param_tensors
        if stage.index == last:
            part += head_part(profile, rates=rates, microbatch_size=b, tp=t, sequence_parallel=sp,
                              vocab_parallel=vocab_parallel(plan))
            tied = stage.index > 0 and profile.tied_embeddings
            params += profile.head_params + (profile.tied_head_params if tied else 0)
            tensors += profile.head_param_tensors + int(tied)
        per_device = (params - experts - shared) / t + shared + experts / ep if experts else params / t
        result.append((part, per_device, tensors, experts / ep))
    return result


EP_SMALL_ALL_TO_ALLS = 2
"""COUNTED in ``runtime/expert_parallel.AllToAllExperts``: besides the dispatch and combine of
token rows, each MoE layer's forward exchanges the per-rank row counts and the rows' expert ids
(a few bytes per row: priced as gloo latency); the backward exchanges the rows only."""


def _all_to_all_s(plan: Plan, profile: ModelProfile, rates: CpuRates, stage_layers: tuple[int, int]
                  ) -> tuple[float, float]:
    """(forward, backward) all-to-alls of a stage's MoE layers per microbatch (module docstring)."""
    ep, tokens = plan.parallelism.ep, plan.schedule.microbatch_size * profile.seq_len
    sizes = [all_to_all_bytes(layer, tokens=tokens, ep=ep, bytes_per_element=profile.bytes_per_element)
             for layer in profile.layers[stage_layers[0]:stage_layers[1]] if layer.moe is not None]
    rows = sum(ALL_TO_ALLS_PER_LAYER * rates.collective_work_s("all_gather", size, ep) for size in sizes)
    small = sum(EP_SMALL_ALL_TO_ALLS * rates.collective_work_s("all_gather", 8 * tokens, ep)
                for size in sizes if size > 0)
    return rows + small, rows


def _wait_s(rates: CpuRates, processes: int, *, group: int, interval_s: float, size_bytes: float,
            exchange: bool = False) -> float:
    """``CpuRates.sync_wait_s`` (wall clock, measured with every process busy) as work of one
    process running alone, as the processor-sharing simulation takes it (it stretches the work
    back by the share); ``exchange``: a ring attention hop, priced from the pair exchanges'
    measured waits."""
    rate = rates.share(processes)[0]
    return rate * rates.sync_wait_s(processes=processes, group=group, interval_s=interval_s / rate,
                                    size_bytes=size_bytes, exchange=exchange)


def sync_waits(syncs: tuple[Sync, ...], *, rates: CpuRates, processes: int, compute_s: float
               ) -> dict[str, CommTimes]:
    """Per mesh axis, the waits of a stage's ``syncs`` per microbatch (module docstring): each
    collective follows an equal share of the stage's ``compute_s`` (one process alone)."""
    meetings = sum(s.count for s in syncs)
    if not meetings:
        return {}
    interval = compute_s / meetings
    waits: dict[str, dict[str, float]] = {}
    for s in syncs:
        phases = waits.setdefault(s.axis, {"forward": 0.0, "backward": 0.0, "recompute": 0.0})
        phases[s.phase] += s.count * _wait_s(rates, processes, group=s.group, interval_s=interval,
                                             size_bytes=s.size_bytes, exchange=s.axis == "cp")
    return {axis: CommTimes(forward_s=p["forward"], backward_s=p["backward"], recompute_s=p["recompute"])
            for axis, p in waits.items()}


def _stage_syncs(plan: Plan, profile: ModelProfile, stage_layers: tuple[int, int], *, dense_bytes: float
                 ) -> tuple[Sync, ...]:
    """A stage's meetings beyond its layers' own (``CpuPart.syncs``): the MoE all-to-alls among
    ``ep`` ranks and, under ZeRO-3, FSDP2's per-unit weight gathers (forward, and again for the
    backward) among the ``dp·cp`` replicas."""
    par, tokens = plan.parallelism, plan.schedule.microbatch_size * profile.seq_len // plan.parallelism.cp
    layers = profile.layers[stage_layers[0]:stage_layers[1]]
    syncs = []
    for layer in (x for x in layers if x.moe is not None and par.ep > 1):
        rows = all_to_all_bytes(layer, tokens=tokens, ep=par.ep, bytes_per_element=profile.bytes_per_element)
        syncs += [Sync(axis="ep", phase=phase, group=par.ep, size_bytes=size, count=count)
                  for phase, size, count in (("forward", rows, ALL_TO_ALLS_PER_LAYER),
                                             ("forward", 8 * tokens, EP_SMALL_ALL_TO_ALLS),
                                             ("backward", rows, ALL_TO_ALLS_PER_LAYER))]
    replicas, units = par.dp * par.cp, len(layers) + 1  # each layer unit and the stage's root module
    if plan.zero == 3 and replicas > 1 and dense_bytes > 0:
        syncs += [Sync(axis="dp", phase=phase, group=replicas, size_bytes=dense_bytes / units, count=units)
                  for phase in ("forward", "backward")]
    return tuple(syncs)


def cpu_stage_costs(plan: Plan, profile: ModelProfile, rates: CpuRates) -> tuple[StageCost, ...]:
    """Per-microbatch costs of every stage of ``plan`` on one of its processes."""
    par, b = plan.parallelism, plan.schedule.microbatch_size
    boundary = b * profile.seq_len // par.cp * profile.hidden_size * profile.bytes_per_element
    send = rates.collective_work_s("p2p", boundary, 2)
    local = sequence_shard_profile(profile, par.cp)
    costs = []
    for stage, (part, params, _, experts) in zip(plan.stages, _parts(plan, profile, rates), strict=True):
        gather, replicas = 0.0, par.dp * par.cp
        dense_bytes = (params - experts) * profile.bytes_per_element
        if plan.zero == 3 and replicas > 1:  # FSDP2 gathers the dense weights for forward and for backward
            size = dense_bytes
            gather = rates.collective_work_s("all_gather", size, replicas) + rates.copy_s(2 * size)
        flops = b * sum(layer_flops(layer, stage.recompute, local.fused_attention)
                        for layer in local.layers[stage.layers[0]:stage.layers[1]])
        flops += b * (3 * local.embedding_flops_fwd if stage.index == 0 else 0.0)
        if stage.index == len(plan.stages) - 1:
            flops += b * (local.head_flops_fwd + local.head_flops_bwd)
        forward_a2a, backward_a2a = _all_to_all_s(plan, local, rates, stage.layers)
        ep = CommTimes(forward_s=forward_a2a, backward_s=backward_a2a,
                       recompute_s=forward_a2a if stage.recompute == "full" else 0.0)
        comm = {"tp": part.tp, "dp": CommTimes(forward_s=gather, backward_s=gather), "ep": ep, "cp": part.cp}
        t = part.times
        compute_s = t.forward_s + t.backward_s + t.recompute_s
        waits = sync_waits(part.syncs + _stage_syncs(plan, profile, stage.layers, dense_bytes=dense_bytes),
                           rates=rates, processes=plan.world_size, compute_s=compute_s)
        comm = {kind: times + waits.get(kind, CommTimes()) for kind, times in comm.items()}
        # a pipeline send meets the next stage's receive after a stage's forward or backward
        send_waits = [_wait_s(rates, plan.world_size, group=2, interval_s=x, size_bytes=boundary)
                      for x in (t.forward_s, t.backward_s)]
        send_forward, send_backward = (send + w for w in send_waits)
        first, last = stage.index == 0, stage.index == len(plan.stages) - 1
        # blocked: waits at collectives and sends; a ring hop's exchange is gloo's transport thread
        # working (``CpuRates.exchange_waits``), not a process asleep
        blocked = (sum(w.total_s for axis, w in waits.items() if axis != "cp")
                   + (0.0 if last else send_waits[0]) + (0.0 if first else send_waits[1]))
        costs.append(StageCost(
            compute=part.times, comm=comm,
            send_forward_s=0.0 if last else send_forward, send_backward_s=0.0 if first else send_backward,
            params_per_device=params, hardware_flops=flops, blocked_s=blocked,
            overhead_s=rates.runtime_microbatch_s, expert_params_per_device=experts))
    return tuple(costs)


LOSS_BYTES = 4
"""COUNTED in ``runtime/engine.Engine._global_loss``: one float all-reduced over all ranks per step."""


def _dp_sync_s(rates: CpuRates, size_bytes: float, *, dp: int, zero: int) -> float:
    """The gradient sync after the pipeline: each collective, and the copies into and out of its
    flat buffer."""
    def sync_s(kind: str, copies: int) -> float:
        return (rates.collective_work_s(kind, size_bytes, dp, memory_bound=True)
                + rates.copy_s(copies * size_bytes))

    if dp == 1:
        return 0.0
    if zero == 0:
        return sync_s("all_reduce", 4)
    return sync_s("reduce_scatter", 2) + (sync_s("all_gather", 2) if zero < 3 else 0.0)


def _tail_waits_s(plan: Plan, profile: ModelProfile, rates: CpuRates, *, compute: float, units: int,
                  size_bytes: float, tied: bool) -> float:
    """Where a pipeline rank's replicas meet after the pipeline (module docstring): FSDP2
    ``replicate`` all-reduces one flat buffer after the whole backward; FSDP2 ``fully_shard``
    (ZeRO 1–3) reduce-scatters each of the rank's ``units`` (layers and root modules) as the last
    backward reaches it, and under ZeRO 1–2 gathers each in the first forward; the tied
    embedding's all-reduce follows the step; ``compute``: the rank's compute in the step (one
    process alone)."""
    par, processes, m = plan.parallelism, plan.world_size, plan.schedule.num_microbatches
    replicas, waits = par.dp * par.cp, 0.0
    if replicas > 1 and size_bytes > 0 and plan.zero == 0:
        waits += _wait_s(rates, processes, group=replicas, interval_s=compute, size_bytes=size_bytes)
    elif replicas > 1 and size_bytes > 0:
        count = units * (1 if plan.zero == 3 else 2)
        waits += count * _wait_s(rates, processes, group=replicas, interval_s=compute / m / units,
                                 size_bytes=size_bytes / units)
    if tied:
        waits += _wait_s(rates, processes, group=2, interval_s=compute,
                         size_bytes=profile.tied_head_params / par.tp * profile.bytes_per_element)
    return waits


def _tails(plan: Plan, profile: ModelProfile, rates: CpuRates) -> list[tuple[float, float]]:
    """(data-parallel and tied-weight sync, optimizer + per-step machinery) of each pipeline rank."""
    par, parts = plan.parallelism, _parts(plan, profile, rates)
    replicas = par.dp * par.cp  # the flattened dp × cp mesh holds each parameter (``gradient_mesh``)
    wrapped = replicas > 1 or par.tp > 1
    tied_bytes = profile.tied_head_params / par.tp * profile.bytes_per_element
    tied = (rates.collective_work_s("all_reduce", tied_bytes, 2, memory_bound=True)
            if profile.tied_embeddings and par.pp > 1 else 0.0)
    tails = []
    for rank in range(par.pp):
        mine = parts[rank::par.pp]
        params, tensors = sum(p for _, p, _, _ in mine), sum(n for _, _, n, _ in mine)
        experts = sum(e for _, _, _, e in mine)
        sync = _dp_sync_s(rates, (params - experts) * profile.bytes_per_element, dp=replicas, zero=plan.zero)
        holders = replicas // par.ep  # of each expert
        if experts and holders > 1:  # all-reduced in place, whatever the ZeRO stage (module docstring)
            size = experts * profile.bytes_per_element
            sync += (rates.collective_work_s("all_reduce", size, holders, memory_bound=True)
                     + rates.copy_s(size))
        shards = (params - experts) / (replicas if plan.zero >= 1 else 1) + experts
        optimizer = rates.optimizer_s(shards, tensors, dtensor=wrapped) + rates.runtime_step_s
        ends = rank in (0, (len(plan.stages) - 1) % par.pp)
        stages = plan.stages[rank::par.pp]
        units = len(stages) + sum(st.layers[1] - st.layers[0] for st in stages)
        dense_bytes = (params - experts) * profile.bytes_per_element
        step_compute = plan.schedule.num_microbatches * sum(
            p.times.forward_s + p.times.backward_s + p.times.recompute_s for p, _, _, _ in mine)
        sync += _tail_waits_s(plan, profile, rates, compute=step_compute, units=units, size_bytes=dense_bytes,
                              tied=ends and tied > 0)
        # every rank then meets every other: the step's loss is all-reduced over the world
        optimizer += _wait_s(rates, plan.world_size, group=plan.world_size, interval_s=step_compute,
                             size_bytes=LOSS_BYTES)
        tails.append((sync + (tied if ends else 0.0), optimizer))
    return tails


def _blocked(costs: tuple[StageCost, ...], pp: int) -> list[float]:
    """Per pipeline rank, the fraction of its pipeline work blocked waiting for peers."""
    fractions = []
    for rank in range(pp):
        mine = costs[rank::pp]
        work = sum(t.forward_s + t.backward_s + t.backward_weight_s + t.recompute_s + t.send_forward_s
                   + t.send_backward_s for t in (c.times() for c in mine))
        fractions.append(min(1.0, sum(c.blocked_s for c in mine) / work) if work > 0 else 0.0)
    return fractions


def estimate_local(plan: Plan, profile: ModelProfile, rates: CpuRates) -> Predicted:
    """The step of ``plan`` on this machine's cores (module docstring)."""
    from autopar.plans import Predicted

    costs = cpu_stage_costs(plan, profile, rates)
    tails = _tails(plan, profile, rates)
    par, sched = plan.parallelism, plan.schedule
    run = simulate_shared([c.times() for c in costs], schedule=sched.name, pp=par.pp,
                          num_microbatches=sched.num_microbatches, virtual_stages=sched.virtual_stages,
                          tails=[sync + optimizer for sync, optimizer in tails],
                          weights=[par.dp * par.cp * par.tp] * par.pp, rate=lambda busy: rates.share(busy)[0],
                          tail_rate=lambda busy: rates.share(busy)[1], blocked=_blocked(costs, par.pp))
    r, m = run.critical_rank, sched.num_microbatches
    mine = costs[r::par.pp]
    c = sum((x.compute for x in mine), LayerTimes())
    solo = {
        "compute": m * (c.forward_s + c.backward_s + sum(x.overhead_s for x in mine)),
        "recompute": m * c.recompute_s,
        "tp_comm": m * comm_s(mine, "tp"), "pp_comm": m * sends_s(mine),
        "dp_comm": m * comm_s(mine, "dp") + tails[r][0], "optimizer": tails[r][1],
        "ep_comm": m * comm_s(mine, "ep"), "cp_comm": m * comm_s(mine, "cp"),
    }
    stretch = run.busy_s[r] / run.work_s[r] if run.work_s[r] > 0 else 1.0
    breakdown = {k: v * stretch for k, v in solo.items()} | {"bubble": max(0.0, run.total_s - run.busy_s[r])}
    step_s = sum(breakdown.values())
    hardware_flops = par.dp * par.cp * m * sum(x.hardware_flops for x in costs)
    model_flops = plan.global_batch_size * profile.model_flops_per_sequence
    peak = plan.world_size * rates.linear_peak_flops_per_s
    return Predicted(
        step_time_s=step_s, tokens_per_s=plan.global_batch_size * profile.seq_len / step_s,
        tflops_per_device=hardware_flops / (plan.world_size * step_s) / 1e12,
        mfu=min(1.0, model_flops / (peak * step_s)), breakdown=breakdown)
