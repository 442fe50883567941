"""Adoption of a model's own sparse-MoE blocks (Hugging Face Mixtral and its layout).

Data flow: ``MoE(layers="existing")`` → :func:`~autopar.passes.moe.moe_pass` →
:func:`find_sparse_block` on each layer's feed-forward region (:mod:`autopar.passes.moe.ffn`) →
a :class:`SparseBlock` (router weight, fused expert weights, top-k, activation, read from the
exported ATen graph) → :func:`gated_experts` builds one :class:`GatedExpert` per expert, and the
pass puts a dropless :class:`~autopar.passes.moe.layer.MoELayer` with the block's router in the
block's place: the same function, now routed by autopar (statistics, losses, expert parallelism).

The layout is transformers' ``MixtralSparseMoeBlock``: ``gate.weight`` (E, h) is the router;
``experts.gate_up_proj`` (E, 2f, h) and ``experts.down_proj`` (E, h, f) hold the experts, applied
as ``gate, up = (x @ gate_up_proj[e]ᵀ).chunk(2, -1)``; ``y = (act(gate) · up) @ down_proj[e]ᵀ``
(``MixtralExperts.forward``; the grouped-mm path of ``transformers.integrations.moe`` transposes
the same weights). Routing: ``softmax`` of the logits, top-k, weights renormalized over the k —
the rule of :func:`~autopar.passes.moe.layer.route`. Blocks with other parameters (shared
experts, biases, router corrections) or another routing are refused, naming what differs.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from autopar.passes.moe.ffn import Block

_SOFTMAX = ("aten.softmax.int", "aten._softmax.default")
_DIVIDE = ("aten.div.Tensor", "aten.div_.Tensor")


@dataclass(frozen=True)
class SparseBlock:
    """A native sparse-MoE block found in the graph."""

    block: Block
    router: torch.Tensor  # (E, h)
    gate_up: torch.Tensor  # (E, 2f, h)
    down: torch.Tensor  # (E, h, f)
    top_k: int
    activation: str  # ATen op, e.g. "aten.silu.default"
    activation_args: tuple[Any, ...]  # after the input

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]


class GatedExpert(nn.Module):
    """One expert of a fused sparse-MoE block, (n, h) → (n, h)::

        gate, up = gate_up_proj(x).chunk(2, -1);  y = down_proj(act(gate) · up)
    """

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, *, activation: str,
                 activation_args: tuple[Any, ...] = ()) -> None:
        super().__init__()
        (two_f, h), f = gate_up.shape, down.shape[1]
        kwargs = {"bias": False, "dtype": gate_up.dtype, "device": gate_up.device}
        self.gate_up_proj = nn.utils.skip_init(nn.Linear, h, two_f, **kwargs)
        self.down_proj = nn.utils.skip_init(nn.Linear, f, h, **kwargs)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(gate_up)
            self.down_proj.weight.copy_(down)
        self.activation, self.activation_args = activation, activation_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(_aten(self.activation)(gate, *self.activation_args) * up)


@functools.cache
def _aten(name: str) -> Any:
    """``"aten.silu.default"`` → ``torch.ops.aten.silu.default`` (the name pickles, the op does not)."""
    namespace, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), op), overload)


def gated_experts(sparse: SparseBlock) -> list[GatedExpert]:
    """The block's experts as modules with their own parameters (copies of the fused slices)."""
    return [GatedExpert(sparse.gate_up[e].detach(), sparse.down[e].detach(), activation=sparse.activation,
                        activation_args=sparse.activation_args) for e in range(sparse.num_experts)]


def is_sparse_block(gm: fx.GraphModule, block: Block) -> bool:
    """Whether ``block`` holds stacked expert weights (3-D parameters)."""
    return any(_param(gm, p).dim() == 3 for p in block.params)


def _param(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    owner, _, name = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def find_sparse_block(gm: fx.GraphModule, block: Block) -> SparseBlock:
    """Read a Mixtral-layout sparse-MoE block from ``block`` (module docstring); ValueError otherwise."""
    where = f"layer {block.layer}'s sparse MoE block {block.path}"
    params = {str(p.target)[len(block.path) + 1:]: _param(gm, p) for p in block.params}
    expected = {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    if set(params) != expected:
        raise ValueError(f"{where} has parameters {sorted(params)}; autopar adopts the Mixtral layout "
                         f"{sorted(expected)} only (no shared experts, biases or router corrections)")
    router, gate_up, down = params["gate.weight"], params["experts.gate_up_proj"], params["experts.down_proj"]
    e, h = router.shape
    f = down.shape[-1]
    if gate_up.shape != (e, 2 * f, h) or down.shape != (e, h, f):
        raise ValueError(f"{where}: gate {tuple(router.shape)}, gate_up_proj {tuple(gate_up.shape)}, "
                         f"down_proj {tuple(down.shape)}; expected (E, h), (E, 2f, h), (E, h, f)")
    activation, args = _activation(block, where)
    return SparseBlock(block=block, router=router, gate_up=gate_up, down=down, top_k=_top_k(block, where),
                       activation=activation, activation_args=args)


def _top_k(block: Block, where: str) -> int:
    """k of the block's ``softmax → topk → renormalize`` routing."""
    topks = [n for n in block.nodes if str(n.target) == "aten.topk.default"]
    if len(topks) != 1:
        raise ValueError(f"{where} has {len(topks)} top-k ops; expected one (the router's)")
    topk = topks[0]
    values = [u for u in topk.users if u.target is operator.getitem and u.args[1] == 0]
    renormalized = any(str(u.target) in _DIVIDE for v in values for u in v.users)
    source = topk.args[0]
    if not isinstance(source, fx.Node) or str(source.target) not in _SOFTMAX or not renormalized:
        raise ValueError(f"{where} does not route softmax → top-k → renormalize (Mixtral); autopar's "
                         "MoE layer routes that way only, so it would change the function")
    return int(topk.args[1])  # type: ignore[arg-type]


def _activation(block: Block, where: str) -> tuple[str, tuple[Any, ...]]:
    """The op between ``chunk(…, 2, -1)[0]`` and the product with ``[1]``, and its extra arguments."""
    chunks = [n for n in block.nodes if str(n.target) == "aten.chunk.default"]
    if len(chunks) == 1 and tuple(chunks[0].args[1:]) in ((2, -1), (2, 1)):
        parts = {u.args[1]: u for u in chunks[0].users if u.target is operator.getitem}
        gate_users = list(parts[0].users) if 0 in parts else []
        if len(gate_users) == 1 and 1 in parts:
            act = gate_users[0]
            products = [u for u in act.users if str(u.target) == "aten.mul.Tensor" and parts[1] in u.args]
            if act.op == "call_function" and act.args[0] is parts[0] and products and not act.kwargs:
                return str(act.target), tuple(act.args[1:])
    raise ValueError(f"{where}: found no gated activation act(gate) · up after chunking gate_up_proj's "
                     "output in two; autopar adopts Mixtral-style SwiGLU experts only")
