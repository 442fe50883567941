"""Mixture-of-Experts as a graph pass: sparse upcycling of a captured dense model (issue 7).

Data flow: ``autopar.capture`` → annotated graph → :func:`moe_pass` (behind the :class:`MoE`
config) → a graph in which the feed-forward block of each chosen repeated layer is one
``call_module`` of a :class:`~autopar.passes.moe_layer.MoELayer`; its node carries a
:class:`MoENodeRecord` in ``node.meta["autopar_moe"]`` (E, k, capacity factors, tokens, capacity)
and a ``NodeRecord`` with the active FLOPs; ``gm.meta["autopar_moe"]`` lists the layers.
:func:`moe_aux_loss` returns the weighted balance + z losses of the last forward, to add to
the training loss; :func:`moe_stats` the per-layer expert loads.

The feed-forward block of layer ℓ is found in the graph as two ``nn.Linear`` leaf calls of that
layer, ``fc: h → f`` and ``proj: f → h``, joined by a chain of one-input ops (activation,
dropout) that nothing else reads — ``blocks.ℓ.mlp`` of the zoo GPT, ``layers.ℓ.fc/out`` of the
zoo BERT. The chain is cut into its own module; with ``upcycle`` (default) every expert is a copy
of it, so with weights renormalized over the top-k and no token dropped the transformed model
computes the dense function (up to fp32 rounding); otherwise the experts' Linears are re-drawn.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from autopar.capture.record import META_KEY, NodeRecord
from autopar.passes.moe_layer import MoELayer, MoEStats, expert_capacity
from autopar.passes.runner import PassContext

RECORD_KEY = "autopar_moe"
_LAYER_CHOICES = ("every_other", "second_half")


@dataclass(frozen=True, kw_only=True)
class MoE:
    """Upcycle feed-forward blocks into MoE layers: ``autopar.transform(model, x, passes=[MoE(...)])``.

    ``layers``: ``"every_other"`` (layers 1, 3, 5, …, as Switch/GLaM), ``"second_half"``, or a
    tuple of repeated-layer indices. Capacity per expert is ``ceil(factor · tokens · top_k / E)``
    with ``capacity_factor`` in training and ``eval_capacity_factor`` in eval mode. ``seed``
    draws the routers (layer ℓ uses ``seed + ℓ``) and, without ``upcycle``, the experts.
    """

    name: ClassVar[str] = "moe"

    num_experts: int = 8
    top_k: int = 2
    layers: str | tuple[int, ...] = "every_other"
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    upcycle: bool = True
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if type(self.num_experts) is not int or self.num_experts < 2:
            raise ValueError(f"MoE.num_experts = {self.num_experts!r} is invalid: expected an int >= 2, "
                             "e.g. 8")
        if type(self.top_k) is not int or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"MoE.top_k = {self.top_k!r} is invalid: expected an int in [1, num_experts = "
                             f"{self.num_experts}]: 1 (Switch) or 2 (GShard/GLaM)")
        for field_name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, field_name)
            if not _real(value) or not value > 0:
                raise ValueError(f"MoE.{field_name} = {value!r} is invalid: expected a finite number > 0, "
                                 f"e.g. 1.25; {self.num_experts / self.top_k:g} (num_experts / top_k) never "
                                 "drops a token")
        for field_name in ("aux_loss_weight", "z_loss_weight"):
            value = getattr(self, field_name)
            if not _real(value) or value < 0:
                raise ValueError(f"MoE.{field_name} = {value!r} is invalid: expected a finite number >= 0")
        if type(self.upcycle) is not bool:
            raise ValueError(f"MoE.upcycle = {self.upcycle!r} is invalid: expected True (experts copy the "
                             "dense MLP) or False (experts freshly initialized)")
        if type(self.seed) is not int or self.seed < 0:
            raise ValueError(f"MoE.seed = {self.seed!r} is invalid: expected an int >= 0")
        if isinstance(self.layers, str):
            if self.layers not in _LAYER_CHOICES:
                raise ValueError(f"MoE.layers = {self.layers!r} is invalid: expected 'every_other', "
                                 "'second_half' or a tuple of layer indices, e.g. (1, 3)")
            return
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple, range)) else None
        valid = bool(layers) and all(type(i) is int and i >= 0 for i in layers)  # type: ignore[union-attr]
        if not valid or len(set(layers)) != len(layers):  # type: ignore[arg-type]
            raise ValueError(f"MoE.layers = {self.layers!r} is invalid: expected 'every_other', "
                             "'second_half' or distinct layer indices >= 0, e.g. (1, 3)")
        object.__setattr__(self, "layers", tuple(sorted(layers)))

    def apply(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        return moe_pass(gm, ctx, config=self)


@dataclass(frozen=True, kw_only=True)
class MoENodeRecord:
    """What the planner and cost model need about one MoE node (``node.meta["autopar_moe"]``)."""

    layer: int
    module_path: str
    num_experts: int
    top_k: int
    capacity_factor: float
    eval_capacity_factor: float
    tokens: int  # tokens per forward at capture
    capacity: int  # per expert at capture, training factor
    expected_tokens_per_expert: float  # tokens · top_k / E
    expert_param_bytes: int  # one expert


@dataclass(frozen=True, kw_only=True)
class MoERecord:
    """``gm.meta["autopar_moe"]``: the layers the pass replaced, by index."""

    layers: tuple[int, ...]
    num_layers: int
    nodes: tuple[MoENodeRecord, ...]


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record(node: fx.Node) -> NodeRecord:
    return node.meta[META_KEY]


def moe_layers(gm: fx.GraphModule) -> dict[int, MoELayer]:
    """Layer index → the MoE layer the pass installed."""
    return {m.layer: m for m in gm.modules() if isinstance(m, MoELayer)}  # type: ignore[misc]


def moe_aux_loss(gm: fx.GraphModule) -> torch.Tensor:
    """Sum over MoE layers of ``aux_loss_weight · balance + z_loss_weight · z`` of the last forward."""
    losses = [m.last_aux_loss for m in moe_layers(gm).values() if m.last_aux_loss is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def moe_stats(gm: fx.GraphModule) -> dict[int, MoEStats | None]:
    """Layer index → expert load of the last forward (None before the first)."""
    return {layer: m.stats for layer, m in moe_layers(gm).items()}


def moe_pass(gm: fx.GraphModule, ctx: PassContext, *, config: MoE) -> fx.GraphModule:
    """Replace the feed-forward block of the chosen layers by MoE layers (see the module docstring)."""
    if moe_layers(gm):
        raise ValueError("the MoE pass was already applied to this graph; pass MoE(...) once")
    missing = [n.name for n in gm.graph.nodes if META_KEY not in n.meta]
    if missing:
        raise ValueError(f"nodes {missing[:3]} have no autopar annotation; run the MoE pass on a graph from "
                         "autopar.capture (or autopar.transform), before passes that add unannotated nodes")
    num_layers = _num_layers(gm, ctx)
    layers = _chosen_layers(config, num_layers)
    found = {layer: _find_ffn(gm, layer) for layer in layers}  # all checked before the graph changes
    records = tuple(_replace(gm, config, layer, *found[layer]) for layer in layers)
    gm.meta[RECORD_KEY] = MoERecord(layers=layers, num_layers=num_layers, nodes=records)
    gm.graph.lint()
    gm.recompile()
    return gm


def _num_layers(gm: fx.GraphModule, ctx: PassContext) -> int:
    captured = ctx.captured
    if captured is not None and getattr(captured, "layers", None):
        return len(captured.layers)
    indices = {_record(n).layer for n in gm.graph.nodes} - {None}
    return max(indices) + 1 if indices else 0  # type: ignore[type-var]


def _chosen_layers(config: MoE, num_layers: int) -> tuple[int, ...]:
    if num_layers == 0:
        raise ValueError("the graph has no repeated layers (capture found no nn.ModuleList of blocks); "
                         "the MoE pass replaces the feed-forward blocks of repeated layers")
    if config.layers == "every_other":
        if num_layers < 2:
            raise ValueError(f"the model has {num_layers} repeated layer; MoE.layers='every_other' uses "
                             "layers 1, 3, …: pass layers=(0,) to make its one layer an MoE layer")
        return tuple(range(1, num_layers, 2))
    if config.layers == "second_half":
        return tuple(range(num_layers // 2, num_layers))
    bad = [i for i in config.layers if i >= num_layers]
    if bad:
        raise ValueError(f"MoE.layers = {config.layers} names layer(s) {bad}, but the model has {num_layers} "
                         f"repeated layers: expected indices in [0, {num_layers})")
    return tuple(config.layers)


def _linear(gm: fx.GraphModule, node: fx.Node) -> nn.Linear | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)  # type: ignore[arg-type]
    return module if type(module) is nn.Linear else None


def _find_ffn(gm: fx.GraphModule, layer: int) -> tuple[fx.Node, list[fx.Node], fx.Node]:
    """``(fc, chain, proj)`` of layer ``layer``'s one feed-forward block."""
    found = []
    for fc in [n for n in gm.graph.nodes if _record(n).layer == layer and _linear(gm, n) is not None]:
        first, chain, node = _linear(gm, fc), [], fc
        while len(node.users) == 1:
            user = next(iter(node.users))
            if _record(user).layer != layer or user.all_input_nodes != [node]:
                break
            second = _linear(gm, user)
            if second is not None:
                if (second.in_features, second.out_features) == (first.out_features, first.in_features):
                    found.append((fc, chain, user))
                break
            if user.op not in ("call_function", "call_method", "call_module") or \
                    _record(user).shapes != _record(fc).shapes:
                break
            chain, node = [*chain, user], user
    if len(found) != 1:
        pairs = [(fc.target, proj.target) for fc, _, proj in found]
        raise ValueError(f"layer {layer}: found {len(found)} feed-forward blocks {pairs}; the MoE pass "
                         "needs exactly one per chosen layer: nn.Linear(h, f), one-input ops (activation, "
                         "dropout), nn.Linear(f, h). Gated MLPs (SwiGLU) and exported (ATen) graphs are not "
                         "supported yet: leave such layers out of MoE.layers")
    return found[0]


def _expert(gm: fx.GraphModule, nodes: list[fx.Node]) -> fx.GraphModule:
    """The dense feed-forward block as its own module ``(n, h) -> (n, h)``."""
    root, graph = nn.Module(), fx.Graph()
    env = {nodes[0].args[0]: graph.placeholder("x")}
    for node in nodes:
        new = graph.node_copy(node, lambda a: env[a])
        if node.op == "call_module":
            name = str(node.target).rsplit(".", 1)[-1]
            while hasattr(root, name):
                name += "_"
            root.add_module(name, copy.deepcopy(gm.get_submodule(node.target)))  # type: ignore[arg-type]
            new.target = name
        new.meta = {}
        env[node] = new
    graph.output(env[nodes[-1]])
    return fx.GraphModule(root, graph, class_name="Expert")


def _fresh(expert: nn.Module, generator: torch.Generator) -> None:
    """From-scratch experts: Linear weights ~ N(0, 0.02²), biases 0."""
    with torch.no_grad():
        for linear in [m for m in expert.modules() if isinstance(m, nn.Linear)]:
            linear.weight.copy_(torch.empty(linear.weight.shape).normal_(0.0, 0.02, generator=generator))
            if linear.bias is not None:
                linear.bias.zero_()


def _replace(gm: fx.GraphModule, config: MoE, layer: int, fc: fx.Node, chain: list[fx.Node], proj: fx.Node
             ) -> MoENodeRecord:
    nodes = [fc, *chain, proj]
    dense = _expert(gm, nodes)
    h = _linear(gm, fc).in_features  # type: ignore[union-attr]
    experts = [copy.deepcopy(dense) for _ in range(config.num_experts)]
    if not config.upcycle:
        generator = torch.Generator().manual_seed(config.seed + 7919 * (layer + 1))
        for expert in experts:
            _fresh(expert, generator)
    moe = MoELayer(experts, h, top_k=config.top_k, capacity_factor=config.capacity_factor,
                   eval_capacity_factor=config.eval_capacity_factor, aux_loss_weight=config.aux_loss_weight,
                   z_loss_weight=config.z_loss_weight, seed=config.seed + layer, layer=layer)
    param = next(dense.parameters())
    moe.router.to(device=param.device)
    prefix = _common_prefix(str(fc.target), str(proj.target))
    target = f"{prefix}.moe" if prefix else f"moe_{layer}"
    moe.train(gm.training)
    gm.add_submodule(target, moe)

    records = [_record(n) for n in nodes]
    out = _record(proj)
    tokens = math.prod(_record(fc.args[0]).shapes[0][:-1])  # type: ignore[arg-type]
    k, e = config.top_k, config.num_experts
    router_flops = 2 * tokens * h * e
    expert_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    router_bytes = moe.router.weight.numel() * moe.router.weight.element_size()
    record = NodeRecord(
        shapes=out.shapes, dtypes=out.dtypes,
        flops_fwd=k * sum(r.flops_fwd for r in records) + router_flops,
        flops_bwd=k * sum(r.flops_bwd for r in records) + 2 * router_flops,
        bytes_read=k * sum(r.bytes_read for r in records) + router_bytes,
        bytes_written=k * sum(r.bytes_written for r in records) + 4 * tokens * e,
        param_bytes=e * expert_bytes + router_bytes, module_path=target, layer=layer)
    moe_record = MoENodeRecord(
        layer=layer, module_path=target, num_experts=e, top_k=k, capacity_factor=config.capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor, tokens=tokens,
        capacity=expert_capacity(tokens, e, k, config.capacity_factor),
        expected_tokens_per_expert=tokens * k / e, expert_param_bytes=expert_bytes)

    graph = gm.graph
    with graph.inserting_after(proj):
        node = graph.call_module(target, (fc.args[0],))
    node.meta[META_KEY] = record
    node.meta[RECORD_KEY] = moe_record
    proj.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    for old in reversed(nodes):
        graph.erase_node(old)
    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for old in nodes:
        if old.op == "call_module" and old.target not in used:
            gm.delete_submodule(old.target)  # type: ignore[arg-type]
    return moe_record


def _common_prefix(a: str, b: str) -> str:
    """The module path both targets live under: ``blocks.1.mlp`` for ``blocks.1.mlp.fc/proj``."""
    return ".".join(os.path.commonprefix([a.split(".")[:-1], b.split(".")[:-1]]))
