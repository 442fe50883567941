"""Per-stage costs: what ``estimate`` and ``cpu_step`` compute for each pipeline stage.

Data flow: the compute and communication models (GPU: ``compute`` and ``comm``; local CPU
clusters: ``cpu_compute``) → :class:`StageCost` per stage and microbatch → the schedule model
(``schedule``, ``simulate``, ``shared_cores``) through :meth:`StageCost.times`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from autopar.cost_models.compute import LayerTimes
from autopar.cost_models.profile import LayerProfile
from autopar.cost_models.schedule import StageTimes

if TYPE_CHECKING:
    from autopar.plans import Plan


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """One stage (model chunk) per microbatch on one of its devices, split by cause.
    ``dp_forward_s``/``dp_backward_s``: data-parallel traffic repeated every microbatch (ZeRO-3
    weight gathers on CPU; 0 in the GPU model, which counts it per step). ``ep_*_s``: the MoE
    layers' all-to-alls (``moe``); ``expert_params_per_device``: the part of
    ``params_per_device`` that is expert parameters (all-reduced over ``dp/ep`` ranks, no ZeRO)."""

    compute: LayerTimes
    tp_forward_s: float
    tp_backward_s: float
    tp_recompute_s: float
    send_forward_s: float
    send_backward_s: float
    params_per_device: float
    hardware_flops: float
    dp_forward_s: float = 0.0
    dp_backward_s: float = 0.0
    overhead_s: float = 0.0
    ep_forward_s: float = 0.0
    ep_backward_s: float = 0.0
    ep_recompute_s: float = 0.0
    expert_params_per_device: float = 0.0

    @property
    def ep_s(self) -> float:
        """All-to-all seconds per microbatch (forward, backward and recomputation)."""
        return self.ep_forward_s + self.ep_backward_s + self.ep_recompute_s

    def times(self) -> StageTimes:
        c = self.compute
        return StageTimes(forward_s=c.forward_s + self.tp_forward_s + self.dp_forward_s + self.overhead_s
                          + self.ep_forward_s,
                          backward_s=c.backward_input_s + self.tp_backward_s + self.dp_backward_s
                          + self.ep_backward_s,
                          backward_weight_s=c.backward_weight_s,
                          recompute_s=c.recompute_s + self.tp_recompute_s + self.ep_recompute_s,
                          send_forward_s=self.send_forward_s, send_backward_s=self.send_backward_s)


def mesh_group(plan: Plan, axis: str) -> tuple[int, ...]:
    """Device ids of the ``axis`` group that contains the mesh's first device."""
    mesh, degree = plan.mesh, getattr(plan.parallelism, axis)
    if axis in mesh.axis_names:
        i = mesh.axis_names.index(axis)
        stride = 1
        for size in mesh.shape[i + 1:]:
            stride *= size
        return tuple(mesh.device_ids[j * stride] for j in range(mesh.shape[i]))
    stride = plan.parallelism.tp if axis == "dp" else 1  # autopar's default layout: tp fastest
    return tuple(j * stride for j in range(degree))


def expert_groups(plan: Plan, devices: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(expert-parallel group, expert-data-parallel group) of the first of a stage's ``devices``
    (listed tp fastest, then dp, as autopar lays them out): ``ep`` consecutive data-parallel ranks,
    and the ``dp/ep`` ranks holding the same experts (the runtime's ``ExpertGroups``)."""
    par = plan.parallelism
    dp_ranks = devices[::par.tp]
    return tuple(dp_ranks[:par.ep]), tuple(dp_ranks[::par.ep])


def layer_flops(layer: LayerProfile, recompute: str, fused_attention: bool) -> float:
    """FLOPs executed for one sequence: forward, backward, and what recomputation repeats."""
    flops = layer.flops_fwd + layer.flops_bwd
    if recompute == "full":
        return flops + layer.flops_fwd
    if recompute == "selective" and layer.is_transformer and not fused_attention:
        return flops + 4 * layer.seq_len * layer.seq_len * layer.hidden_size  # QKᵀ and attention·V
    return flops
