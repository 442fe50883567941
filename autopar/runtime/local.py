"""The one-device executor: runs the transformed graph of the current input signature.

Data flow: ``autopar.compile`` on one device → :class:`LocalEngine` (an ``Executor``, like the
distributed :class:`~autopar.runtime.engine.Engine`) → :meth:`LocalEngine.step`: the graph the
compiled model lowered for these inputs (``graph_for``), ``loss_fn`` plus the MoE layers'
auxiliary losses, backward, the optimizer step; passes with run-time state follow the step number.
A pinned ``recompute`` mode wraps each layer of the graph for activation recomputation
(``autopar.runtime.recompute``, as the distributed stages do), and ``num_microbatches`` /
``microbatch_size`` run the batch as that many microbatches with their gradients accumulated
before one optimizer step: the default token cross-entropy is summed per microbatch over the whole
batch's counted tokens, so the step's loss and gradients equal one pass over the batch.
The optimizer is the one object users see as ``compiled.optimizer``: built from the factory on
first use over the trainable parameters, and told about parameters that a later capture creates
(MoE experts) as a new parameter group.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.profiler import record_function

from autopar.capture.batch import leading_dims
from autopar.losses import IGNORE_INDEX, cross_entropy, summed_cross_entropy
from autopar.passes.moe import moe_aux_loss
from autopar.passes.moe.layer import MoELayer
from autopar.plans import Plan
from autopar.runtime.measure import StepReport, measure_labelled_step, measure_memory_bytes, stage_label
from autopar.runtime.pass_state import PassStates
from autopar.runtime.recompute import apply_recompute

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
LossFn = Callable[[Any, Any], torch.Tensor]
GraphFor = Callable[[tuple[Any, ...], dict[str, Any]], fx.GraphModule]


class LocalEngine:
    """One device's share of training: the whole model, no collectives."""

    distributed = False
    stage_indices = (0,)

    def __init__(self, *, module: nn.Module, graph_for: GraphFor,
                 parameters: Callable[[], list[tuple[str, nn.Parameter]]],
                 loss_fn: LossFn, optimizer: OptimizerFactory, passes: PassStates,
                 plan: Callable[[], Plan], moe: Callable[[], dict[int, MoELayer]],
                 device: torch.device | None = None, recompute: str = "none",
                 num_microbatches: int | None = None, microbatch_size: int | None = None) -> None:
        self._module, self._graph_for, self._parameters, self._plan = module, graph_for, parameters, plan
        self._moe = moe
        self.recompute = recompute
        self.num_microbatches, self.microbatch_size = num_microbatches, microbatch_size
        self._recomputed: dict[int, tuple[fx.GraphModule, nn.Module]] = {}
        self.last_batch_size: int | None = None  # the latest step's batch (its plan's global batch)
        self.loss_fn, self._factory, self.passes = loss_fn, optimizer, passes
        self._device = device
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def device(self) -> torch.device:
        """Where the model is: the given device, else its first parameter's (CPU without any), so
        measurements synchronise and read the memory of the device the model was moved to."""
        if self._device is not None:
            return self._device
        first = next((p for _, p in self._parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def plan(self) -> Plan:
        """The single-device Plan of the latest capture, with the cost model's predictions."""
        return self._plan()

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer every step uses (built on first use over the parameters known then)."""
        if self._optimizer is None:
            self._optimizer = self._factory([p for _, p in self._parameters()])
        return self._optimizer

    @property
    def started(self) -> bool:
        """Whether the optimizer exists (a step ran, or a caller asked for it)."""
        return self._optimizer is not None

    def add_parameters(self, params: Iterable[nn.Parameter]) -> None:
        """Parameters created after the optimizer (a later capture's MoE layers): a new group."""
        if self._optimizer is None:
            return
        known = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
        new = [p for p in params if id(p) not in known]
        if new:
            self._optimizer.add_param_group({"params": new})

    def microbatches(self, batch_size: int) -> int:
        """How many microbatches a batch of ``batch_size`` runs as (the pinned count or size)."""
        if self.microbatch_size is not None:
            if batch_size % self.microbatch_size:
                raise ValueError(f"batch of {batch_size} sequences does not split into microbatches of "
                                 f"{self.microbatch_size}; pin a microbatch_size that divides the batch")
            return batch_size // self.microbatch_size
        count = self.num_microbatches or 1
        if batch_size % count:
            raise ValueError(f"batch of {batch_size} sequences does not split into {count} microbatches; "
                             "pin a num_microbatches that divides the batch")
        return count

    def step(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *, step: int = 0,
             local: bool = False) -> float:
        """One training step on this batch; returns the loss (``loss_fn`` + MoE auxiliary losses).
        ``local`` changes nothing here: one device's own rows are the whole batch."""
        batch = leading_dims(args, kwargs)[0]
        count = self.microbatches(batch)
        self.last_batch_size = batch
        self.passes.begin_step(step)
        optimizer = self.optimizer
        optimizer.zero_grad(set_to_none=True)
        exact = self.loss_fn is cross_entropy and isinstance(targets, torch.Tensor)
        counted = max(int((targets != IGNORE_INDEX).sum()), 1) if exact else 1
        total, gm = 0.0, None
        for part_args, part_kwargs, part_targets in _split(args, kwargs, targets, count):
            gm, module = self._module_for(part_args, part_kwargs)
            with record_function(stage_label("forward", 0)):
                output = module(*part_args, **part_kwargs)
                loss = summed_cross_entropy(output, part_targets) / counted if exact else \
                    _checked_loss(self.loss_fn(output, part_targets)) / count
                if self._moe():
                    loss = loss + moe_aux_loss(gm) / count
            with record_function(stage_label("backward", 0)):
                loss.backward()
            total += float(loss.detach())
        optimizer.step()
        assert gm is not None
        self.passes.end_step(gm, batch)
        return total

    def evaluate(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                 local: bool = False) -> float:
        """The loss of this batch, forward only (no gradients, no step): the graph of the current
        mode's capture (``Compiled.evaluate`` switches to eval first), the token cross-entropy over the
        batch's counted tokens or ``loss_fn``; MoE auxiliary losses are not added."""
        with torch.no_grad():
            output = self._graph_for(args, kwargs)(*args, **kwargs)
            if self.loss_fn is cross_entropy and isinstance(targets, torch.Tensor):
                counted = max(int((targets != IGNORE_INDEX).sum()), 1)
                return float(summed_cross_entropy(output, targets)) / counted
            return float(_checked_loss(self.loss_fn(output, targets)))

    def _module_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[fx.GraphModule, nn.Module]:
        """The graph for these inputs and what runs it (wrapped for recomputation once per graph)."""
        gm = self._graph_for(args, kwargs)
        if self.recompute == "none":
            return gm, gm
        cached = self._recomputed.get(id(gm))
        if cached is None or cached[0] is not gm:
            cached = (gm, apply_recompute(gm, self.recompute))
            self._recomputed[id(gm)] = cached
        return cached

    def measure_step(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                     step: int = 0) -> StepReport:
        """:meth:`step` under the profiler (it trains), summarized as stage 0 of rank 0."""
        return measure_labelled_step(lambda: self.step(args, kwargs, targets, step=step), device=self.device)

    def measure_memory(self, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, *,
                       step: int = 0) -> dict[str, int]:
        """:meth:`step` under the memory tracker (it trains): bytes by category."""
        return measure_memory_bytes(lambda: self.step(args, kwargs, targets, step=step),
                                    modules=[self._module], optimizer=self.optimizer, device=self.device)

    def parameter_copies(self) -> dict[str, list[torch.Tensor]]:
        """Parameter name → its one copy here (checkpoints name tensors this way)."""
        return {fqn: [p] for fqn, p in self._parameters()}

    def all_parameter_names(self) -> set[str]:
        """Every parameter of the model (one device holds them all)."""
        return {fqn for fqn, _ in self._parameters()}

    def moe_layers(self) -> list[MoELayer]:
        """The MoE layers this device runs (every one)."""
        return [layer for _, layer in sorted(self._moe().items())]


def _checked_loss(loss: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {loss!r:.80}")
    return loss


def _split(args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any,
           count: int) -> list[tuple[tuple[Any, ...], dict[str, Any], Any]]:
    """``count`` equal microbatches along the leading (batch) dimension of every tensor that has
    the batch's size there; other values are passed to each microbatch unchanged."""
    if count == 1:
        return [(args, kwargs, targets)]
    batch = leading_dims(args, kwargs)[0]

    def part(value: Any, i: int) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.chunk(count)[i]
        return value

    return [(tuple(part(a, i) for a in args), {k: part(v, i) for k, v in kwargs.items()}, part(targets, i))
            for i in range(count)]

