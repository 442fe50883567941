"""The Plan: what autopar decided for one model on one cluster. A Plan is data.

Data flow: the planner (or ``autopar.compile`` on one device) produces a :class:`Plan`;
the runtime executes it; the CLI views, the HTML report and the benchmarks read it,
from JSON only. Nothing here decides anything, and a hand-written Plan is as good as a
planned one. The root record is defined here; its parts live in ``schema``, JSON and
files in ``io``, and the graph fingerprint that ties a Plan to a model in ``fingerprint``.

Layer: beside ``models``, ``hf`` and ``data``, above ``capture``; every layer above reads Plans.
"""

from autopar.plans.fingerprint import graph_fingerprint
from autopar.plans.io import PlanNotFoundError, check_fingerprint
from autopar.plans.plan import Plan, device_stages
from autopar.plans.schema import (
    BREAKDOWN_KEYS,
    MEMORY_PARTS,
    MESH_AXES,
    SCHEMA_VERSION,
    Alternative,
    AppliedPass,
    CostOptionsUsed,
    MemoryPrediction,
    Mesh,
    Parallelism,
    Predicted,
    Recompute,
    Schedule,
    ScheduleName,
    Sharding,
    Stage,
    StagePrediction,
)

__all__ = [
    "BREAKDOWN_KEYS", "MEMORY_PARTS", "MESH_AXES", "SCHEMA_VERSION", "Alternative", "AppliedPass",
    "CostOptionsUsed",
    "MemoryPrediction", "Mesh", "Parallelism", "Plan", "PlanNotFoundError", "Predicted", "Recompute",
    "Schedule", "ScheduleName", "Sharding", "Stage", "StagePrediction", "check_fingerprint",
    "device_stages", "graph_fingerprint",
]
