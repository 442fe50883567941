"""Tensor parallelism of a stage module over the mesh's ``tp`` axis, as the Plan says.

Mechanism only: the Plan's ``shardings`` name linear nodes ``"colwise"`` or
``"rowwise"``; this module turns their weights (and biases) into DTensors sharded
over ``tp`` — by output features for colwise, by input features for rowwise,
whatever the op's weight layout (``nn.Linear``/``aten.linear`` store (out, in),
``aten.addmm``/``aten.mm`` store (in, out), as in Hugging Face's Conv1D). Every other
parameter becomes a replicated DTensor. The stage then runs on DTensors: its inputs
enter as replicated DTensors, DTensor's sharding propagation inserts the
collectives (the all-reduce after a rowwise linear), and outputs leave as plain
tensors for the pipeline. Works on fx and torch.export graphs alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _MaskPartial  # the vocab-parallel embedding's output
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from autopar.passes.moe.layer import MoELayer
from autopar.plans import Sharding
from autopar.plans.megatron import embedding_weight, linear_weight

_ADDMM_LIKE = {torch.ops.aten.addmm.default, torch.ops.aten.mm.default}


def _placements(gm: fx.GraphModule, node: fx.Node, strategy: str) -> dict[str, Placement]:
    """Parameter name → placement for one sharded linear or embedding node."""
    if strategy == "vocab":
        if node.op == "call_module":
            return {f"{node.target}.weight": Shard(0)}
        position = 0 if node.target is torch.ops.aten.embedding.default else 1
        return {str(node.args[position].target): Shard(0)}
    out_dim = 1 if node.op == "call_function" and node.target in _ADDMM_LIKE else 0
    in_dim = 1 - out_dim
    if node.op == "call_module":
        weight_name = f"{node.target}.weight"
        bias_name = f"{node.target}.bias" if gm.get_submodule(str(node.target)).bias is not None else None
    else:
        weight_index = 2 if node.target is torch.ops.aten.addmm.default else 1
        weight_name = str(node.args[weight_index].target)
        bias_arg = node.args[0] if node.target is torch.ops.aten.addmm.default else (
            node.args[2] if len(node.args) > 2 else None)
        is_attr = isinstance(bias_arg, fx.Node) and bias_arg.op == "get_attr"
        bias_name = str(bias_arg.target) if is_attr else None
    if strategy == "colwise":
        result: dict[str, Placement] = {weight_name: Shard(out_dim)}
        if bias_name:
            result[bias_name] = Shard(0)
        return result
    if strategy == "rowwise":
        return {weight_name: Shard(in_dim)}
    raise ValueError(f"unknown sharding strategy {strategy!r} for node {node.name}; "
                     "expected 'colwise', 'rowwise' or 'vocab'")


def _set_parameter(module: nn.Module, name: str, value: nn.Parameter) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(module.get_submodule(owner) if owner else module, attr, value)


@contextlib.contextmanager
def implicit_replication() -> Iterator[None]:
    """DTensor's ``implicit_replication``, but nestable: it restores the previous setting
    (torch's own resets it to off, which would break an enclosing one)."""
    previous = DTensor._op_dispatcher._allow_implicit_replication
    DTensor._op_dispatcher._allow_implicit_replication = True
    try:
        yield
    finally:
        DTensor._op_dispatcher._allow_implicit_replication = previous


class TensorParallelStage(nn.Module):
    """Runs ``inner`` (whose parameters are DTensors on ``mesh``) on plain tensors."""

    def __init__(self, inner: nn.Module, mesh: DeviceMesh) -> None:
        super().__init__()
        self.inner = inner
        self.mesh = mesh

    def forward(self, *args: Any) -> Any:
        replicate = [Replicate()]
        inputs = tree_map(lambda v: DTensor.from_local(v, self.mesh, replicate)
                          if isinstance(v, torch.Tensor) else v, args)
        # implicit replication: tensors created inside the graph (arange, masks) join as
        # replicated; the math SDPA backend decomposes into ops DTensor can shard (it has
        # no strategy for the CPU flash kernel).
        backends = [SDPBackend.MATH] if self.mesh.device_type == "cpu" else list(SDPBackend)
        with implicit_replication(), sdpa_kernel([b for b in backends if b != SDPBackend.ERROR]):
            out = self.inner(*inputs)
        return tree_map(lambda v: v.full_tensor() if isinstance(v, DTensor) else v, out)


_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def _drop_metadata_asserts(gm: fx.GraphModule) -> None:
    """torch.export's dtype/shape assertion nodes: DTensor has no rule for them, and the
    captured graph was already checked at capture time."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()


def replicated(value: Any) -> Any:
    """``value`` reduced to a replicated DTensor if it is a partial one, anything else unchanged.

    A plain partial sum is redistributed (its backward hands the gradient on replicated). The
    vocabulary-parallel embedding's masked partial sum cannot be redistributed back in backward, so
    it is reduced the way a GPT's position-embedding add reduces it: by DTensor's dispatcher, in an
    add of a replicated zero (a masked partial and a plain one cannot be added as partials)."""
    if not isinstance(value, DTensor) or not any(p.is_partial() for p in value.placements):
        return value
    if any(isinstance(p, _MaskPartial) for p in value.placements):
        return value + torch.zeros((), dtype=value.dtype, device=value.device)
    return value.redistribute(placements=[Replicate()] * len(value.placements))


def _replicate_after(gm: fx.GraphModule, node: fx.Node) -> None:
    """Reduce a row-parallel linear's or a vocabulary-parallel embedding's partial output right
    after the node, as Megatron-LM does. Left partial, DTensor reduces it lazily wherever a
    non-linear op first needs it, and again at each such op on every path (Llama's RMSNorm: once
    for the variance, once at the MLP's activation); the embedding's masked partial sum even loses
    its mask through a dtype cast, and then cannot be reduced at all."""
    with gm.graph.inserting_after(node):
        reduced = gm.graph.call_function(replicated, (node,))
    node.replace_all_uses_with(reduced, delete_user_cb=lambda user: user is not reduced)
    gm.graph.lint()
    gm.recompile()


def shard_parameters(gm: fx.GraphModule, shardings: Iterable[Sharding], tp_mesh: DeviceMesh) -> None:
    """Replace ``gm``'s parameters, in place, by DTensors over ``tp_mesh`` (no-op if tp = 1).

    A parameter reachable under several names (tied weights) becomes one DTensor
    set under every name, so the tie survives. MoE layers' parameters stay plain tensors.
    """
    if tp_mesh.size() == 1:
        return
    _drop_metadata_asserts(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    placements: dict[str, Placement] = {}
    for sharding in shardings:
        node = by_name.get(sharding.node)
        if node is None:
            continue  # the node lives in another stage
        is_table = sharding.strategy == "vocab" and embedding_weight(gm, node) is not None
        if linear_weight(gm, node) is None and not is_table:
            raise ValueError(f"sharding {sharding.strategy!r} names node {sharding.node}, which is not "
                             "a linear layer (or, for 'vocab', an embedding) with a weight parameter")
        placements.update(_placements(gm, node, sharding.strategy))
        if sharding.strategy in ("vocab", "rowwise"):
            _replicate_after(gm, node)
    names: dict[int, list[str]] = {}
    originals: dict[int, nn.Parameter] = {}
    local = {id(p) for m in gm.modules() if isinstance(m, MoELayer) for p in m.parameters()}
    for name, param in gm.named_parameters(remove_duplicate=False):
        if id(param) in local:  # MoE layers run on plain tensors (expert_parallel.LocalTensors)
            continue
        names.setdefault(id(param), []).append(name)
        originals[id(param)] = param
    for key, aliases in names.items():
        param = originals[key]
        placement = next((placements[a] for a in aliases if a in placements), Replicate())
        shared = nn.Parameter(distribute_tensor(param.detach(), tp_mesh, [placement]),
                              requires_grad=param.requires_grad)
        for alias in aliases:
            _set_parameter(gm, alias, shared)
