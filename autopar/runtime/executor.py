"""The executor protocol: what ``autopar.compile``, checkpoints and reports may ask of a runtime.

Data flow: ``Compiled`` (the facade) → an :class:`Executor` — the one-device
:class:`~autopar.runtime.local.LocalEngine` or the distributed
:class:`~autopar.runtime.engine.Engine` — for steps, evaluation, measured steps, the optimizer, the
Plan and this rank's parameters by the original model's names. ``local=True`` batches are this
rank's own rows (one device: the whole batch, as without it). ``autopar.checkpoint`` and
``autopar.report`` use only this protocol, never an executor's private fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from autopar.passes.moe.layer import MoELayer
    from autopar.plans import Plan
    from autopar.runtime.measure import StepReport


@runtime_checkable
class Executor(Protocol):
    """A runtime that trains one compiled model on this process's device(s)."""

    distributed: bool
    device: torch.device
    stage_indices: tuple[int, ...] | list[int]

    @property
    def plan(self) -> Plan: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    def step(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
             step: int = 0, local: bool = False) -> float: ...

    def evaluate(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                 local: bool = False) -> float: ...

    def measure_step(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                     step: int = 0) -> StepReport: ...

    def measure_memory(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                       step: int = 0) -> dict[str, int]: ...

    def parameter_copies(self) -> dict[str, list[torch.Tensor]]: ...

    def all_parameter_names(self) -> set[str]: ...

    def moe_layers(self) -> list[MoELayer]: ...
