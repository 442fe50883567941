"""The pass runner: order, timing records, disabling by name, failures that name the pass."""

from dataclasses import dataclass

import pytest
import torch
from torch import fx

import autopar
from autopar.passes import PassContext, PassError, run_passes
from autopar.transform import transform


@dataclass(frozen=True)
class ScaleOutput:
    """A tiny real pass: multiply the graph's output by ``factor``."""

    factor: float = 2.0
    name: str = "scale_output"

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        output = next(n for n in gm.graph.nodes if n.op == "output")
        value = output.args[0]
        with gm.graph.inserting_before(output):
            scaled = gm.graph.call_function(torch.mul, (value, self.factor))
        output.args = (scaled,)
        gm.recompile()
        return gm


@dataclass(frozen=True)
class Broken:
    name: str = "broken"

    def apply(self, gm, ctx):
        raise RuntimeError("no such node")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())


def test_transform_runs_passes_in_order():
    model, x = _model(), torch.randn(3, 4)
    gm = transform(model, x, passes=[ScaleOutput(2.0), ScaleOutput(5.0, name="again")])
    torch.testing.assert_close(gm(x), model(x) * 10)


def test_records_and_disable():
    model, x = _model(), torch.randn(3, 4)
    cap = autopar.capture(model, x)
    ctx = PassContext(captured=cap, disabled=frozenset({"again"}))
    gm = run_passes(cap.graph_module, [ScaleOutput(3.0), ScaleOutput(5.0, name="again")], ctx)
    torch.testing.assert_close(gm(x), model(x) * 3)
    assert [(name, config["factor"]) for name, config, _ in ctx.applied] == [("scale_output", 3.0)]
    assert all(seconds >= 0 for _, _, seconds in ctx.applied)


def test_failure_names_pass_and_predecessors():
    model, x = _model(), torch.randn(3, 4)
    with pytest.raises(PassError, match=r"pass 2 \(broken\) failed: no such node .*before it: scale_output"):
        transform(model, x, passes=[ScaleOutput(), Broken()])


def test_bad_pass_lists():
    model, x = _model(), torch.randn(3, 4)
    with pytest.raises(TypeError, match="autopar.passes objects"):
        transform(model, x, passes=[lambda gm, ctx: gm])
    with pytest.raises(ValueError, match="once"):
        transform(model, x, passes=[ScaleOutput(), ScaleOutput()])
