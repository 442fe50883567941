"""The planner: policy only — it returns a Plan, it applies nothing.

Layer: above ``passes`` and ``cost_models``, below ``runtime`` (which never imports it) and
``plan_api``, which calls :func:`search` on a lowered ``Program``.

Data flow: ``autopar.lower`` captures the model, runs its graph passes and summarizes it as a
``ModelProfile``; the intra-op solver (``intra_op``, Alpa's ILP over the captured graph) picks
each node's tensor-parallel strategy per tp degree; :func:`search` walks the space of
``space.candidates`` (dp × tp × pp,
schedule, microbatching, ZeRO) in increasing order of ``bounds.step_lower_bound_s``, solves
each configuration's stage split and per-stage recomputation exactly (``inter_op``, a dynamic
program over costs probed from ``autopar.cost_models``: ``probes``), lays the result out as a
Plan (``build_plan``), estimates it and keeps the fastest that fits, with the runner-ups and, when
nothing fits, the binding constraint (``explain``).
"""

from autopar.planner.build_plan import PlanContext, build_plan
from autopar.planner.explain import InfeasiblePlanError
from autopar.planner.inter_op import Split, solve_split
from autopar.planner.intra_op import IntraOpOptions, IntraOpPlan, intra_op_problem, solve_intra_op
from autopar.planner.search import SearchResult, search
from autopar.planner.space import Config, candidates

__all__ = ["Config", "InfeasiblePlanError", "IntraOpOptions", "IntraOpPlan", "PlanContext", "SearchResult",
           "Split", "build_plan", "candidates", "intra_op_problem", "search", "solve_intra_op", "solve_split"]
