"""MoE pass on a user model whose MLP is written inline (issue 16, item 4): the feed-forward block is
found by its graph shape (linear h → f, per-token ops, linear f → h, added back to the residual
stream) whatever the modules are called, with function or module activations and SwiGLU, in fx and
exported graphs; the upcycled model computes the dense function; a layer without one is refused
naming what was looked for."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autopar
from autopar.passes import MoE, PassError
from autopar.passes.moe import moe_layers, moe_stats
from autopar.passes.moe.ffn import find_block

B, S, H, V, L = 2, 16, 32, 64, 4
E, K = 4, 2
NO_DROP = {"capacity_factor": E / K, "eval_capacity_factor": E / K}  # capacity = tokens: nothing dropped
ATOL = {torch.float32: 1e-5}  # upcycled = dense up to the reordered fp32 sum over the k experts


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.register_buffer("causal", torch.ones(S, S, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).split(h, dim=2)
        q, k, v = [t.view(b, s, self.heads, h // self.heads).transpose(1, 2) for t in (q, k, v)]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(h // self.heads)  # (b, heads, s, s)
        y = scores.masked_fill(~self.causal[:s, :s], float("-inf")).softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, s, h))


def _feed_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kind = block.kind
    if kind == "F.gelu":
        return block.out(F.gelu(block.fc(x)))
    if kind == "nn.ReLU":
        return block.out(block.act(block.fc(x)))
    if kind == "x*sigmoid(x)":
        y = block.fc(x)
        return block.out(y * torch.sigmoid(y))
    if kind == "swiglu":
        return block.out(F.silu(block.fc(x)) * block.up(x))
    if kind == "fused gate-up":
        gate, up = block.fc(x).chunk(2, dim=-1)
        return block.out(F.silu(gate) * up)
    assert kind == "matmul", kind  # parameters used directly, bias and layer scale after the f → h matmul
    return (torch.relu(x @ block.w_in + block.b_in) @ block.w_out + block.b_out) * block.scale


class Layer(nn.Module):
    """Pre-LN block, MLP inline: ``x + out(act(fc(ln2(x))))`` (``kind`` picks the feed-forward form)."""

    def __init__(self, hidden: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(hidden), Attention(hidden, 2), nn.LayerNorm(hidden)
        if kind == "none":
            return
        f = 4 * hidden
        if kind == "matmul":
            shapes = {"w_in": (hidden, f), "b_in": (f,), "w_out": (f, hidden), "b_out": (hidden,)}
            for name, shape in shapes.items():
                self.register_parameter(name, nn.Parameter(torch.randn(*shape) * 0.1))
            self.scale = nn.Parameter(torch.rand(hidden))
            return
        self.fc = nn.Linear(hidden, 2 * f if kind == "fused gate-up" else f)
        self.out = nn.Linear(f, hidden)
        if kind == "nn.ReLU":
            self.act = nn.ReLU()
        if kind == "swiglu":
            self.up = nn.Linear(hidden, f, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x if self.kind == "none" else x + _feed_forward(self, self.ln2(x))


class InlineGPT(nn.Module):
    def __init__(self, kind: str = "F.gelu") -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(V, H), nn.Linear(H, V)
        self.blocks = nn.ModuleList(Layer(H, kind) for _ in range(L))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (b, s, h)
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # (b, s, V)


def _model(kind: str = "F.gelu") -> InlineGPT:
    torch.manual_seed(0)
    return InlineGPT(kind)


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))


def _lowered(model: nn.Module, frontend: str, **moe) -> torch.fx.GraphModule:
    config = MoE(num_experts=E, top_k=K, **{**NO_DROP, **moe})
    return autopar.lower(model, (_ids(),), passes=[config], frontend=frontend).graph_module


def _output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_one_block_per_layer_is_found_by_its_shape(frontend):
    gm = autopar.capture(_model("swiglu"), (_ids(),), frontend=frontend).graph_module
    for layer in range(L):
        block = find_block(gm, layer)
        assert block.path == f"blocks.{layer}" and block.hidden_size == H and block.tokens == B * S
        paths = {n.meta["autopar"].module_path for n in (*block.params, *block.nodes)}
        assert {f"blocks.{layer}.{name}" for name in ("fc", "up", "out")} <= paths
        assert not any(".attn" in p or ".ln" in p for p in paths)
        assert block.input.meta["autopar"].module_path == f"blocks.{layer}.ln2"


@pytest.mark.parametrize(("kind", "frontend"), [
    ("F.gelu", "fx"), ("nn.ReLU", "fx"), ("x*sigmoid(x)", "fx"), ("swiglu", "fx"), ("fused gate-up", "fx"),
    ("matmul", "fx"),
    ("F.gelu", "export"), ("swiglu", "export"), ("matmul", "export"),
])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_upcycled_inline_model_computes_the_dense_function(kind, frontend, mode):
    model = getattr(_model(kind), mode)()
    with torch.no_grad():
        dense = model(_ids())
    gm = _lowered(model, frontend)
    if frontend == "fx":  # an exported graph keeps the mode it was captured in
        getattr(gm, mode)()
    with torch.no_grad():
        sparse = _output(gm(_ids()))
    torch.testing.assert_close(sparse, dense, atol=ATOL[torch.float32], rtol=0)
    layers = moe_layers(gm)
    assert sorted(layers) == [1, 3] and all(m.num_experts == E and m.top_k == K for m in layers.values())
    assert all(s.dropped_assignments == 0 and sum(s.tokens_per_expert) == B * S * K
               for s in moe_stats(gm).values())
    names = {name for name, _ in gm.named_parameters()}
    for layer in range(L):  # the dense feed-forward weights of MoE layers are gone, the others kept
        kept = {n for n in names if n.startswith(f"blocks.{layer}.") and ".moe." not in n
                and not n.startswith((f"blocks.{layer}.attn", f"blocks.{layer}.ln"))}
        assert bool(kept) == (layer not in layers), (layer, kept)
    expert = layers[1].experts[0]
    with torch.no_grad():  # the experts compute: scaling one changes the output
        next(p for p in expert.parameters() if p.dim() == 2).mul_(3)
        assert not torch.allclose(_output(gm(_ids())), dense, atol=1e-3)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_model_without_feed_forward_is_refused_naming_what_was_looked_for(frontend):
    looked_for = r"found no feed-forward block; looked for a submodule named mlp.* linear h→f .* linear f→h"
    with pytest.raises(PassError, match=rf"layer 1: {looked_for}, whose input x comes from the residual"):
        _lowered(_model("none"), frontend)


def test_compile_steps_the_inline_model():
    model, ids = _model(), _ids()
    compiled = autopar.compile(model, "local:1", passes=[MoE(num_experts=E, top_k=K)])
    losses = [compiled.step(ids, ids) for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sorted(compiled.moe_stats()) == [1, 3]
