"""``autopar.transform``: capture a model and run graph passes on it.

Data flow: model + example inputs → ``autopar.capture`` → ``autopar.passes.run_passes``
→ the transformed, runnable ``fx.GraphModule`` (shared by every pass issue; also what
``autopar.compile(..., passes=[...])`` and ``autopar.plan(..., passes=[...])`` build on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from autopar.capture import capture
from autopar.passes import GraphPass, PassContext, run_passes


def transform(
    model: nn.Module,
    example_inputs: Any,
    *,
    passes: Sequence[GraphPass],
    example_kwargs: dict[str, Any] | None = None,
    step: int = 0,
    disabled: Sequence[str] = (),
) -> fx.GraphModule:
    """The captured graph of ``model`` after ``passes`` (in order)."""
    captured = capture(model, example_inputs, example_kwargs=example_kwargs)
    ctx = PassContext(captured=captured, step=step, disabled=frozenset(disabled))
    return run_passes(captured.graph_module, list(passes), ctx)
