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

With the Plan's ``sequence_parallel`` (Megatron sequence parallelism, Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models", §4.2.2) the regions between a
row-parallel linear and the next column-parallel one — norms, dropout, residual adds — run on
sequence shards: :func:`sequence_parallel_pass` rewrites the stage graph so that every
activation entering such a region (a row-parallel linear's partial output, the token
embedding's, the hidden states a pipeline stage receives) becomes a DTensor ``Shard(1)`` of
``[batch, seq, hidden]`` (a reduce-scatter instead of the all-reduce; a free chunk for
replicated ones), and every column-parallel linear's input is gathered back to ``Replicate``
(an all-gather; its backward is the reduce-scatter of the input gradient). Norm and bias
weights stay replicated and receive partial gradients (one term per sequence shard), which
are summed over tp as they accumulate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _MaskPartial  # the vocab-parallel embedding's output
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from autopar.capture.record import META_KEY
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
_ATTENTION = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}


def math_attention(*args: Any, **kwargs: Any) -> Any:
    """``scaled_dot_product_attention`` on the math backend, which decomposes into ops DTensor can
    shard (it has no strategy for the CPU flash kernel). The stage graph calls this in place of SDPA
    on CPU meshes, so that recomputation, which replays the graph in backward outside
    :class:`TensorParallelStage`'s forward, chooses the same backend."""
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _math_attention_on_cpu(gm: fx.GraphModule, device_type: str) -> None:
    if device_type != "cpu":
        return
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ATTENTION:
            node.target = math_attention
    gm.recompile()


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


def _apply_after(gm: fx.GraphModule, node: fx.Node, function: Any) -> fx.Node:
    """Every user of ``node`` reads ``function(node)`` instead (one new node, right after it)."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(function, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def _replicate_after(gm: fx.GraphModule, node: fx.Node) -> None:
    """Reduce a row-parallel linear's or a vocabulary-parallel embedding's partial output right
    after the node, as Megatron-LM does. Left partial, DTensor reduces it lazily wherever a
    non-linear op first needs it, and again at each such op on every path (Llama's RMSNorm: once
    for the variance, once at the MLP's activation); the embedding's masked partial sum even loses
    its mask through a dtype cast, and then cannot be reduced at all."""
    _apply_after(gm, node, replicated)
    gm.graph.lint()
    gm.recompile()


SEQUENCE_DIM = 1  # activations are [batch, seq, hidden]
_VIEWS = {"view", "reshape", torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default,
          torch.ops.aten.reshape.default}


def sequence_sharded(value: Any) -> Any:
    """``value`` split along the sequence over its mesh (Megatron's ḡ): a partial sum reduce-scattered,
    a replicated tensor chunked; anything else unchanged."""
    if not isinstance(value, DTensor) or value.dim() <= SEQUENCE_DIM:
        return value
    return value.redistribute(placements=[Shard(SEQUENCE_DIM)] * len(value.placements))


def sequence_gathered(value: Any) -> Any:
    """A column-parallel linear's input made whole along the sequence (Megatron's g: an all-gather,
    whose backward reduce-scatters the input gradient); anything else unchanged."""
    if not isinstance(value, DTensor) or not any(p.is_shard(SEQUENCE_DIM) for p in value.placements):
        return value
    return value.redistribute(placements=[Replicate()] * len(value.placements))


def _reduce_partial_gradient(param: torch.Tensor) -> None:
    """A replicated weight used on sequence shards (a norm's) accumulates one gradient term per
    shard, a partial sum: reduce it over tp here, so the optimizer, clipping and data parallelism
    see a replicated gradient (Megatron's all-reduce of the layer-norm gradients; here one per
    parameter and microbatch, unbucketed). Left alone, DTensor would reduce it lazily in whichever op
    first needs the sum. FSDP2 replaces the parameters, and with them this hook, but redistributes
    each gradient to its parameter's placement itself."""
    grad = param.grad
    if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
        param.grad = grad.redistribute(placements=[Replicate()] * len(grad.placements))


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    record = node.meta.get(META_KEY)
    return record.shapes[0] if record is not None and record.shapes else None


def _is_view(node: fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and node.target in _VIEWS


def _sequence_output(node: fx.Node) -> fx.Node:
    """Where ``node``'s output is [batch, seq, …] again: the node itself, or the view that restores
    the sequence after a linear run on flattened tokens (Hugging Face's Conv1D: addmm, then view)."""
    while (shape := _shape(node)) is not None and len(shape) <= SEQUENCE_DIM + 1 \
            and len(node.users) == 1 and _is_view(next(iter(node.users))):
        node = next(iter(node.users))
    return node


def _sequence_input(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The activation a column-parallel linear reads, as ``(source, user)``: ``user`` reads
    ``source``, which is [batch, seq, …] (a view that flattened the tokens is looked through)."""
    if node.op == "call_module":
        index = 0
    else:
        index = 1 if node.target is torch.ops.aten.addmm.default else 0
    user, source = node, node.args[index]
    assert isinstance(source, fx.Node), node
    while _is_view(source) and (shape := _shape(source)) is not None and len(shape) <= SEQUENCE_DIM + 1 \
            and isinstance(source.args[0], fx.Node):
        user, source = source, source.args[0]
    return source, user


def _check_sequence(node: fx.Node, tp: int) -> None:
    shape = _shape(node)
    if shape is None or len(shape) <= SEQUENCE_DIM + 1:
        raise ValueError(f"sequence parallelism splits [batch, seq, hidden] activations, but node "
                         f"{node.name} produces shape {shape}; turn sequence_parallel off for this model")
    if shape[SEQUENCE_DIM] % tp:
        raise ValueError(f"sequence parallelism splits the sequence over tp = {tp} ranks, but node "
                         f"{node.name} has sequence length {shape[SEQUENCE_DIM]} (shape {shape}), which "
                         f"{tp} does not divide; use a sequence length that is a multiple of {tp} (pad "
                         "the batch), or turn sequence_parallel off")


def _hidden_entries(gm: fx.GraphModule, hidden: set[int]) -> list[fx.Node]:
    """The stage's hidden-state inputs (floating [batch, seq, hidden], from the previous pipeline
    stage) and its token-embedding lookups ([batch, seq, hidden]): where replicated activations
    enter a sequence-parallel region."""
    entries = []
    for node in gm.graph.nodes:
        record, shape = node.meta.get(META_KEY), _shape(node)
        if record is None or shape is None or len(shape) <= SEQUENCE_DIM + 1 or shape[-1] not in hidden:
            continue
        is_input = node.op == "placeholder" and record.dtypes[0].startswith(("float", "bfloat"))
        if is_input or embedding_weight(gm, node) is not None:
            entries.append(node)
    return entries


def sequence_parallel_pass(gm: fx.GraphModule, shardings: Iterable[Sharding], tp: int) -> fx.GraphModule:
    """Megatron sequence parallelism on a stage graph whose ``shardings`` are Megatron's layout:
    row-parallel and vocabulary-parallel outputs, token embeddings and hidden-state inputs become
    sequence shards (:func:`sequence_sharded`), column-parallel inputs are gathered
    (:func:`sequence_gathered`, once per activation however many linears read it)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    mine = [(by_name[s.node], s.strategy) for s in shardings if s.node in by_name]
    outputs = [_sequence_output(node) for node, strategy in mine if strategy in ("rowwise", "vocab")]
    hidden = {shape[-1] for node in outputs if (shape := _shape(node)) is not None}
    entries = [n for n in _hidden_entries(gm, hidden) if n not in outputs]
    for node in outputs + entries:
        _check_sequence(node, tp)
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1:]
    for node in outputs + entries:
        new = _apply_after(gm, node, sequence_sharded)
        if node.op == "placeholder":  # after every placeholder: they stay the graph's signature
            last_input[0].append(new)
    gathered: dict[fx.Node, fx.Node] = {}
    for node, strategy in mine:
        if strategy != "colwise":
            continue
        source, user = _sequence_input(node)
        if source not in gathered:
            gathered[source] = _gather_after(gm, source)
        user.replace_input_with(source, gathered[source])
    gm.graph.lint()
    gm.recompile()
    return gm


def _gather_after(gm: fx.GraphModule, source: fx.Node) -> fx.Node:
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    anchor = inputs[-1] if source.op == "placeholder" else source
    with gm.graph.inserting_after(anchor):
        return gm.graph.call_function(sequence_gathered, (source,))


def shard_parameters(gm: fx.GraphModule, shardings: Iterable[Sharding], tp_mesh: DeviceMesh, *,
                     sequence_parallel: bool = False) -> None:
    """Replace ``gm``'s parameters, in place, by DTensors over ``tp_mesh`` (no-op if tp = 1);
    with ``sequence_parallel`` rewrite the graph with :func:`sequence_parallel_pass` too.

    A parameter reachable under several names (tied weights) becomes one DTensor
    set under every name, so the tie survives. MoE layers' parameters stay plain tensors.
    """
    if tp_mesh.size() == 1:
        return
    _drop_metadata_asserts(gm)
    _math_attention_on_cpu(gm, tp_mesh.device_type)
    shardings = tuple(shardings)
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
        if sharding.strategy in ("vocab", "rowwise") and not sequence_parallel:
            _replicate_after(gm, node)
    if sequence_parallel:
        sequence_parallel_pass(gm, shardings, tp_mesh.size())
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
        if sequence_parallel and placement.is_replicate() and shared.requires_grad:
            shared.register_post_accumulate_grad_hook(_reduce_partial_gradient)
        for alias in aliases:
            _set_parameter(gm, alias, shared)
