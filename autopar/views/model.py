"""The view model: a Plan plus the derived per-stage, per-device and per-rank numbers views draw.

Data flow: Plan (JSON) → :func:`build_view` → :class:`PlanView` → the renderers (``text``,
``html``, ``dot``, ``summary``) and ``explain``. With a recovered profile (``views.profile``)
stage times and parameters come from ``cost_models.stage_costs``, memory from
``cost_models.plan_memory`` (model states, activations, logits, reserve) and the timeline from
``cost_models.simulate_plan`` — the numbers the planner used. Without one, stage times are
the plan's step-time breakdown spread over layers (compute 1 : 2 forward : backward,
communication evenly), memory bars show each device's predicted peak only, and the timeline
simulates those approximate times; ``PlanView.exact`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.cost_models import ModelProfile, StageTimes, Timeline, plan_memory, simulate, simulate_plan
from autopar.cost_models import stage_costs as cost_model_stage_costs
from autopar.plans import Plan
from autopar.views.profile import recover_profile


@dataclass(frozen=True)
class StageRow:
    """One pipeline stage; times are seconds per microbatch on one of its devices."""

    index: int
    rank: int
    chunk: int
    layers: tuple[int, int]
    devices: tuple[int, ...]
    recompute: str
    first_node: str
    last_node: str
    params_per_device: float | None
    times: StageTimes | None

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def span(self) -> str:
        """'0–11', '7' or '—' (no layers: only the embedding or the head)."""
        first, last = self.layers[0], self.layers[1] - 1
        return "—" if last < first else str(first) if last == first else f"{first}–{last}"


@dataclass(frozen=True)
class MemoryRow:
    """Devices that hold the same stages and the same bytes; ``parts`` stack to ``total_bytes``."""

    devices: tuple[int, ...]
    stages: tuple[int, ...]
    parts: tuple[tuple[str, float], ...]
    total_bytes: float


@dataclass(frozen=True)
class PlanView:
    plan: Plan
    profile: ModelProfile | None
    source: str
    stages: tuple[StageRow, ...]
    memory: tuple[MemoryRow, ...]
    capacity_bytes: int
    timeline: Timeline | None

    @property
    def exact(self) -> bool:
        """True when the numbers are the cost model's own, False when approximated."""
        return self.profile is not None

    def stage_of_layer(self, layer: int) -> StageRow | None:
        return next((s for s in self.stages if s.layers[0] <= layer < s.layers[1]), None)


def build_view(plan: Plan, *, timeline: bool = True, profile: ModelProfile | None = None) -> PlanView:
    """Derive everything the views show; ``timeline=False`` skips the simulation."""
    if profile is not None:
        source = "cost model re-run on the given profile"
    else:
        recovered = recover_profile(plan)
        profile, source = recovered.profile, recovered.note
    times, params = _stage_numbers(plan, profile)
    pp = plan.parallelism.pp
    stages = tuple(
        StageRow(index=s.index, rank=s.index % pp, chunk=s.index // pp, layers=s.layers, devices=s.devices,
                 recompute=s.recompute, first_node=s.first_node, last_node=s.last_node,
                 params_per_device=params[s.index] if params else None,
                 times=times[s.index] if times else None)
        for s in plan.stages)
    return PlanView(plan=plan, profile=profile, source=source, stages=stages,
                    memory=_memory_rows(plan, profile),
                    capacity_bytes=int(plan.cluster["device"]["memory_bytes"]),
                    timeline=_timeline(plan, profile, times) if timeline else None)


def _stage_numbers(plan: Plan, profile: ModelProfile | None
                   ) -> tuple[list[StageTimes] | None, list[float] | None]:
    if profile is not None:
        costs = cost_model_stage_costs(plan, profile)
        return [c.times() for c in costs], [c.params_per_device for c in costs]
    return approximate_stage_times(plan), None


def approximate_stage_times(plan: Plan) -> list[StageTimes] | None:
    """Per-stage times from ``plan.predicted.breakdown`` alone (see the module docstring)."""
    parts = plan.predicted.breakdown_dict()
    pp, m = plan.parallelism.pp, plan.schedule.num_microbatches
    held = [0] * pp
    for stage in plan.stages:
        held[stage.index % pp] += stage.layers[1] - stage.layers[0]
    busiest = max(held)
    if not parts or busiest == 0:
        return None
    per_layer = parts.get("compute", 0.0) / (m * busiest)
    tp_per_layer = parts.get("tp_comm", 0.0) / (m * busiest)
    recomputed = max((sum(s.layers[1] - s.layers[0] for s in plan.stages[r::pp] if s.recompute != "none")
                      for r in range(pp)), default=0)
    recompute_per_layer = parts.get("recompute", 0.0) / (m * recomputed) if recomputed else 0.0
    send = parts.get("pp_comm", 0.0) / (2 * m * max(1, len(plan.stages[0::pp]))) if pp > 1 else 0.0
    split = plan.schedule.name == "zero_bubble"
    result = []
    for stage in plan.stages:
        n = stage.layers[1] - stage.layers[0]
        backward = n * (2 * per_layer / 3 + tp_per_layer / 2)
        result.append(StageTimes(
            forward_s=n * (per_layer / 3 + tp_per_layer / 2),
            backward_s=backward / 2 if split else backward, backward_weight_s=backward / 2 if split else 0.0,
            recompute_s=n * recompute_per_layer if stage.recompute != "none" else 0.0,
            send_forward_s=send if stage.index < len(plan.stages) - 1 else 0.0,
            send_backward_s=send if stage.index > 0 else 0.0))
    return result


def _timeline(plan: Plan, profile: ModelProfile | None, times: list[StageTimes] | None) -> Timeline | None:
    if profile is not None:
        return simulate_plan(plan, profile)
    if times is None:
        return None
    sched = plan.schedule
    return simulate(times, schedule=sched.name, pp=plan.parallelism.pp,
                    num_microbatches=sched.num_microbatches, virtual_stages=sched.virtual_stages)


def _memory_rows(plan: Plan, profile: ModelProfile | None) -> tuple[MemoryRow, ...]:
    held: list[list[int]] = [[] for _ in range(plan.world_size)]
    for stage in plan.stages:
        for device in stage.devices:
            held[device].append(stage.index)
    if profile is not None:
        parts = [(("model states", m.model_states_bytes), ("activations", m.activations_bytes),
                  ("logits", m.logits_bytes), ("reserve", m.reserve_bytes))
                 for m in plan_memory(plan, profile)]
    elif plan.predicted.peak_memory_bytes is not None:
        parts = [(("peak", float(p)),) for p in plan.predicted.peak_memory_bytes]
    else:
        return ()
    groups: dict[tuple[object, ...], list[int]] = {}
    for device, (stages, stack) in enumerate(zip(held, parts, strict=True)):
        groups.setdefault((tuple(stages), stack), []).append(device)
    rows = [MemoryRow(devices=tuple(devices), stages=stages, parts=stack,
                      total_bytes=sum(value for _, value in stack))
            for (stages, stack), devices in groups.items()]
    return tuple(sorted(rows, key=lambda row: row.devices[0]))
