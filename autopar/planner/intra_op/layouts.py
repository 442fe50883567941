"""Layouts on the tensor-parallel axis, and how elementwise and view ops carry them.

Data flow: ``graph.build_problem`` walks an annotated fx graph; :func:`classify`
says what each node is (a decision node — linear, embedding, attention — a follower that
takes its leading input's layout, or a fixed op that needs replicated inputs), and
:func:`follow_layout` / :func:`operand_layout` where a follower's split lands. The
strategies of decision nodes and their prices are in ``strategies``; the intra-op ILP
(Alpa: Zheng et al., OSDI 2022, §4) that uses both is ``sharding_ilp``.

A *layout* is ``REPLICATED`` (−1) or ``d ≥ 0``: the tensor split evenly along dim ``d`` over
the tp ranks. Followers keep a split when the op acts independently along it: elementwise
ops (broadcasting aligned from the right), views whose reshape keeps the split dim as an
outer factor, transposes and permutes, splits (along the split dim only under Megatron's
head-aligned QKV assumption), ``getitem`` of a split's tuple, softmax over another dim.
Anything else (LayerNorm, reductions, tensor indexing, unknown ops) runs replicated.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import fx

from autopar.capture.record import META_KEY, NodeRecord
from autopar.plans.megatron import embedding_weight, linear_weight

REPLICATED = -1
Kind = Literal["skip", "source", "output", "linear", "embedding", "attention", "follow", "fixed"]
_ELEMENTWISE = frozenset({
    "add", "sub", "rsub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "neg", "pow",
    "exp", "sqrt", "rsqrt", "erf",
    "gelu", "relu", "silu", "tanh", "sigmoid", "dropout", "clone", "contiguous", "to", "float",
    "half", "bfloat16", "type_as", "_to_copy", "detach", "alias", "masked_fill", "where",
    "Dropout", "GELU", "ReLU", "SiLU", "Tanh", "Sigmoid", "Identity", "NewGELUActivation",
    "GELUActivation"})
_RESHAPES = frozenset({"view", "reshape", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze"})
_TRANSPOSES = frozenset({"transpose", "swapaxes", "permute", "t"})
_SPLITS = frozenset({"split", "chunk", "split_with_sizes"})
_SOFTMAX = frozenset({"softmax", "log_softmax", "_softmax"})
_ALONG_DIM = frozenset({"slice", "narrow", "cat", "concat", "concatenate"}) | _SOFTMAX
"""Ops that act along one dim (the first argument after the tensor) and keep a split elsewhere."""
_FOLLOWERS = _ELEMENTWISE | _RESHAPES | _TRANSPOSES | _SPLITS | _ALONG_DIM | {"expand", "expand_as",
                                                                               "getitem"}
_ATTENTION = frozenset({"scaled_dot_product_attention"})


def record_of(node: fx.Node) -> NodeRecord | None:
    return node.meta.get(META_KEY)


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """``"add"`` for ``operator.add``, ``torch.add``, ``aten.add.Tensor``, ``x.add`` or ``x.add_``;
    a module's class name for ``call_module``."""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    target = node.target
    if node.op == "call_method":
        name = str(target)
    elif isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    else:
        name = getattr(target, "__name__", str(target))
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name  # in-place variant


def classify(gm: fx.GraphModule, node: fx.Node) -> Kind:
    if node.op == "output":
        return "output"
    record = record_of(node)
    if record is None or not record.shapes:
        return "skip"
    if node.op in ("placeholder", "get_attr"):
        return "source"
    if linear_weight(gm, node) is not None:
        return "linear"
    if embedding_weight(gm, node) is not None:
        return "embedding"
    name = op_name(gm, node)
    if name in _ATTENTION:
        return "attention"
    return "follow" if name in _FOLLOWERS else "fixed"


def is_floating(node: fx.Node) -> bool:
    record = record_of(node)
    return record is not None and any(getattr(torch, d).is_floating_point for d in record.dtypes)


def numel(node: fx.Node) -> int:
    record = record_of(node)
    return 0 if record is None else sum(math.prod(s) for s in record.shapes)


def shape(node: fx.Node) -> tuple[int, ...]:
    record = record_of(node)
    assert record is not None and record.shapes
    return record.shapes[0]


def _extra_args(node: fx.Node) -> list[Any]:
    return list(node.args[1:])


def _dim_arg(node: fx.Node, position: int, name: str, default: int | None, ndim: int) -> int | None:
    args = _extra_args(node)
    value = args[position] if len(args) > position else node.kwargs.get(name, default)
    return value % ndim if isinstance(value, int) and ndim else None


def reshape_layout(src: tuple[int, ...], dst: tuple[int, ...], d: int, tp: int) -> int | None:
    """Where a split along ``src[d]`` lands after a reshape to ``dst``: the dim with the same
    outer extent whose size is a multiple or a leading factor of ``src[d]``."""
    outer, extent = math.prod(src[:d]), 1
    for j, size in enumerate(dst):
        if extent == outer and size != 1 and size % tp == 0 and (size % src[d] == 0 or src[d] % size == 0):
            return j
        extent *= size
        if extent > outer:
            return None
    return None


def _transposed(node: fx.Node, name: str, d: int, ndim: int) -> int | None:
    args = _extra_args(node)
    if name == "t":
        return 1 - d if ndim == 2 else d
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = [int(x) % ndim for x in dims]
        return dims.index(d) if len(dims) == ndim else None
    a, b = _dim_arg(node, 0, "dim0", None, ndim), _dim_arg(node, 1, "dim1", None, ndim)
    if a is None or b is None:
        return None
    return b if d == a else a if d == b else d


def follow_layout(gm: fx.GraphModule, node: fx.Node, leader: fx.Node, layout: int, tp: int) -> int | None:
    """The layout of ``node``'s output when its leading input has ``layout``; None when the
    op cannot keep that split (the input is then all-gathered and the op runs replicated)."""
    if layout == REPLICATED:
        return REPLICATED
    name, src, dst = op_name(gm, node), shape(leader), shape(node)
    if name in _ELEMENTWISE or name in ("expand", "expand_as"):
        out = layout + len(dst) - len(src)
        return out if 0 <= out < len(dst) and dst[out] == src[layout] else None
    if name in _RESHAPES:
        return reshape_layout(src, dst, layout, tp)
    if name in _TRANSPOSES:
        return _transposed(node, name, layout, len(src))
    if name in _SPLITS:  # along the split dim only under the head-aligned assumption
        record = record_of(node)
        assert record is not None
        return layout if all(s[layout] % tp == 0 for s in record.shapes) else None
    if name == "getitem":
        from_tuple = len(record_of(leader).shapes) > 1 or op_name(gm, leader) in _SPLITS  # type: ignore[union-attr]
        if from_tuple:
            return layout if node.args[0] is leader else None
        return index_layout(len(src), node.args[1], layout) if node.args[0] is leader else None
    if name in _ALONG_DIM:
        default = None if name in _SOFTMAX else 0
        return layout if _dim_arg(node, 0, "dim", default, len(dst)) not in (layout, None) else None
    return None


def index_layout(ndim: int, index: Any, d: int) -> int | None:
    """Where dim ``d`` lands after basic indexing ``x[index]``; None unless it is taken whole."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, fx.Node) or not (i is None or i is Ellipsis or isinstance(i, (int, slice)))
           for i in items):
        return None
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for item in items:
        expanded += [slice(None)] * (ndim - used) if item is Ellipsis else [item]
    expanded += [slice(None)] * (ndim - sum(1 for i in expanded if i is not None))
    src = out = 0
    for item in expanded:
        if item is None:
            out += 1
            continue
        if src == d:
            return out if item == slice(None) else None
        src, out = src + 1, out + (0 if isinstance(item, int) else 1)
    return None


def operand_layout(operand: fx.Node, output: fx.Node, layout: int) -> int:
    """The layout a broadcast operand needs so that it meets an output split along ``layout``."""
    if layout == REPLICATED:
        return REPLICATED
    src, dst = shape(operand), shape(output)
    d = layout - (len(dst) - len(src))
    return d if 0 <= d < len(src) and src[d] == dst[layout] else REPLICATED

