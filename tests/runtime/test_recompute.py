"""Recomputation wrapping (autopar.runtime.recompute): each layer of a stage becomes one checkpointed
region, the stage computes the same values and gradients, and backward re-runs what the mode says —
nothing for "none", whole layers for "full", everything but matrix products and attention for
"selective" (Korthikanti et al. 2022). Counted with a dispatch mode, no process group needed."""

import copy
from collections import Counter

import pytest
import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

import autopar
from autopar.capture import META_KEY
from autopar.runtime.recompute import Recomputed, apply_recompute
from autopar.runtime.split import split_stages

ATTENTION = "_scaled_dot_product_flash_attention_for_cpu"
FORWARD_OPS = ("addmm", ATTENTION, "native_layer_norm", "gelu")  # ops that only a forward runs here


class OpCounter(TorchDispatchMode):
    """How often each aten op ran inside the block."""

    def __enter__(self):
        self.counts: Counter[str] = Counter()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def stage():
    """The last stage of a 4-layer GPT cut in two: layers 2 and 3, the final norm and the LM head."""
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=4)
    inputs, _ = autopar.models.example_batch(model, batch_size=2, seq_len=8, seed=1)
    first, last = split_stages(autopar.capture(model, inputs).graph_module, [(0, 2), (2, 4)])
    return last.module, first.module(inputs)


def _step(module, activation):
    """Forward and backward; the ops that backward ran, the output and the gradients."""
    x = activation[0].detach().requires_grad_()
    out = module(x)
    with OpCounter() as backward:
        out.square().mean().backward()
    return backward.counts, out, [x.grad] + [p.grad for p in module.parameters()]


def test_none_is_the_stage_itself(stage):
    gm, _ = stage
    assert apply_recompute(gm, "none") is gm


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_each_layer_is_one_region_with_equal_values(stage, mode):
    gm, activation = stage
    plain = copy.deepcopy(gm)
    wrapped = apply_recompute(copy.deepcopy(gm), mode)
    regions = [m for m in wrapped.children() if isinstance(m, Recomputed)]
    assert [m.mode for m in regions] == [mode, mode]
    layers = [{n.meta[META_KEY].layer for n in m.inner.graph.nodes if n.op not in ("placeholder", "output",
                                                                                     "get_attr")}
              for m in regions]
    assert layers == [{2}, {3}]
    others = [m for m in wrapped.children() if not isinstance(m, Recomputed)]
    assert all(isinstance(m, fx.GraphModule) for m in others)  # the head is not checkpointed
    _, expected_out, expected_grads = _step(plain, activation)
    _, out, grads = _step(wrapped, activation)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backward_reruns_what_the_mode_says(stage):
    gm, activation = stage
    ran = {mode: _step(apply_recompute(copy.deepcopy(gm), mode), activation)[0]
           for mode in ("none", "full", "selective")}
    rerun = {mode: {op: counts[op] for op in FORWARD_OPS} for mode, counts in ran.items()}
    assert rerun["none"] == dict.fromkeys(FORWARD_OPS, 0)
    # full: two norms, a GELU and attention per layer, and the linears whose outputs backward needs
    # (torch's checkpoint stops replaying once it has them, so not necessarily all four)
    assert rerun["full"]["addmm"] > 0
    del rerun["full"]["addmm"]
    assert rerun["full"] == {ATTENTION: 2, "native_layer_norm": 4, "gelu": 2}
    assert rerun["selective"] == {"addmm": 0, ATTENTION: 0, "native_layer_norm": 4, "gelu": 2}
    assert ran["none"]["mm"] == ran["full"]["mm"] == ran["selective"]["mm"] > 0  # gradients' own products


def test_no_grad_runs_without_checkpointing(stage, monkeypatch):
    gm, activation = stage
    wrapped = apply_recompute(copy.deepcopy(gm), "full")
    monkeypatch.setattr("autopar.runtime.recompute.checkpoint", lambda *a, **k: pytest.fail("checkpointed"))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(activation[0]), gm(activation[0]), rtol=0, atol=0)
