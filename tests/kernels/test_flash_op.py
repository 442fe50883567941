"""``autopar::flash_attention`` as a ``torch.library`` op: opcheck passes, capture and
``torch.export`` keep it as one node with a fake implementation, FLOPs are counted with SDPA's
formulas (forward 4·b·h·s²·d, backward 2.5× that)."""

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

import autopar
from autopar.kernels import flash_attention

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 1, 16).permute(2, 0, 3, 1, 4)  # 3 × (b, 1, s, 16)
        return flash_attention(q, k, v, causal=True)


def test_opcheck_schema_fake_and_autograd_registration():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 16, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 5, 16, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 5, 16, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.autopar.flash_attention.default, (q, k, v, None, 0.0, True, 0.25))


def test_capture_keeps_one_op_node_and_counts_sdpa_flops():
    model, x = TinyAttention(), torch.randn(2, 11, 16)
    cap = autopar.capture(model, x)  # fx cannot trace the Python wrapper; export keeps the op
    ops = [n for n in cap.graph_module.graph.nodes if n.target is torch.ops.autopar.flash_attention.default]
    assert cap.frontend == "export" and len(ops) == 1
    assert not [w for w in cap.warnings if "not counted" in w]
    torch.testing.assert_close(cap.graph_module(x), model(x))
    q = torch.randn(2, 1, 11, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        flash_attention(q, q, q).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    forward = 4 * 2 * 1 * 11 * 11 * 16  # 4·b·h·s²·d, SDPA's formula (TECHNIQUES §8)
    assert counts == {"autopar.flash_attention": forward,
                      "autopar.flash_attention_backward": 5 * forward // 2}


def test_fake_tensors_get_shapes_without_running_a_kernel():
    with FakeTensorMode():
        q = torch.empty(2, 8, 1000, 64)
        k = torch.empty(2, 2, 1000, 64)
        out = flash_attention(q, k, k, causal=True)
    assert out.shape == (2, 8, 1000, 64)
