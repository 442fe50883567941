"""Capture: turn an ``nn.Module`` and an example batch into an annotated fx graph.

The first stage of autopar's data flow::

    nn.Module + example inputs ──capture──► Captured(graph_module, layers, totals)

Two front ends: ``torch.fx`` symbolic tracing (``tracer.py``) for plain models and
non-strict ``torch.export`` (``export.py``) for models fx cannot trace (Hugging
Face ``**kwargs`` forwards). ``frontend="auto"`` tries fx, then export. Every node
then gets a :class:`NodeRecord` in ``node.meta["autopar"]`` (``annotate.py``).
Models on the ``meta`` device are captured without allocating their weights.

Layer: above ``cluster``/``config``/``hardware``, below ``plans``, ``models`` and everything else;
``autopar.lower`` calls it once per Program.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from autopar.capture.annotate import annotate
from autopar.capture.batch import normalize_inputs
from autopar.capture.captured import Captured
from autopar.capture.errors import CaptureError, blame, capture_error
from autopar.capture.export import trace_export
from autopar.capture.layers import LayerIndex, LayerInfo
from autopar.capture.record import META_KEY, NodeRecord
from autopar.capture.tracer import AutoparTracer, LeafSpec, check_call, trace_fx

Frontend = Literal["auto", "fx", "export"]
FRONTENDS: tuple[str, ...] = ("auto", "fx", "export")

__all__ = [
    "FRONTENDS", "META_KEY", "AutoparTracer", "CaptureError", "Captured", "LayerInfo",
    "NodeRecord", "capture", "normalize_inputs",
]


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
    frontend: Frontend = "auto",
    leaf_modules: Iterable[LeafSpec] = (),
) -> Captured:
    """Capture ``model`` called as ``model(*example_inputs, **example_kwargs)``.

    Returns a :class:`Captured` whose ``graph_module`` computes what ``model`` does
    and shares its parameters. Raises :class:`CaptureError` (a ``ValueError``)
    naming the module and source line that blocked every front end.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend={frontend!r} is not one of {FRONTENDS}")
    args, kwargs = normalize_inputs(example_inputs), dict(example_kwargs or {})
    leaves = tuple(leaf_modules)
    AutoparTracer(leaves)  # validates the leaf policy before any front end runs
    check_call(model, args, kwargs)
    start = time.perf_counter()
    order = ("fx", "export") if frontend == "auto" else (frontend,)
    blames = []
    for name in order:
        try:
            if name == "fx":
                gm = trace_fx(model, args, kwargs, leaves)
            else:
                gm = trace_export(model, args, kwargs)
        except Exception as err:
            blames.append(blame(name, err, model))
        else:
            return _finish(model, gm, name, args, kwargs, start, tuple(b.describe() for b in blames))
    raise capture_error(model, blames)


def _finish(
    model: nn.Module,
    gm: torch.fx.GraphModule,
    frontend: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    start: float,
    fallbacks: tuple[str, ...],
) -> Captured:
    index = LayerIndex(model, gm)
    notes = annotate(gm, args, kwargs, index)
    return Captured.build(graph_module=gm, model=model, frontend=frontend, example_args=args,
                          example_kwargs=kwargs, layer_index=index, warnings=tuple(fallbacks) + tuple(notes),
                          capture_time_s=time.perf_counter() - start)
