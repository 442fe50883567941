"""Strategies of the intra-op ILP's decision nodes, priced by ``autopar.cost_models``.

Data flow: ``graph.build_problem`` calls :func:`decision_options` for every linear,
embedding and attention node of an annotated graph (``layouts.classify``); each strategy
comes with the layouts it needs and produces, its compute seconds and the seconds of its own
collectives, all through a :class:`CostContext` (the tp group on a ``ClusterSpec``,
alpha-beta per topology level). The ILP (``sharding_ilp``; Alpa: Zheng et al., OSDI 2022,
§4) picks one per node. Names are those ``plans.megatron`` and ``runtime.tensor_parallel``
use:

* linear: ``replicate`` (R → R); ``colwise`` (R → split last dim, weight split by output
  features; the input gradient is a partial sum, all-reduced in backward: once for all the
  linears that read one input, as DTensor adds their partial gradients before reducing — each of
  ``k`` such siblings, Llama's q/k/v or its SwiGLU gate/up, pays ``1/k`` of it, exact when all are
  colwise as in Megatron-LM and an underestimate when only some are); ``rowwise``
  (split last dim → partial sum all-reduced in forward → R; weight split by input features,
  bias replicated).
* embedding: ``replicate``; ``vocab`` (table split by rows; output all-reduced → R).
* attention (``scaled_dot_product_attention``): ``replicate``; ``heads`` (q, k, v and the
  output split along the heads dim; attention masks stay replicated).

Seconds are per microbatch, forward + backward: a linear runs three matmuls (output, input
gradient, weight gradient), attention its annotated forward + backward FLOPs, an embedding a
gather forward and a dense table gradient backward. Resharding between layouts is
:meth:`CostContext.convert_s`. Tied weights and repeated layers are merged in
``sharding_graph``, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import fx

from autopar.cost_models import Group, all_gather_time_s, all_reduce_time_s, all_to_all_time_s, matmul_time_s
from autopar.cost_models.compute import flops_time_s, memory_time_s
from autopar.planner.intra_op.layouts import REPLICATED, record_of, shape
from autopar.plans.megatron import embedding_weight, linear_weight

if TYPE_CHECKING:
    from autopar.cluster import ClusterSpec

ELEMENT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
FOLLOWER_PASSES = 5
"""Memory passes of an elementwise op over its output: forward read + write, backward 3."""
_OUT_FIRST = (torch.nn.functional.linear, torch.ops.aten.linear.default)
_ADDMM = torch.ops.aten.addmm.default


@dataclass(frozen=True, kw_only=True)
class CostContext:
    """What prices a strategy: the tp group on ``cluster``, the training ``dtype`` (a key of
    :data:`ELEMENT_BYTES`), how many times the planned microbatch's tokens exceed the captured
    example's (activation bytes and FLOPs scale by ``microbatch_scale``) and the model-state
    bytes per parameter that the memory row counts."""

    tp: int
    cluster: ClusterSpec
    dtype: str
    microbatch_scale: float
    state_bytes_per_param: float

    @property
    def group(self) -> Group:
        per_node = self.cluster.devices_per_node
        return Group(size=self.tp, num_nodes=1 if self.tp <= per_node else math.ceil(self.tp / per_node))

    @property
    def element_bytes(self) -> int:
        return ELEMENT_BYTES[self.dtype]

    def tensor_bytes(self, node: fx.Node) -> float:
        """Bytes of what ``node`` produces, floating tensors in the training dtype."""
        record = record_of(node)
        assert record is not None
        total = 0.0
        for dims, dtype in zip(record.shapes, record.dtypes, strict=True):
            item = getattr(torch, dtype)
            total += math.prod(dims) * (self.element_bytes if item.is_floating_point else item.itemsize)
        return total * (1.0 if node.op == "get_attr" else self.microbatch_scale)

    def all_reduce_s(self, num_bytes: float) -> float:
        return all_reduce_time_s(num_bytes, group=self.group, cluster=self.cluster)

    def all_gather_s(self, num_bytes: float) -> float:
        return all_gather_time_s(num_bytes, group=self.group, cluster=self.cluster)

    def convert_s(self, src: int, dst: int, num_bytes: float, *, floating: bool) -> float:
        """Forward + backward seconds to turn layout ``src`` into ``dst``: R → split is a slice
        whose gradient is all-gathered, split → R an all-gather whose gradient is sliced,
        split → split an all-to-all each way (gradients only for floating tensors)."""
        if src == dst or self.tp == 1:
            return 0.0
        if src == REPLICATED:
            return self.all_gather_s(num_bytes) if floating else 0.0
        if dst == REPLICATED:
            return self.all_gather_s(num_bytes)
        shuffle = all_to_all_time_s(num_bytes / self.tp, group=self.group, cluster=self.cluster)
        return shuffle * (2 if floating else 1)

    def matmul_s(self, m: float, k: float, n: float) -> float:
        """Forward ``(m×k)(k×n)`` plus the input- and weight-gradient matmuls."""
        def run(a: float, b: float, c: float) -> float:
            return matmul_time_s(a, b, c, device=self.cluster.device, dtype=self.dtype,
                                 bytes_per_element=self.element_bytes)
        return run(m, k, n) + run(m, n, k) + run(k, m, n)

    def flops_s(self, flops: float) -> float:
        return flops_time_s(flops, device=self.cluster.device, dtype=self.dtype) if flops > 0 else 0.0

    def memory_s(self, num_bytes: float) -> float:
        return memory_time_s(num_bytes, device=self.cluster.device) if num_bytes > 0 else 0.0

    def elementwise_s(self, node: fx.Node, *, sharded: bool) -> float:
        """A follower or fixed op: :data:`FOLLOWER_PASSES` over its output (0 for a view)."""
        record = record_of(node)
        if record is None or record.bytes_written == 0:
            return 0.0
        return self.memory_s(FOLLOWER_PASSES * self.tensor_bytes(node) / (self.tp if sharded else 1))


@dataclass(frozen=True, kw_only=True)
class Options:
    """The strategies of one decision node. ``labels`` is what ties compare (the placement of
    the node's weight, e.g. ``"S0"``, so a tied embedding and LM head agree; the strategy name
    for attention); ``in_layouts[s][i]`` is the layout strategy ``s`` needs on ``inputs[i]``;
    ``params`` lists ``(id, numel, split under each strategy)`` of the weights it owns."""

    kind: str
    strategies: tuple[str, ...]
    labels: tuple[str, ...]
    inputs: tuple[fx.Node, ...]
    in_layouts: tuple[tuple[int, ...], ...]
    out_layout: tuple[int, ...]
    compute_s: tuple[float, ...]
    communication_s: tuple[float, ...]
    params: tuple[tuple[int, int, tuple[bool, ...]], ...]


def _options(kind: str, inputs: tuple[fx.Node, ...], rows: list[tuple],
             params: list[torch.Tensor | None]) -> Options:
    """``rows``: (strategy, label, input layouts, output layout, compute s, communication s, splits)."""
    columns = list(zip(*rows, strict=True))
    splits = columns[6]
    return Options(kind=kind, strategies=columns[0], labels=columns[1], inputs=inputs,
                   in_layouts=columns[2], out_layout=columns[3], compute_s=columns[4],
                   communication_s=columns[5],
                   params=tuple((id(p), p.numel(), tuple(s[i] for s in splits))
                                for i, p in enumerate(params) if p is not None))


def _linear_parts(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor | None, bool]:
    """The activation input, the bias parameter (or None), and whether the weight is (out, in)."""
    if node.op == "call_module":
        return node.args[0], gm.get_submodule(str(node.target)).bias, True  # type: ignore[return-value]
    position = 1 if node.target is _ADDMM else 0
    bias_arg = node.args[0] if node.target is _ADDMM else (node.args[2] if len(node.args) > 2 else None)
    is_attr = isinstance(bias_arg, fx.Node) and bias_arg.op == "get_attr"
    bias = gm.get_parameter(str(bias_arg.target)) if is_attr else None  # type: ignore[union-attr]
    return node.args[position], bias, node.target in _OUT_FIRST  # type: ignore[return-value]


def _linear_input(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The activation a linear node multiplies (None for any other node)."""
    return _linear_parts(gm, node)[0] if linear_weight(gm, node) is not None else None


def _linear(gm: fx.GraphModule, node: fx.Node, ctx: CostContext) -> Options:
    x, bias, out_first = _linear_parts(gm, node)
    weight = linear_weight(gm, node)
    k, n = shape(x)[-1], shape(node)[-1]
    m = math.prod(shape(node)) / n * ctx.microbatch_scale
    last_in, last_out, t = len(shape(x)) - 1, len(shape(node)) - 1, ctx.tp
    out_dim, in_dim = ("S0", "S1") if out_first else ("S1", "S0")
    rows = [("replicate", "R", (REPLICATED,), REPLICATED, ctx.matmul_s(m, k, n), 0.0, (False, False))]
    if t > 1 and n % t == 0:
        shared_by = sum(1 for user in x.users if user is node or _linear_input(gm, user) is x)
        rows.append(("colwise", out_dim, (REPLICATED,), last_out, ctx.matmul_s(m, k, n / t),
                     ctx.all_reduce_s(ctx.tensor_bytes(x)) / shared_by, (True, True)))
    if t > 1 and k % t == 0:
        rows.append(("rowwise", in_dim, (last_in,), REPLICATED, ctx.matmul_s(m, k / t, n),
                     ctx.all_reduce_s(ctx.tensor_bytes(node)), (True, False)))
    return _options("linear", (x,), rows, [weight, bias])


def _embedding(gm: fx.GraphModule, node: fx.Node, ctx: CostContext) -> Options:
    table = embedding_weight(gm, node)
    assert table is not None
    ids = node.args[1] if node.target is torch.ops.aten.embedding.default else node.args[0]
    out = ctx.tensor_bytes(node)
    table_bytes = table.numel() * ctx.element_bytes

    def compute(shards: int) -> float:  # gather forward; dense table gradient backward
        return ctx.memory_s(2 * out) + ctx.memory_s(table_bytes / shards + out)

    rows = [("replicate", "R", (REPLICATED,), REPLICATED, compute(1), 0.0, (False,))]
    if ctx.tp > 1 and table.shape[0] % ctx.tp == 0:
        reduce_s = ctx.all_reduce_s(out)
        rows.append(("vocab", "S0", (REPLICATED,), REPLICATED, compute(ctx.tp), reduce_s, (True,)))
    return _options("embedding", (ids,), rows, [table])


def _attention(node: fx.Node, ctx: CostContext) -> Options:
    arguments = [*node.args, *node.kwargs.values()]  # q, k, v (possibly one node), then a mask
    inputs = tuple(a for a in arguments if isinstance(a, fx.Node) and getattr(record_of(a), "shapes", ()))
    record = record_of(node)
    assert record is not None and len(inputs) >= 3
    scale = ctx.microbatch_scale

    def compute(shards: int) -> float:  # forward and backward kernels
        return ctx.flops_s(record.flops_fwd * scale / shards) + ctx.flops_s(record.flops_bwd * scale / shards)

    heads = len(shape(inputs[0])) - 3
    rows = [("replicate", "replicate", (REPLICATED,) * len(inputs), REPLICATED, compute(1), 0.0, ())]
    if ctx.tp > 1 and heads >= 0 and all(shape(q)[heads] % ctx.tp == 0 for q in inputs[:3]):
        layouts = (heads,) * 3 + (REPLICATED,) * (len(inputs) - 3)
        rows.append(("heads", "heads", layouts, heads, compute(ctx.tp), 0.0, ()))
    return _options("attention", inputs, rows, [])


def decision_options(gm: fx.GraphModule, node: fx.Node, kind: str, ctx: CostContext) -> Options:
    """The strategies of a node that ``layouts.classify`` calls linear, embedding or attention."""
    if kind == "linear":
        return _linear(gm, node, ctx)
    if kind == "embedding":
        return _embedding(gm, node, ctx)
    assert kind == "attention", kind
    return _attention(node, ctx)
