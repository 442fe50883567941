"""Plan views: the terminal summary, the HTML report, diff, explain, DOT and JSON.

Data flow: a Plan read from JSON (``autopar.plans``) → :func:`build_view` (the plan plus the
per-stage numbers, memory breakdown and simulated timeline drawn from what the cost model stored
in ``plan.predicted``: ``views.model``) → one renderer per format (``text``, ``html``, ``dot``,
``summary``) or a comparison/explanation (``diff``, ``explain``). The CLI commands in
``autopar.cli`` (``show``, ``diff``, ``explain``, ``plan``) only parse arguments and call these.
Views never change a Plan, never run user code, never rebuild a model and never import
``autopar.models``, ``autopar.capture`` or ``autopar.passes``.

Layer: below ``cli`` only; reads ``plans``, ``cost_models`` (the timeline simulation) and ``fmt``.
"""

from autopar.views.model import MemoryRow, PlanView, StageRow, build_view

__all__ = ["MemoryRow", "PlanView", "StageRow", "build_view"]
