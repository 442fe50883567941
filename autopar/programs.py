"""A compiled model's lowered Programs, one per input signature, and what they share.

Data flow: ``Compiled`` asks :class:`Programs` for the Program of some inputs → the first call
for a signature (shapes, dtypes, devices, train/eval) lowers the model once (``autopar.lower``:
capture, every pass once, profiles) → the passes' run-time modules join the compiled model's
:class:`~autopar.runtime.pass_state.PassStates`, and the MoE layers the first Program created
become the compiled model's own (``compiled.moe``): every later Program runs those same layers
in place of the fresh copies its MoE pass made. Counts of captures are kept for tests and the
report (``num_lowered``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from autopar.capture import LeafSpec
from autopar.cluster import ClusterSpec
from autopar.lower import Program, lower
from autopar.passes import GraphPass
from autopar.passes.moe import moe_layers
from autopar.runtime.pass_state import PassStates


def signature(args: tuple[Any, ...], kwargs: dict[str, Any], training: bool) -> Any:
    """What makes two calls share a Program: the inputs' structure, shapes, dtypes and devices
    (non-tensors by value) and the training mode."""
    leaves, spec = tree_flatten((args, kwargs))
    described = tuple(
        (tuple(v.shape), v.dtype, v.device.type) if isinstance(v, torch.Tensor) else repr(v)
        for v in leaves
    )
    return (str(spec), described, training)


class Programs:
    """The lowered Programs of one compiled model, and the MoE layers they share."""

    def __init__(self, model: nn.Module, *, passes: tuple[GraphPass, ...], cluster: ClusterSpec,
                 frontend: str, leaf_modules: Iterable[LeafSpec], pass_states: PassStates,
                 moe: nn.ModuleDict, on_new_parameters: Callable[[list[nn.Parameter]], None]) -> None:
        self.model, self.passes, self.cluster = model, passes, cluster
        self.frontend, self.leaf_modules = frontend, tuple(leaf_modules)
        self.pass_states, self.moe, self.on_new_parameters = pass_states, moe, on_new_parameters
        self.pending_moe_state: dict[str, Any] = {}
        self._programs: dict[Any, Program] = {}
        self.num_lowered = 0

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, training: bool, step: int) -> Program:
        """The Program for these inputs (lowered now if the signature is new)."""
        key = signature(args, kwargs, training)
        if key not in self._programs:
            program = lower(self.model, args, example_kwargs=kwargs, passes=self.passes, cluster=self.cluster,
                            frontend=self.frontend, leaf_modules=self.leaf_modules, step=step)
            self.num_lowered += 1
            self.pass_states.attach(program.graph_module, [a.name for a in program.applied])
            self._share_moe_layers(program.graph_module, training)
            self._programs[key] = program
        return self._programs[key]

    @property
    def latest(self) -> Program:
        """The most recently lowered Program; raises before the first."""
        if not self._programs:
            raise RuntimeError("nothing captured yet: call the compiled model or .step() first")
        return list(self._programs.values())[-1]

    @property
    def first(self) -> Program | None:
        """The first Program lowered (its graph names the parameters the passes created), if any."""
        return next(iter(self._programs.values()), None)

    def _share_moe_layers(self, gm: fx.GraphModule, training: bool) -> None:
        """Adopt the first Program's MoE layers; in later ones, put them in place of the fresh
        copies that the pass upcycled from the (untrained) dense MLPs."""
        created = moe_layers(gm)
        if not created:
            return
        if not len(self.moe):
            for layer, module in sorted(created.items()):
                self.moe[str(layer)] = module.train(training)
            if self.pending_moe_state:
                self.moe.load_state_dict(self.pending_moe_state)
                self.pending_moe_state = {}
            self.on_new_parameters(list(self.moe.parameters()))
            return
        assert set(created) == {int(k) for k in self.moe}, (sorted(created), list(self.moe))
        for path, module in list(gm.named_modules()):
            if module in created.values():
                gm.set_submodule(path, self.moe[str(module.layer)])
