"""Per-stage costs: what ``estimate`` and ``cpu_step`` compute for each pipeline stage.

Data flow: the compute and communication models (GPU: ``compute`` and ``comm``; local CPU
clusters: ``cpu_compute``) → :class:`StageCost` per stage and microbatch → the schedule model
(``schedule``, ``simulate``, ``shared_cores``) through :meth:`StageCost.times`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from autopar.cost_models.compute import LayerTimes
from autopar.cost_models.profile import LayerProfile
from autopar.cost_models.schedule import StageTimes

if TYPE_CHECKING:
    from autopar.plans import Plan


COMM_KINDS = ("tp", "dp", "ep", "cp")
"""The collectives priced inside a microbatch: tensor-parallel all-reduces/gathers (reduce-scatters
and all-gathers under sequence parallelism), data-parallel traffic repeated every microbatch (ZeRO-3
weight gathers on CPU; the GPU model counts dp per step), the MoE layers' all-to-alls (``moe``) and
the ring attention's K/V transfers left exposed beside its block compute (``context_parallel``)."""


@dataclass(frozen=True, kw_only=True)
class CommTimes:
    """Seconds of one kind of collective per microbatch, by the phase that waits for it."""

    forward_s: float = 0.0
    backward_s: float = 0.0
    recompute_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s + self.recompute_s

    def __add__(self, other: CommTimes) -> CommTimes:
        return CommTimes(forward_s=self.forward_s + other.forward_s,
                         backward_s=self.backward_s + other.backward_s,
                         recompute_s=self.recompute_s + other.recompute_s)


NO_COMM = CommTimes()


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """One stage (model chunk) per microbatch on one of its devices, split by cause: ``compute``,
    ``comm[kind]`` for each of :data:`COMM_KINDS` it has, the pipeline sends and the runtime's
    per-microbatch ``overhead_s``. ``expert_params_per_device``: the part of ``params_per_device``
    that is expert parameters (all-reduced over ``dp/ep`` ranks, no ZeRO). ``blocked_s`` (local CPU
    clusters): the part of the comm and sends that is waiting for peers at collectives (the measured
    sync waits), during which the process leaves its core to the others."""

    compute: LayerTimes
    comm: Mapping[str, CommTimes] = field(default_factory=dict)
    send_forward_s: float = 0.0
    send_backward_s: float = 0.0
    overhead_s: float = 0.0
    params_per_device: float
    expert_params_per_device: float = 0.0
    hardware_flops: float
    blocked_s: float = 0.0

    def __post_init__(self) -> None:
        assert set(self.comm) <= set(COMM_KINDS), f"unknown collective kinds {sorted(self.comm)}"

    def comm_of(self, kind: str) -> CommTimes:
        """The ``kind`` collectives' seconds (zeros when the stage has none)."""
        return self.comm.get(kind, NO_COMM)

    def times(self) -> StageTimes:
        c, comm = self.compute, sum(self.comm.values(), NO_COMM)
        return StageTimes(forward_s=c.forward_s + comm.forward_s + self.overhead_s,
                          backward_s=c.backward_input_s + comm.backward_s,
                          backward_weight_s=c.backward_weight_s,
                          recompute_s=c.recompute_s + comm.recompute_s,
                          send_forward_s=self.send_forward_s, send_backward_s=self.send_backward_s)


def comm_s(costs: Iterable[StageCost], kind: str) -> float:
    """All ``kind`` collective seconds of ``costs`` per microbatch."""
    return sum(cost.comm_of(kind).total_s for cost in costs)


def sends_s(costs: Iterable[StageCost]) -> float:
    """Pipeline send seconds of ``costs`` per microbatch, both directions."""
    return sum(cost.send_forward_s + cost.send_backward_s for cost in costs)


def exchange_times(all_to_all_s: float, recompute: str) -> CommTimes:
    """An MoE stage's all-to-alls: the same in forward and backward, again when fully recomputed."""
    return CommTimes(forward_s=all_to_all_s, backward_s=all_to_all_s,
                     recompute_s=all_to_all_s if recompute == "full" else 0.0)


def mesh_group(plan: Plan, *axes: str) -> tuple[int, ...]:
    """Device ids of the group spanning ``axes`` (one or more mesh axes, e.g. ``"dp", "cp"``: the
    ranks holding the same parameters) that contains the mesh's first device, listed row-major
    (the first axis slowest). An axis a mesh lacks (a cp axis in meshes of schema version 2) has
    the Parallelism's degree laid out as autopar's default: tp fastest, then dp."""
    mesh, par = plan.mesh, plan.parallelism
    flat = [0]
    for axis in (axis for axis in axes if axis in mesh.axis_names):
        i = mesh.axis_names.index(axis)
        stride = math.prod(mesh.shape[i + 1:])
        flat = [f + j * stride for f in flat for j in range(mesh.shape[i])]
    ids = [mesh.device_ids[f] for f in flat]
    for axis in (axis for axis in axes if axis not in mesh.axis_names):
        stride = par.tp if axis == "dp" else 1
        ids = [d + j * stride for d in ids for j in range(getattr(par, axis))]
    return tuple(ids)


def expert_groups(plan: Plan, devices: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(expert-parallel group, expert-data-parallel group) of the first of a stage's ``devices``
    (listed tp fastest, then cp, then dp, as autopar lays them out): ``ep`` consecutive
    data-parallel ranks of one cp slice, and the ``dp/ep × cp`` ranks holding the same experts (the
    runtime's ``ExpertGroups``; cp ranks replicate the experts and reduce their gradients too)."""
    par = plan.parallelism
    cp = par.cp
    slices = [devices[c * par.tp::par.tp * cp] for c in range(cp)]  # each cp slice's dp ranks
    return tuple(slices[0][:par.ep]), tuple(sorted(d for ranks in slices for d in ranks[::par.ep]))


def layer_flops(layer: LayerProfile, recompute: str, fused_attention: bool) -> float:
    """FLOPs executed for one sequence: forward, backward, and what recomputation repeats."""
    flops = layer.flops_fwd + layer.flops_bwd
    if recompute == "full":
        return flops + layer.flops_fwd
    if recompute == "selective" and layer.is_transformer and not fused_attention:
        return flops + 4 * layer.seq_len * layer.seq_len * layer.hidden_size  # QKᵀ and attention·V
    return flops
