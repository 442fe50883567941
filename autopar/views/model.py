"""The view model: a Plan plus the per-stage, per-device and per-rank numbers views draw.

Data flow: Plan (JSON) → :func:`build_view` → :class:`PlanView` → the renderers (``text``,
``html``, ``dot``, ``summary``) and ``explain``. Every number comes from the plan itself: stage
times, their communication parts and parameters from ``plan.predicted.stages``, memory by
category from ``plan.predicted.memory``, and the timeline from ``cost_models.simulate_predicted``
on the stored stage times — what the cost model priced when the plan was made. A plan that stores
no per-stage predictions (a file older than schema version 2, or a hand-written plan) gets stage
times spread from its step-time breakdown (compute 1 : 2 forward : backward, communication
evenly) and memory bars of each device's predicted peak only, and says so (``PlanView.exact``,
``PlanView.source``); so does a plan whose stored numbers do not fit its own stages (an edited
plan). Views never rebuild a model or re-run the cost model.
"""

from __future__ import annotations

from dataclasses import dataclass

from autopar.cost_models import StageTimes, Timeline, simulate
from autopar.cost_models.simulate import simulate_predicted, stored_stage_times
from autopar.plans import Plan, StagePrediction, device_stages

MEMORY_NAMES = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer states",
                "activations": "activations", "logits": "logits", "reserve": "reserve"}
APPROXIMATE = ("the plan stores no per-stage predictions (a plan file older than schema version 2, or "
               "written by hand); per-stage numbers approximated from the plan's totals — re-plan with "
               "`autopar plan` for the cost model's own")


@dataclass(frozen=True)
class StageRow:
    """One pipeline stage; times are seconds per microbatch on one of its devices. ``prediction``
    is what the plan stores for it (None when it stores nothing per stage)."""

    index: int
    rank: int
    chunk: int
    layers: tuple[int, int]
    devices: tuple[int, ...]
    recompute: str
    first_node: str
    last_node: str
    times: StageTimes | None
    prediction: StagePrediction | None = None

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def params_per_device(self) -> float | None:
        return None if self.prediction is None else self.prediction.params_per_device

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
    """``exact``: the per-stage numbers are the cost model's, stored in the plan (not approximated)."""

    plan: Plan
    source: str
    exact: bool
    stages: tuple[StageRow, ...]
    memory: tuple[MemoryRow, ...]
    timeline: Timeline | None

    @property
    def capacity_bytes(self) -> int:
        """One device's memory, as the plan's cluster states it."""
        return int(self.plan.cluster["device"]["memory_bytes"])

    def stage_of_layer(self, layer: int) -> StageRow | None:
        return next((s for s in self.stages if s.layers[0] <= layer < s.layers[1]), None)


def build_view(plan: Plan, *, timeline: bool = True) -> PlanView:
    """Derive everything the views show from ``plan``; ``timeline=False`` skips the simulation."""
    stored = plan.predicted.stages if len(plan.predicted.stages) == len(plan.stages) else ()
    times = stored_stage_times(plan) if stored else approximate_stage_times(plan)
    pp = plan.parallelism.pp
    stages = tuple(
        StageRow(index=s.index, rank=s.index % pp, chunk=s.index // pp, layers=s.layers, devices=s.devices,
                 recompute=s.recompute, first_node=s.first_node, last_node=s.last_node,
                 times=times[s.index] if times else None, prediction=stored[s.index] if stored else None)
        for s in plan.stages)
    memory, memory_note = _memory_rows(plan)
    return PlanView(plan=plan, source=_source(plan) + memory_note, exact=bool(stored), stages=stages,
                    memory=memory, timeline=_timeline(plan, times, exact=bool(stored)) if timeline else None)


def _source(plan: Plan) -> str:
    predicted = plan.predicted
    if predicted.stages and len(predicted.stages) == len(plan.stages):
        priced = f" ({predicted.dtype} training)" if predicted.dtype else ""
        return f"the cost model's, stored in the plan{priced}"
    if predicted.step_time_s is None:
        return "the plan stores no predictions"
    if predicted.stages:
        return (f"the plan's {len(predicted.stages)} per-stage predictions do not match its "
                f"{len(plan.stages)} stages (an edited plan); per-stage numbers approximated from the "
                "plan's totals")
    return APPROXIMATE


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


def _timeline(plan: Plan, times: list[StageTimes] | None, *, exact: bool) -> Timeline | None:
    if exact:
        return simulate_predicted(plan)
    if times is None:
        return None
    sched = plan.schedule
    return simulate(times, schedule=sched.name, pp=plan.parallelism.pp,
                    num_microbatches=sched.num_microbatches, virtual_stages=sched.virtual_stages)


def _memory_rows(plan: Plan) -> tuple[tuple[MemoryRow, ...], str]:
    """Rows of devices with the same stages and bytes, and a note when only peaks can be shown."""
    held, predicted = device_stages(plan), plan.predicted
    peaks, stored = predicted.peak_memory_bytes, {m.stages: m for m in predicted.memory}
    if peaks is None:
        return (), ""
    if stored and all(s in stored and stored[s].peak_bytes == p for s, p in zip(held, peaks, strict=True)):
        parts = [tuple((MEMORY_NAMES[k], v) for k, v in stored[s].parts().items()) for s in held]
        note = ""
    else:
        parts = [(("peak", float(p)),) for p in peaks]
        note = ("" if not predicted.stages else
                "; memory bars show each device's peak only: " + (
                    "the plan's memory breakdown does not match its stages and peaks (priced on another "
                    "profile, e.g. random-LTD's full length, or edited)" if stored else
                    "the plan stores no memory breakdown"))
    groups: dict[tuple[object, ...], list[int]] = {}
    for device, key in enumerate(zip(held, parts, map(float, peaks), strict=True)):
        groups.setdefault(key, []).append(device)
    rows = [MemoryRow(devices=tuple(devices), stages=stages, parts=stack, total_bytes=total)
            for (stages, stack, total), devices in groups.items()]
    return tuple(sorted(rows, key=lambda row: row.devices[0])), note


def communication_s(stage: StageRow) -> tuple[tuple[str, float], ...] | None:
    """A stage's communication per microbatch by kind — ``tp``, ``ep`` (MoE all-to-all), ``cp``
    (ring attention), ``dp`` and ``p2p`` (sends) — nonzero kinds only; None when the plan stores no
    per-stage numbers."""
    p = stage.prediction
    if p is None:
        return None
    parts = (("tp", p.tp_comm_s), ("ep", p.ep_comm_s), ("cp", p.cp_comm_s), ("dp", p.dp_comm_s),
             ("p2p", p.send_forward_s + p.send_backward_s))
    return tuple((kind, value) for kind, value in parts if value)
