"""The pass runner: applies a list of graph passes to a captured graph, in order.

Data flow: ``autopar.capture`` → ``Captured.graph_module`` → :func:`run_passes`
(each pass a ``*_pass(gm, ctx) -> gm`` behind a small config object) → the
transformed graph that the cost model, planner and runtime read. Every pass is
logged with its number and time; a pass can be disabled by name; a failure is
re-raised naming the pass and the passes that ran before it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import fx

log = logging.getLogger("autopar.passes")


@runtime_checkable
class GraphPass(Protocol):
    """A configured pass: a ``name`` and ``apply(gm, ctx) -> gm``."""

    name: str

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule: ...


@runtime_checkable
class PricedPass(Protocol):
    """A pass that changes what a step costs beyond what the transformed graph's annotations say
    (random-LTD: layers run on a fraction of their tokens on average over its schedule).
    ``autopar.lower`` calls ``time_profile`` once, after the passes ran, to get the profile the
    planner prices time with; memory is priced on the unchanged profile."""

    def time_profile(self, profile: Any, gm: fx.GraphModule) -> Any: ...


def time_profile(profile: Any, gm: fx.GraphModule, passes: Iterable[GraphPass]) -> Any:
    """``profile`` as the passes that ran on ``gm`` change the time of a step (in pass order)."""
    for graph_pass in passes:
        if isinstance(graph_pass, PricedPass):
            profile = graph_pass.time_profile(profile, gm)
    return profile


@dataclass
class PassContext:
    """What passes may read (the capture) and write (records of what they did).

    ``captured`` is the ``autopar.capture.Captured`` the graph came from; ``step`` the
    training step (passes with schedules read it); ``disabled`` names passes to skip;
    ``applied`` collects ``(name, config dict, seconds)`` in order, for the Plan.
    """

    captured: Any = None
    step: int = 0
    disabled: frozenset[str] = frozenset()
    applied: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)


class PassError(RuntimeError):
    """A pass failed; the message names it and the passes that ran before it."""


def _config(graph_pass: GraphPass) -> dict[str, Any]:
    if dataclasses.is_dataclass(graph_pass):
        return {f.name: getattr(graph_pass, f.name) for f in dataclasses.fields(graph_pass)
                if not f.name.startswith("_")}
    return {}


def check_passes(passes: Iterable[Any]) -> list[GraphPass]:
    """Validate a user's ``passes=[...]`` list."""
    checked = []
    for item in passes:
        if not isinstance(item, GraphPass):
            raise TypeError(f"passes must be autopar.passes objects such as autopar.passes.RandomLTD(...), "
                            f"got {type(item).__name__}")
        checked.append(item)
    names = [p.name for p in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"each pass may appear once, got {names}")
    return checked


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass], ctx: PassContext) -> fx.GraphModule:
    """Apply ``passes`` in order; each returns the (possibly new) graph module."""
    ran: list[str] = []
    for number, graph_pass in enumerate(check_passes(passes), start=1):
        if graph_pass.name in ctx.disabled:
            log.info("pass %d %s: disabled", number, graph_pass.name)
            continue
        start = time.perf_counter()
        try:
            gm = graph_pass.apply(gm, ctx)
        except Exception as err:
            before = ", ".join(ran) or "none"
            raise PassError(f"pass {number} ({graph_pass.name}) failed: {err} "
                            f"[passes that ran before it: {before}]") from err
        seconds = time.perf_counter() - start
        log.info("pass %d %s: %.3f s", number, graph_pass.name, seconds)
        ctx.applied.append((graph_pass.name, _config(graph_pass), seconds))
        ran.append(graph_pass.name)
    gm.graph.lint()
    return gm
