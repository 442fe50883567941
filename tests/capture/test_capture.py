"""Capture: front ends, equivalence with eager, exact FLOPs, layers, errors."""

import importlib.util
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import autopar
from autopar.capture import META_KEY, CaptureError, NodeRecord
from tests.helpers.nanogpt import NanoGPT


def gpt_layer_flops(b: int, s: int, h: int) -> int:
    """Megatron-LM (Narayanan et al. 2021): one layer's forward FLOPs."""
    return 24 * b * s * h * h + 4 * b * s * s * h


@pytest.fixture
def nanogpt():
    torch.manual_seed(0)
    return NanoGPT(layers=3, h=64, n=4, block=32, vocab=128)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_outputs_equal_eager_and_graph_is_annotated(nanogpt, frontend):
    x = torch.randint(0, 128, (2, 16))
    cap = autopar.capture(nanogpt, x, frontend=frontend)
    assert cap.frontend == frontend
    torch.testing.assert_close(cap.graph_module(x), nanogpt(x), rtol=0, atol=0)
    for node in cap.graph_module.graph.nodes:
        assert isinstance(node.meta[META_KEY], NodeRecord), node.name
    assert cap.param_count == sum(p.numel() for p in nanogpt.parameters())


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_flops_are_exact(nanogpt, frontend):
    b, s, h, V = 2, 16, 64, 128
    cap = autopar.capture(nanogpt, torch.randint(0, V, (b, s)), frontend=frontend)
    assert [layer.flops_fwd for layer in cap.layers] == [gpt_layer_flops(b, s, h)] * 3
    assert cap.flops_fwd == 3 * gpt_layer_flops(b, s, h) + 2 * b * s * h * V
    assert cap.flops_bwd == 2 * cap.flops_fwd
    with FlopCounterMode(display=False) as counter:
        nanogpt(torch.randint(0, V, (b, s))).sum().backward()
    assert cap.flops_per_step == counter.get_total_flops()


def test_layers_found_in_execution_order(nanogpt):
    cap = autopar.capture(nanogpt, torch.randint(0, 128, (1, 8)))
    assert [(layer.name, layer.index) for layer in cap.layers] == [
        ("blocks.0", 0), ("blocks.1", 1), ("blocks.2", 2)
    ]
    per_block = sum(p.numel() for p in nanogpt.blocks[0].parameters())
    assert all(layer.param_count == per_block for layer in cap.layers)
    layers = {r.layer for _, r in cap.records() if r.module_path.startswith("blocks.1")}
    assert layers == {1}
    head = [r for n, r in cap.records() if r.module_path == "head"]
    assert head and all(r.layer is None for r in head)


def test_records_hold_shapes_bytes_and_param_ownership(nanogpt):
    cap = autopar.capture(nanogpt, torch.randint(0, 128, (2, 16)), frontend="fx")
    records = {n.name: r for n, r in cap.records()}
    qkv = next(r for n, r in cap.records() if n.target == "blocks.0.attn.qkv")
    assert qkv.shapes == ((2, 16, 192),) and qkv.dtypes == ("float32",)
    assert qkv.param_bytes == (64 * 192 + 192) * 4
    assert qkv.bytes_written == 2 * 16 * 192 * 4
    assert qkv.flops_fwd == 2 * 2 * 16 * 64 * 192
    assert sum(r.param_bytes for r in records.values()) == cap.param_bytes
    views = [r for n, r in cap.records() if n.op == "call_method" and n.target == "transpose"]
    assert views and all(r.bytes_written == 0 for r in views)


def test_mask_buffer_is_proxied_by_fx(nanogpt):
    cap = autopar.capture(nanogpt, torch.randint(0, 128, (1, 8)), frontend="fx")
    attrs = [n.target for n in cap.graph_module.graph.nodes if n.op == "get_attr"]
    assert "blocks.0.attn.mask" in attrs


def test_leaf_modules_by_class_and_path(nanogpt):
    from tests.helpers.nanogpt import CausalSelfAttention

    x = torch.randint(0, 128, (1, 8))
    by_class = autopar.capture(nanogpt, x, frontend="fx", leaf_modules=[CausalSelfAttention])
    calls = [n.target for n in by_class.graph_module.graph.nodes if n.op == "call_module"]
    assert {"blocks.0.attn", "blocks.1.attn", "blocks.2.attn"} <= set(calls)
    by_path = autopar.capture(nanogpt, x, frontend="fx", leaf_modules=["blocks.1.attn"])
    calls = [n.target for n in by_path.graph_module.graph.nodes if n.op == "call_module"]
    assert "blocks.1.attn" in calls and "blocks.0.attn" not in calls
    leaf = next(r for n, r in by_class.records() if n.target == "blocks.0.attn")
    assert leaf.flops_fwd == 2 * 8 * 64 * 64 * 4 + 4 * 8 * 8 * 64  # QKV + proj + attention
    torch.testing.assert_close(by_class.graph_module(x), nanogpt(x))


def test_capture_leaves_buffers_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    autopar.capture(model, torch.randn(2, 3, 8, 8))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_meta_capture_of_gpt3_175b_is_fast():
    start = time.perf_counter()
    model = autopar.models.build("gpt3-175b", device="meta")
    inputs, _ = autopar.models.example_batch(model, batch_size=1, seq_len=2048)
    cap = autopar.capture(model, inputs)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"meta capture of GPT-3 175B took {elapsed:.1f} s"
    assert len(cap.layers) == 96
    assert 174e9 < cap.param_count < 176e9
    h, s = 12288, 2048
    assert all(layer.flops_fwd == gpt_layer_flops(1, s, h) for layer in cap.layers)
    assert all(p.device.type == "meta" for p in model.parameters())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if y.sum() > 0:  # data-dependent control flow: no front end can capture this
            return y * 2
        return y


def test_untraceable_model_names_module_and_line():
    model = nn.Sequential(nn.Linear(4, 4), DataDependent())
    with pytest.raises(CaptureError) as info:
        autopar.capture(model, torch.randn(2, 4))
    message = str(info.value)
    assert "fx failed" in message and "export failed" in message
    assert "DataDependent" in message and "'1'" in message
    assert "test_capture.py" in message and "if y.sum() > 0" in message
    assert "leaf_modules=[DataDependent]" in message and "frontend=" in message
    assert isinstance(info.value, ValueError)


def test_leaf_module_makes_untraceable_module_capturable():
    model = nn.Sequential(nn.Linear(4, 4), DataDependent())
    x = torch.randn(2, 4)
    cap = autopar.capture(model, x, frontend="fx", leaf_modules=[DataDependent])
    torch.testing.assert_close(cap.graph_module(x), model(x))


def test_bad_arguments():
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="frontend='jit' is not one of"):
        autopar.capture(model, torch.randn(1, 4), frontend="jit")
    with pytest.raises(TypeError, match="example inputs do not match"):
        autopar.capture(model, (torch.randn(1, 4), torch.randn(1, 4)))
    with pytest.raises(TypeError, match="must be a tensor or a tuple"):
        autopar.capture(model, {"x": torch.randn(1, 4)})
    with pytest.raises(TypeError, match="leaf_modules entries"):
        autopar.capture(model, torch.randn(1, 4), leaf_modules=[42])
    with pytest.raises(TypeError, match="needs an nn.Module"):
        autopar.capture(lambda x: x, torch.randn(1, 4))


def test_unpassed_optional_arguments_are_constants():
    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, mask=None):
            y = self.lin(x)
            if mask is not None:
                y = y * mask
            return y

    model, x = WithMask(), torch.randn(2, 4)
    cap = autopar.capture(model, x, frontend="fx")
    torch.testing.assert_close(cap.graph_module(x), model(x))
    with_mask = autopar.capture(model, x, example_kwargs={"mask": torch.ones(2, 4)}, frontend="fx")
    assert any(n.target is torch.mul or "mul" in str(n.target) for n in with_mask.graph_module.graph.nodes)


def test_no_bare_top_level_packages(tmp_path):
    """passes/kernels/cost_models are importable only under autopar (ARCHITECTURE.md)."""
    import subprocess

    code = (
        "import importlib.util, autopar.passes, autopar.kernels, autopar.cost_models\n"
        "bare = [n for n in ('passes', 'kernels', 'cost_models') if importlib.util.find_spec(n)]\n"
        "assert not bare, bare\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert importlib.util.find_spec("autopar.passes") is not None
