"""``autopar.transform``: a model's graph after graph passes.

Data flow: model + example inputs → ``autopar.lower`` (capture, passes once) → the Program's
transformed, runnable ``fx.GraphModule`` (what ``autopar.compile(..., passes=[...])`` and
``autopar.plan(..., passes=[...])`` build on too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from autopar.lower import lower
from autopar.passes import GraphPass


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
    return lower(model, example_inputs, passes=passes, example_kwargs=example_kwargs, step=step,
                 disabled=disabled).graph_module
