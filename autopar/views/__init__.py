"""Plan views: the terminal summary, the HTML report, diff, explain, DOT and JSON.

Data flow: a Plan read from JSON (``autopar.plans``) → :func:`build_view` (the plan plus,
when the model can be recovered, the cost model's per-stage numbers and simulated timeline:
``views.profile``, ``views.model``) → one renderer per format (``text``, ``html``, ``dot``,
``summary``) or a comparison/explanation (``diff``, ``explain``). The CLI commands in
``autopar.cli`` (``show``, ``diff``, ``explain``, ``plan``) only parse arguments and call these.
Views never change a Plan and never run user code.
"""

from autopar.views.model import MemoryRow, PlanView, StageRow, build_view

__all__ = ["MemoryRow", "PlanView", "StageRow", "build_view"]
