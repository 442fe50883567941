"""The machine-readable summary of a plan (``autopar show plan.json --format json``).

Data flow: :class:`~autopar.views.model.PlanView` → :func:`summary` → a JSON-able dict with the
numbers the terminal view shows (degrees, per-stage times and memory, breakdown, alternatives,
passes) for scripts and notebooks, laid out per stage and per group of devices.
``per_stage_numbers`` says whether they are the cost model's own, stored in the plan
(``"cost model"``), approximated from the plan's totals (``"approximate"``: a plan that stores
no per-stage predictions) or absent (``"none"``).
"""

from __future__ import annotations

import json
from typing import Any

from autopar import fmt
from autopar.plans.io import JSON_OPTIONS, to_data
from autopar.views.model import PlanView, StageRow


def summary(view: PlanView) -> dict[str, Any]:
    plan = view.plan
    memory = {d: row for row in view.memory for d in row.devices}
    stages = []
    for s in view.stages:
        t, mem = s.times, memory.get(s.devices[0])
        stages.append({
            "index": s.index, "pipeline_rank": s.rank, "virtual_chunk": s.chunk, "layers": list(s.layers),
            "devices": fmt.id_ranges(s.devices), "num_devices": len(s.devices), "recompute": s.recompute,
            "params_per_device": s.params_per_device,
            "forward_s": t.forward_s if t else None,
            "backward_s": t.backward_s + t.backward_weight_s if t else None,
            "recompute_s": t.recompute_s if t else None,
            **_communication(s),
            "memory_bytes": mem.total_bytes if mem else None,
        })
    return {
        "model": plan.model, "cluster": plan.cluster["text"], "num_devices": plan.world_size,
        "device": plan.cluster["device"]["name"], "capacity_bytes": view.capacity_bytes,
        "parallelism": to_data(plan.parallelism), "schedule": to_data(plan.schedule), "zero": plan.zero,
        "mesh": {"axis_names": list(plan.mesh.axis_names), "shape": list(plan.mesh.shape)},
        "global_batch_size": plan.global_batch_size, "seq_len": plan.seq_len,
        "predicted": to_data(plan.predicted),
        "per_stage_numbers": "cost model" if view.exact else "approximate" if any(
            s.times for s in view.stages) else "none", "source": view.source,
        "dtype": plan.predicted.dtype,
        "stages": stages,
        "memory": [{"devices": fmt.id_ranges(r.devices), "num_devices": len(r.devices),
                    "stages": list(r.stages), "parts_bytes": dict(r.parts), "total_bytes": r.total_bytes}
                   for r in view.memory],
        "timeline_s": view.timeline.total_s if view.timeline else None,
        "alternatives": [to_data(a) for a in plan.alternatives],
        "passes": [to_data(p) for p in plan.passes],
    }


def _communication(stage: StageRow) -> dict[str, float | None]:
    p = stage.prediction
    return {"tp_comm_s": p.tp_comm_s if p else None, "ep_comm_s": p.ep_comm_s if p else None,
            "cp_comm_s": p.cp_comm_s if p else None, "dp_comm_s": p.dp_comm_s if p else None,
            "pp_comm_s": p.send_forward_s + p.send_backward_s if p else None}


def render_json(view: PlanView) -> str:
    return json.dumps(summary(view), **JSON_OPTIONS) + "\n"
