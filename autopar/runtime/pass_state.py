"""Run-time state of graph passes in a compiled model: step, train/eval, checkpoints.

Data flow: ``autopar.compile(model, cluster, passes=[...])`` → every capture runs the passes
(``autopar.passes.run_passes``); a pass with run-time state installs a module at
``gm.<pass name>`` (random-LTD: ``gm.random_ltd``) → :class:`PassStates` collects those modules
over the model's captures, moves them to the compiled model's step before each step (the
runtime's :class:`~autopar.runtime.engine.Engine` too, telling each data-parallel shard where its
samples start), counts the step after it, switches them with ``train()``/``eval()``, and hands
their state (plain ints: JSON-able) to ``compiled.state_dict()`` and ``autopar.save``.

``autopar run --random-ltd ... --moe ...`` hands passes to the script's ``autopar.compile`` calls
through the environment variable :data:`PASSES_ENV` (JSON, see :func:`passes_to_json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import fx

from autopar.passes import FusedAttention, GraphPass, MoE, RandomLTD, check_passes

PASSES_ENV = "AUTOPAR_PASSES"
STATE_PREFIX = "passes."  # pass state in a single-device ``compiled.state_dict()``
# pass name → config class, for JSON
PASS_TYPES: dict[str, type] = {RandomLTD.name: RandomLTD, FusedAttention.name: FusedAttention, MoE.name: MoE}


@runtime_checkable
class PassRuntime(Protocol):
    """What a pass installs at ``gm.<pass name>`` when it has run-time state."""

    training: bool

    def set_step(self, step: int, *, first_sample: int = 0) -> None: ...

    def advance(self, batch_size: int) -> None: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


def pass_runtimes(gm: fx.GraphModule, names: Iterable[str]) -> dict[str, PassRuntime]:
    """The run-time modules that the passes ``names`` installed in ``gm``."""
    found = {name: getattr(gm, name, None) for name in names}
    return {name: module for name, module in found.items() if isinstance(module, PassRuntime)}


class PassStates:
    """The pass run-time modules of one compiled model, kept in step over all its captures.

    Each capture has its own modules (a capture per input signature and train/eval mode);
    the one that ran a step counts it (:meth:`end_step`) and the others copy its state.
    State loaded before the first capture waits for it.
    """

    def __init__(self) -> None:
        self._runtimes: dict[str, list[PassRuntime]] = {}
        self._pending: dict[str, dict[str, int]] = {}
        self._step: tuple[int, int] = (0, 0)
        self._training = True

    def attach(self, gm: fx.GraphModule, names: Iterable[str]) -> None:
        """Adopt the run-time modules a capture's passes installed in ``gm``."""
        for name, runtime in pass_runtimes(gm, names).items():
            group = self._runtimes.setdefault(name, [])
            if any(r is runtime for r in group):
                continue
            if group:
                runtime.load_state_dict(group[0].state_dict())
            elif name in self._pending:
                runtime.load_state_dict(self._pending.pop(name))
            runtime.train(self._training)
            group.append(runtime)

    def begin_step(self, step: int, *, first_sample: int = 0) -> None:
        """Before a training step: every module to ``step``; this rank's samples start at
        ``first_sample`` of the global batch (its data-parallel shard's offset)."""
        self._step = (step, first_sample)
        self.restart_step()

    def restart_step(self) -> None:
        """Forget the calls made since :meth:`begin_step` (torch's pipeline shape inference
        runs the stages once before the microbatches)."""
        for runtime in self._all():
            runtime.set_step(self._step[0], first_sample=self._step[1])

    def end_step(self, gm: fx.GraphModule, batch_size: int) -> None:
        """After a step that ``gm`` ran on ``batch_size`` sequences (the global batch)."""
        for name, runtime in pass_runtimes(gm, self._runtimes).items():
            runtime.advance(batch_size)
            state = runtime.state_dict()
            for other in self._runtimes[name]:
                if other is not runtime:
                    other.load_state_dict(state)

    def train(self, mode: bool) -> None:
        self._training = mode
        for runtime in self._all():
            runtime.train(mode)

    def state_dict(self) -> dict[str, dict[str, int]]:
        """Pass name → its state (ints), for checkpoints."""
        states = {name: dict(group[0].state_dict()) for name, group in self._runtimes.items()}
        return {**{k: dict(v) for k, v in self._pending.items()}, **states}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        for name, state in states.items():
            clean = {key: int(value) for key, value in state.items()}
            group = self._runtimes.get(name)
            if group:
                for runtime in group:
                    runtime.load_state_dict(clean)
            else:
                self._pending[name] = clean

    def _all(self) -> list[PassRuntime]:
        return [runtime for group in self._runtimes.values() for runtime in group]


def pass_state_tensors(states: Mapping[str, Mapping[str, int]], *, prefix: str = ""
                       ) -> dict[str, torch.Tensor]:
    """``{"<prefix>passes.<pass>.<key>": int64 scalar}`` for a module state dict."""
    return {f"{prefix}{STATE_PREFIX}{name}.{key}": torch.tensor(value, dtype=torch.int64)
            for name, state in states.items() for key, value in state.items()}


def split_pass_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """A state dict without its ``passes.*`` entries, and those entries as pass name → state."""
    rest = {k: v for k, v in state_dict.items() if not k.startswith(STATE_PREFIX)}
    states: dict[str, dict[str, int]] = {}
    for key, value in state_dict.items():
        if key.startswith(STATE_PREFIX):
            name, _, field = key[len(STATE_PREFIX):].partition(".")
            states.setdefault(name, {})[field] = state_int(key, value)
    return rest, states


def state_int(key: str, value: Any) -> int:
    """A pass-state entry: an int >= 0 that fits int64, given as an int or a one-element integer
    tensor (what ``compiled.state_dict()`` writes)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        value = int(value.item())
    if type(value) is not int or not 0 <= value < 2**63:
        shown = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(
            value, torch.Tensor) else " ".join(repr(value).split())[:60]
        raise ValueError(f"state entry {key} = {shown} is invalid: expected an int >= 0 (a one-element "
                         "int64 tensor, as compiled.state_dict() writes)")
    return value


def resolve_passes(passes: Sequence[GraphPass] | None) -> list[GraphPass]:
    """``autopar.compile``'s ``passes=``, or those ``autopar run --random-ltd ...`` handed over
    (only when ``passes`` is None)."""
    handed = passes_from_env()
    if passes is None:
        return handed or []
    if isinstance(passes, GraphPass):
        raise TypeError(f"passes must be a list of passes, e.g. passes=[{type(passes).__name__}(...)]")
    checked = check_passes(passes)
    if handed:
        raise ValueError(f"the script compiles with passes={[p.name for p in checked]} and `autopar run` "
                         f"hands over {[p.name for p in handed]} too: drop the pass options of autopar run, "
                         "or let the script call autopar.compile without passes=")
    return checked


def passes_to_json(passes: Sequence[GraphPass]) -> str:
    """``[{"name": ..., <config fields>}, ...]`` for :data:`PASSES_ENV`."""
    items = []
    for graph_pass in check_passes(passes):
        if graph_pass.name not in PASS_TYPES or not dataclasses.is_dataclass(graph_pass):
            raise ValueError(f"pass {graph_pass.name!r} cannot be handed to other processes: known passes "
                             f"are {sorted(PASS_TYPES)}")
        config = {f.name: getattr(graph_pass, f.name) for f in dataclasses.fields(graph_pass)}
        items.append({"name": graph_pass.name, **config})
    return json.dumps(items)


def passes_from_json(text: str) -> list[GraphPass]:
    """The passes :func:`passes_to_json` wrote."""
    try:
        items = json.loads(text)
    except ValueError as err:  # JSONDecodeError, or an int of more digits than Python converts
        raise ValueError(f"{PASSES_ENV} holds no JSON ({err}); it is set by `autopar run --random-ltd ...`, "
                         "unset it or let autopar run set it") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                              for i in items):
        raise ValueError(f"{PASSES_ENV} must be a JSON list of objects with a \"name\", got {text[:80]!r}")
    passes = []
    for item in items:
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in item.items() if k != "name"}
        cls = PASS_TYPES.get(item["name"])
        if cls is None:
            raise ValueError(f"{PASSES_ENV} names pass {item['name']!r}; known passes are "
                             f"{sorted(PASS_TYPES)}")
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(cls)})
        try:
            if unknown:
                raise ValueError(f"unknown option(s) {unknown}")
            passes.append(cls(**config))
        except (TypeError, ValueError, OverflowError) as err:  # OverflowError: an int no float holds
            raise ValueError(f"{PASSES_ENV} holds an invalid {item['name']} pass: {err}; it is set by "
                             "`autopar run --moe/--random-ltd`: unset it or let autopar run set it") from None
    try:
        return check_passes(passes)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{PASSES_ENV}: {err}") from None


def passes_from_env() -> list[GraphPass] | None:
    """The passes ``autopar run`` handed to this process, or None."""
    text = os.environ.get(PASSES_ENV)
    return None if text is None else passes_from_json(text)
